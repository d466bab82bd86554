"""Argument checks shared by models, training and export: one wording for every error."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence, Tuple

# The longest wait a timeout may ask for (11.6 days): the sockets and clocks it reaches overflow far below 1e308.
MAX_SECONDS = 1_000_000


def error_line(error: BaseException, width: int = 240, lines: int = 1) -> str:
    """``TypeName: message``, how one error is quoted inside another: its first ``lines`` lines (torch's
    strict-load error lists every key, hundreds for a deep model), each cut at ``width``."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    quoted = " ".join(line[:width] for line in text[:lines])
    if len(text) > lines > 1:
        quoted += f" ... ({len(text) - lines} more lines)"
    return f"{type(error).__name__}: {quoted}" if quoted else type(error).__name__


def check_choice(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def check_int(name: str, value, low: int = 0, high: int = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}; got {value!r:.200}")
    return value


def check_survival_prob(name: str, value) -> float:
    """A survival probability is in (0, 1]: 1.0 keeps every block, 0 would remove the branch entirely."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (1.0 means constant depth); got {value!r}")
    return value


def check_fraction(name: str, value, include_one: bool = True) -> float:
    """A number in [0, 1] (or [0, 1) without ``include_one``): a rate, a share, a fraction of training."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not (0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a number in [0, {'1]' if include_one else '1)'}; got {value!r}")
    return float(value)


def check_seconds(name: str, value) -> float:
    """A positive, finite number of seconds up to ``MAX_SECONDS`` (inf and nan bound nothing)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value <= MAX_SECONDS:
        hint = ""
        if isinstance(value, float) and not math.isfinite(value):
            hint = " (inf and nan bound nothing: give a finite number)"
        elif number and value > MAX_SECONDS:
            hint = f" (at most {MAX_SECONDS:,})"
        raise ValueError(f"{name} must be a positive number of seconds; got {value!r}{hint}")
    return float(value)


def check_input_size(name: str, value, min_side: int = 1, max_side: int = None) -> Tuple[int, int, int]:
    """A model input's (channels, height, width), with height and width in [``min_side``, ``max_side``]."""
    try:
        size = tuple(int(s) for s in value)
    except (TypeError, ValueError, OverflowError):
        size = ()
    if len(size) != 3 or size[0] < 1 or min(size[1:]) < min_side or (max_side is not None and max(size[1:]) > max_side):
        sides = "" if min_side == 1 else f", height and width >= {min_side}"
        if max_side is not None:
            sides += f", height and width <= {max_side}"
        raise ValueError(f"{name} must be (channels, height, width) of positive integers{sides}; got {value!r:.200}")
    return size


def and_list(names: Sequence[str]) -> str:
    """``a, b and c``: names as a message lists them."""
    names = list(names)
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1]))) if names else ""


def check_output_path(name: str, path, kind: str = "file") -> None:
    """Refuse, before any work is done, an output ``path`` (a ``"file"`` or a ``"folder"``) that cannot be
    written: the wrong kind already there, a file where a parent folder must be, or no write permission."""
    path = Path(path)
    if path.exists() and path.is_dir() != (kind == "folder"):
        raise ValueError(f"{name} {path} is a {'folder' if path.is_dir() else 'file'}; give a {kind}")
    existing = next(p for p in [*([path] if kind == "folder" else []), *path.parents] if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{name} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path}: {existing} is not writable")
