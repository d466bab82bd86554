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
