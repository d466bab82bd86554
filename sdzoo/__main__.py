"""``python -m sdzoo COMMAND ...``: the ``sdzoo`` command (sdzoo.cli)."""
import sys

from sdzoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
