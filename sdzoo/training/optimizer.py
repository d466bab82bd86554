"""The optimizer and the learning-rate schedule of a run: SGD on every parameter, and MultiStepLR drops on the
epochs where the authors' code dropped the lr (``lr_drop_rule``)."""
from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from sdzoo.training.settings import Settings

__all__ = ["build_optimizer", "lr_milestones", "build_scheduler"]


def build_optimizer(model: nn.Module, s: Settings) -> torch.optim.SGD:
    # One group: BN weights and biases decay too, as the authors' code flattens all parameters.
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, dampening=s.dampening,
                           nesterov=s.nesterov, weight_decay=s.weight_decay)


def lr_milestones(s: Settings) -> List[int]:
    """Epochs done when each lr drop takes effect (MultiStepLR's milestones), by ``lr_drop_rule``."""
    milestones = set()
    for fraction in s.lr_drops:
        at = round(fraction * s.epochs, 9)  # 0.6 x 50 is not exactly 30 in floating point
        # main.lua: lr 0.1 while epoch < f x E (epochs from 1); fb.resnet.torch: while epoch <= f x E.
        done = math.ceil(at) - 1 if s.lr_drop_rule == "main.lua" else math.floor(at)
        milestones.add(max(1, done))
    return sorted(milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, s: Settings):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_milestones(s), gamma=s.lr_gamma)
