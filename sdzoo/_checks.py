"""Argument checks shared by models, training and export: one wording for every error."""
from __future__ import annotations

from typing import Iterable


def check_choice(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def check_int(name: str, value, low: int = 0, high: int = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
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
