#!/usr/bin/env python3
"""How much of timm sdzoo.convert_drop_path reaches: `sdzoo coverage` (sdzoo/cli/coverage.py).

    python scripts/drop_path_coverage.py --forward --every 5 --time-limit 3600
    python scripts/drop_path_coverage.py --compile --backend aot_eager
"""
import sys

from sdzoo.cli.coverage import main

if __name__ == "__main__":
    sys.exit(main())
