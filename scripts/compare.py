#!/usr/bin/env python3
"""The paper's comparison: the same network trained with stochastic depth and at constant depth, for N seeds
(see ``--help``; the logic in sdzoo/training/compare.py).

    python scripts/compare.py --output runs/fmnist-compare --dataset fashion_mnist
    python scripts/compare.py --output runs/fmnist-compare --dataset fashion_mnist   # again: continues
"""
import sys

from sdzoo.training.compare import main

if __name__ == "__main__":
    sys.exit(main())
