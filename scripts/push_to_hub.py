#!/usr/bin/env python3
"""Publish a training run to the Hugging Face Hub and check what arrived: `sdzoo push` (sdzoo/cli/push.py).

    python scripts/push_to_hub.py --model local-dir:runs/r110 --repo-id ORG/sd_resnet110_cifar.cifar10
    python scripts/push_to_hub.py --model runs/r110 --repo-id ORG/NAME --local-dir out/NAME   # no upload

Exit status: 0 published, 2 a wrong flag or run folder, 1 the upload or its check failed.
"""
import sys

from sdzoo.cli.push import main

if __name__ == "__main__":
    sys.exit(main())
