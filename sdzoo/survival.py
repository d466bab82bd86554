"""Survival schedules: the probability p_l that residual block l runs during a training step.

Huang et al. (2016), eq. 4: the linear decay rule ``p_l = 1 - (l / L) * (1 - p_L)`` for l = 1..L, where L
counts every residual block (downsampling blocks included) and p_0 = 1 is the input. The uniform rule
uses ``p_l = p_L`` for every block. This module is the only place these numbers are computed.
"""
from __future__ import annotations

from typing import List

from ._checks import check_choice, check_fraction, check_survival_prob

SURVIVAL_RULES = ("linear", "uniform")


def survival_probs(num_blocks: int, survival_prob: float = 0.5, rule: str = "linear") -> List[float]:
    """Per-block survival probabilities p_1..p_L for ``num_blocks`` residual blocks.

    ``survival_prob`` is p_L, the survival probability of the last block (1.0 is constant depth).
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer; got {num_blocks!r}")
    survival_prob = check_survival_prob("survival_prob", survival_prob)
    check_choice("survival_rule", rule, SURVIVAL_RULES)
    if rule == "uniform":
        return [survival_prob] * num_blocks
    # Hand-written, not timm's calculate_drop_path_rates: that is linspace(0, r, L), which leaves block 1 at drop
    # rate 0, where the paper's l / L gives it (1 - p_L) / L.
    return [1.0 - (block / num_blocks) * (1.0 - survival_prob) for block in range(1, num_blocks + 1)]


def expected_depth(num_blocks: int, survival_prob: float = 0.5, rule: str = "linear") -> float:
    """Expected number of residual blocks that run in a training step (ResNet-110, p_L=0.5: 40.25)."""
    return sum(survival_probs(num_blocks, survival_prob, rule))


def drop_warmup_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Share of the target drop rates in effect at ``step`` (0-based) of ``total_steps``: a linear ramp from
    0 to 1 over the first ``warmup_fraction`` of training, then 1 (Composer's ``drop_warmup``)."""
    warmup_steps = check_fraction("warmup_fraction", warmup_fraction) * total_steps
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)
