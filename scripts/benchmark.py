#!/usr/bin/env python3
"""Does stochastic depth save the time it promises: `sdzoo bench` (sdzoo/cli/bench.py; see --help).

    python scripts/benchmark.py --model sd_resnet110_cifar --batch-size 128 --json out/benchmark.json
    python scripts/benchmark.py --convert resnet26 convnext_atto --drop-path-rate 0.2 0.4
"""
import sys

from sdzoo.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
