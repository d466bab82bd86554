#!/usr/bin/env python3
"""The whole job on scikit-learn's handwritten digits, offline: `sdzoo demo` (sdzoo/cli/demo.py).

    python scripts/run_digits.py                      # into runs/digits (runs/digits-2, ... if taken)
    python scripts/run_digits.py --output runs/mine --epochs 10
"""
import sys

from sdzoo.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
