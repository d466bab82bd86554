#!/usr/bin/env python3
"""Train a stochastic-depth ResNet with the paper's recipe (see ``--help``; flags in sdzoo/training/settings.py,
the loop in sdzoo/training/train.py).

    python scripts/train.py --model sd_resnet110_cifar --dataset cifar10 --data-dir ~/data --output runs/r110
    torchrun --nproc_per_node 8 scripts/train.py --dataset cifar10 --data-dir ~/data --output runs/r110
    python scripts/train.py                      # digits, offline, about a minute on 2 CPU cores
"""
import sys

from sdzoo.training.train import main

if __name__ == "__main__":
    sys.exit(main())
