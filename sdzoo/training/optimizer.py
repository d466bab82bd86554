"""SGD on every parameter, and MultiStepLR drops on the epochs where the authors' code dropped the lr."""
from __future__ import annotations

import math

import torch
from torch import nn

from sdzoo.training.settings import Settings

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: nn.Module, s: Settings) -> torch.optim.SGD:
    # One group: BN weights and biases decay too, as the authors' code flattens all parameters.
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, dampening=s.dampening,
                           nesterov=s.nesterov, weight_decay=s.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, s: Settings) -> torch.optim.lr_scheduler.MultiStepLR:
    # Epochs done when each drop takes effect. main.lua: lr 0.1 while epoch < f x E (epochs from 1);
    # fb.resnet.torch: while epoch <= f x E. Rounded as 0.6 x 50 is not exactly 30 in floating point.
    ats = [round(fraction * s.epochs, 9) for fraction in s.lr_drops]
    done = {max(1, math.ceil(at) - 1 if s.lr_drop_rule == "main.lua" else math.floor(at)) for at in ats}
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(done), gamma=s.lr_gamma)
