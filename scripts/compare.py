#!/usr/bin/env python3
"""The paper's comparison, stochastic against constant depth for N seeds: `sdzoo compare` (sdzoo/cli/compare.py).

    python scripts/compare.py --output runs/fmnist-compare --dataset fashion_mnist
    python scripts/compare.py --output runs/fmnist-compare --dataset fashion_mnist   # again: continues
"""
import sys

from sdzoo.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
