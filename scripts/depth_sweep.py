#!/usr/bin/env python3
"""Prune one trained model to every depth, export and measure each: `sdzoo depth-sweep` (sdzoo/cli/depth_sweep.py).

    python scripts/depth_sweep.py --model runs/digits/stochastic_depth --twin runs/digits/constant_depth \\
        --output out/depth-digits

Exit status: 0 the sweep is written, 2 a wrong argument (nothing written).
"""
import sys

from sdzoo.cli.depth_sweep import main

if __name__ == "__main__":
    sys.exit(main())
