"""What the commands share: the exit status of a wrong argument and how it is reported."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from sdzoo.files import checks

# argparse's own status for a wrong flag; every command uses it for a wrong argument it finds later too.
EXIT_USAGE = 2
# The model names that bring their weights and settings with them (timm's pretrained sources).
HUB_PREFIXES = ("local-dir:", "hf-hub:")


def usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    """Exit with EXIT_USAGE and one line that names the argument at fault, as argparse reports a wrong flag."""
    parser.exit(EXIT_USAGE, f"{parser.prog}: error: {message}\n")


def parse_keeping_parser(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The parsed flags, holding their parser (``args.parser``) so that ``fail`` reports an error found later."""
    args = parser.parse_args(argv)
    args.parser = parser
    return args


def fail(args: argparse.Namespace, message: str) -> None:
    """``usage_error`` for flags parsed by ``parse_keeping_parser``."""
    usage_error(args.parser, message)


def check_output_path(parser: argparse.ArgumentParser, flag: str, path: Path, kind: str = "file") -> None:
    """``sdzoo.files.checks.check_output_path`` as a usage error of the command."""
    try:
        checks.check_output_path(flag, path, kind)
    except ValueError as err:
        usage_error(parser, str(err))


def first_paragraph(doc: str) -> str:
    """A module docstring's first paragraph: the description of its command."""
    return doc.split("\n\n")[0]


def asks_for_help(argv: Optional[Sequence[str]]) -> bool:
    """Whether a command line asks for help (-h or --help), as argparse answers it wherever it stands."""
    return any(arg in ("-h", "--help") for arg in (sys.argv[1:] if argv is None else argv))
