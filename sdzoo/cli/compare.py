"""``sdzoo compare``: the paper's comparison, stochastic against constant depth for N seeds
(sdzoo.training.compare). Exit status: 0 done, 1 a run failed, 2 bad usage, 130 interrupted (rerun to continue).
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
    """The comparison's flags and the trainer's, which it passes on to every run, so that its help lists both;
    where both have a flag (--output, --device, --threads) the comparison's is the one it takes."""
    own = build_compare_parser()
    return argparse.ArgumentParser(prog=prog or own.prog, description=own.description, epilog=own.epilog,
                                   formatter_class=own.formatter_class, allow_abbrev=own.allow_abbrev,
                                   parents=[build_train_parser(), own], add_help=False, conflict_handler="resolve")


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    if asks_for_help(argv):
        build_parser(prog).parse_args(argv)
    return compare_main(argv)
