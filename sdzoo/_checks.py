"""Argument checks shared by models, training and export: one wording for every error."""
from __future__ import annotations

from typing import Iterable


def check_choice(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def check_survival_prob(name: str, value) -> float:
    """A survival probability is in (0, 1]: 1.0 keeps every block, 0 would remove the branch entirely."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (1.0 means constant depth); got {value!r}")
    return value
