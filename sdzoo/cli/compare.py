"""``sdzoo compare``: the paper's comparison, the same network trained with stochastic depth and at constant
depth for N seeds (sdzoo.training.compare). Flags it does not know go to every training run: its parser here
holds the trainer's flags too, so that its help lists them.

    sdzoo compare --output runs/fmnist-compare --dataset fashion_mnist

Exit status: 0 done, 1 a run failed, 2 bad usage, 130 interrupted (rerun to continue).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from sdzoo.cli.common import asks_for_help
from sdzoo.training.compare import build_compare_parser
from sdzoo.training.compare import main as compare_main
from sdzoo.training.settings import build_parser as build_train_parser

HELP = "train the same network with stochastic depth and at constant depth for N seeds, and compare them"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The comparison's own flags, then the trainer's that it passes on to every run; where both have a flag
    (--output, --device, --threads) the comparison's is the one it takes."""
    own = build_compare_parser()
    return argparse.ArgumentParser(prog=prog or own.prog, description=own.description, epilog=own.epilog,
                                   formatter_class=own.formatter_class, allow_abbrev=own.allow_abbrev,
                                   parents=[build_train_parser(), own], add_help=False, conflict_handler="resolve")


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """The comparison's main; ``prog`` names the command in its help."""
    if asks_for_help(argv):
        build_parser(prog).parse_args(argv)
    return compare_main(argv)
