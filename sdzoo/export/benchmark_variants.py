"""The model variants that ``sdzoo bench`` times against each other (its --help says what each is), and the FLOPs
they execute: one architecture and the same per-block survival probabilities, each library's way of dropping a
block; and, for timm's own drop-path models (``CONVERT_VARIANTS``), timm's mask against ``sdzoo.convert_drop_path``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm.layers import DropPath

from sdzoo.convert import convert_drop_path
from sdzoo.gate import ResidualGate
from sdzoo.survival import survival_probs

VARIANTS = ["constant depth", "sdzoo batch", "sdzoo batch, no grads", "sdzoo sample", "timm DropPath",
            "torchvision SD batch", "torchvision SD row"]
CONVERT_VARIANTS = ["timm DropPath (mask)", "sdzoo sample", "sdzoo batch"]


class MaskGate(ResidualGate):
    """A gate that computes every branch and multiplies it by a random mask (timm, torchvision)."""

    def __init__(self, survival_prob: float, drop: nn.Module):
        super().__init__(survival_prob, scaling="inverted")
        self.drop = drop

    def forward(self, branch, shortcut, *inputs):
        return shortcut + self.drop(branch(*inputs))


def build_variant(model_name: str, variant: str, survival_prob: float, seed: int) -> nn.Module:
    """The same architecture and per-block survival probabilities, with each library's way of dropping."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    torch.manual_seed(seed)
    if variant == "constant depth":
        return timm.create_model(model_name, gate_mode="off")
    if variant.startswith("sdzoo"):
        model = timm.create_model(model_name, gate_mode=variant.split()[1].rstrip(","),
                                  survival_prob=survival_prob, gate_seed=seed)
        for blk in model.residual_blocks():
            blk.gate.zero_grad_skipped = not variant.endswith("no grads")
        return model
    model = timm.create_model(model_name, gate_mode="off")
    probs = survival_probs(len(model.residual_blocks()), survival_prob)
    for blk, p in zip(model.residual_blocks(), probs):
        if variant == "timm DropPath":
            drop = DropPath(1.0 - p)
        else:
            from torchvision.ops import StochasticDepth
            drop = StochasticDepth(1.0 - p, mode=variant.split()[-1])
        blk.gate = MaskGate(p, drop)
    return model


def build_timm_variant(model_name: str, variant: str, rate: float, img_size: int, seed: int,
                       uniform: bool, device=None) -> nn.Module:
    """timm's model built with drop_path_rate (its mask), or the same weights converted by sdzoo."""
    if variant not in CONVERT_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(CONVERT_VARIANTS)}; got {variant!r}")
    torch.manual_seed(seed)
    try:  # transformers fix their input size at build time; convnets take any
        model = timm.create_model(model_name, drop_path_rate=rate, num_classes=10, device=device, img_size=img_size)
    except TypeError:
        model = timm.create_model(model_name, drop_path_rate=rate, num_classes=10, device=device)
    if uniform:  # every branch at the rate itself: the per-branch break-even
        for m in model.modules():
            if isinstance(m, DropPath):
                m.drop_prob = rate
    if variant.startswith("sdzoo"):
        convert_drop_path(model, mode=variant.split()[1], seed=seed, min_drop_rate=0.0)
    return model.train()


def flops_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Executed forward + backward FLOPs per image, averaged over `steps` steps (each rolls new dice)."""
    total = 0
    for _ in range(steps):
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), y).backward()
        total += counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    return total / steps / x.shape[0]
