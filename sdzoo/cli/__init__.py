"""The command line: ``sdzoo COMMAND ...`` (installed with the wheel), ``python -m sdzoo COMMAND ...``, and the
scripts in scripts/, each of which runs one command with the same flags.

One module per command (``train``, ``export``, ...), each with ``build_parser(prog)`` (its flags, written once)
and ``main(argv, prog)``; ``build_parser()`` here holds every command as a subcommand, with the flags of its
module's parser, and ``main`` runs the command named first.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from types import ModuleType
from typing import Dict, List, Optional

from sdzoo.cli.common import EXIT_USAGE

__all__ = ["build_parser", "main", "command", "COMMANDS", "SCRIPTS", "PROG"]

PROG = "sdzoo"
# Each command and its module in sdzoo.cli.
COMMANDS: Dict[str, str] = {"train": "train", "export": "export", "push": "push", "bench": "bench",
                            "coverage": "coverage", "demo": "demo", "compare": "compare", "depth-sweep": "depth_sweep"}
# The scripts of scripts/ and the command each runs (same flags, same exit status).
SCRIPTS: Dict[str, str] = {"train.py": "train", "export_onnx.py": "export", "push_to_hub.py": "push",
                           "benchmark.py": "bench", "drop_path_coverage.py": "coverage", "run_digits.py": "demo",
                           "compare.py": "compare", "depth_sweep.py": "depth-sweep"}


def command(name: str) -> ModuleType:
    """The module of command ``name``, imported when it runs: ``sdzoo train`` (each torchrun rank, each run of
    ``sdzoo compare``) then loads neither onnx and onnxruntime nor the Hub client, which other commands need."""
    return importlib.import_module(f"sdzoo.cli.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    """``sdzoo`` and its subcommands, each with exactly the flags of its command's own parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Stochastic-depth ResNets for timm: train, export to ONNX, publish, measure.",
        epilog=f"'{PROG} COMMAND --help' lists the flags of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('sdzoo')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = command(name)
        own = module.build_parser(prog=f"{PROG} {name}")
        # parents: the subcommand takes the command's flags as its parser defines them (argparse copies them)
        commands.add_parser(name, parents=[own], add_help=False, help=module.HELP, description=own.description,
                            epilog=own.epilog, formatter_class=own.formatter_class, allow_abbrev=own.allow_abbrev)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``sdzoo COMMAND ARGS``; returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return command(argv[0]).main(argv[1:], prog=f"{PROG} {argv[0]}")
    # No command, an unknown one, --help or --version: argparse answers (help and version exit 0, the rest 2).
    build_parser().parse_args(argv)
    return EXIT_USAGE
