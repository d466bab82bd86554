"""``sdzoo train``: train a stochastic-depth ResNet with the paper's recipe. The flags live in
sdzoo.training.settings, the loop in sdzoo.training.train (exit status: 0 done, 2 bad usage or data, 3 the loss
became NaN or infinite, 130 interrupted)."""
from __future__ import annotations

import argparse
from typing import List, Optional

from sdzoo.training.settings import build_parser as build_train_parser
from sdzoo.training.train import main as train_main

HELP = "train a stochastic-depth ResNet with the paper's recipe (digits by default: offline, about a minute)"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = build_train_parser()
    parser.prog = prog or parser.prog
    return parser


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """The trainer's main, whose parser is ``build_parser``'s: it answers --help itself, as ``sdzoo train``."""
    return train_main(argv)
