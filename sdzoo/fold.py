"""Fold the test-time rescaling of stochastic depth into the weights: the one place a model is folded.

At test time a block computes ``shortcut(x) + p_l * f_l(x)`` (``expectation`` scaling). f_l ends in an affine
layer (its last BatchNorm, or the conv it was fused into), and that layer times p_l is the same layer with its
weight and bias times p_l: folding scales it and sets every p_l to 1.
"""
from __future__ import annotations

import warnings
from typing import List

import torch
from torch import nn

__all__ = ["fold_survival", "is_folded", "can_fold", "BATCH_NORMS", "CONVS"]

# The affine layers a branch may end in, by their public classes (lazy ones become these at their first call).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_folded(model: nn.Module) -> bool:
    return getattr(model, "folded_from", None) is not None


def can_fold(model: nn.Module) -> bool:
    """True when folding would change anything: expectation scaling and at least one p_l below 1."""
    if is_folded(model) or getattr(model, "scaling", None) != "expectation":
        return False
    return any(blk.gate.survival_prob < 1.0 for blk in _residual_blocks(model))


@torch.no_grad()
def fold_survival(model: nn.Module) -> nn.Module:
    """Fold each block's survival probability into its branch, in place, and turn the gates off; returns the
    model. Its eval outputs stay the same (to float rounding), it is a plain ResNet in training too, and
    ``model.folded_from`` records the settings it was trained with.

    A folded state dict has no tensor that says so (it loads strictly into timm's ResNets), so what is known of
    the weights is the model's ``weights_provenance``: weights whose source said they are folded are refused,
    weights whose source said nothing are folded with a warning. Refused too (ValueError): a folded model,
    ``inverted`` scaling (no p_l in the eval graph), a branch that does not end in an affine layer.
    """
    blocks = _residual_blocks(model)
    if is_folded(model):
        raise ValueError(f"model is already folded (folded_from={model.folded_from!r}); folding twice would scale "
                         "each branch by p_l again")
    provenance = getattr(model, "weights_provenance", None)
    if provenance is not None and provenance.folded:
        raise ValueError(f"the model's weights are folded already: they came from {provenance.source}, which records "
                         f"folded_from={provenance.recorded.get('folded_from')!r}; folding twice would scale each "
                         "branch by p_l again")
    scaling = getattr(model, "scaling", "expectation")
    if scaling != "expectation":
        raise ValueError(f"scaling must be 'expectation' to fold; got {scaling!r}: with inverted scaling the eval "
                         "network has no p_l in it and is already a plain ResNet, there is nothing to fold")

    # Check every branch before touching any weight, so a refused fold leaves the model as it was.
    affines = [_last_affine(blk.branch_layers(), idx) for idx, blk in enumerate(blocks, start=1)]
    for blk, affine in zip(blocks, affines):
        affine.weight.mul_(blk.gate.survival_prob)  # times 1.0 is exact: a block with p_l = 1 is unchanged
        if affine.bias is not None:
            affine.bias.mul_(blk.gate.survival_prob)
        blk.gate.survival_prob = 1.0

    if provenance is not None and provenance.folded is None:
        warnings.warn(f"fold_survival: the model's weights came from {provenance.source}, which does not say whether "
                      "they are folded; if they are, they are now folded twice (each branch scaled by p_l again)",
                      stacklevel=3)

    # config.json's model_args and the weights' metadata read survival_settings: they rebuild the plain ResNet.
    model.survival_settings = model.survival_settings.folded()
    if provenance is not None:
        model.weights_provenance = type(provenance)("folded in place by fold_survival",
                                                    model.survival_settings.as_recorded())
    sampler = model.gate_sampler
    sampler.mode = "off"
    sampler.survival_probs = [1.0] * len(sampler.survival_probs)
    return model


def _residual_blocks(model: nn.Module):
    if not hasattr(model, "residual_blocks") or not hasattr(model, "survival_settings"):
        raise ValueError(f"model must be an sdzoo stochastic-depth model (with residual_blocks()); "
                         f"got {type(model).__name__}")
    return model.residual_blocks()


def _last_affine(layers: List[nn.Module], block_idx: int) -> nn.Module:
    """The branch's last layer but the Identity a fused BatchNorm leaves: an affine BatchNorm, or a conv."""
    last = next((layer for layer in reversed(layers) if not isinstance(layer, nn.Identity)), None)
    if isinstance(last, CONVS) or (isinstance(last, BATCH_NORMS) and last.affine):
        return last
    raise ValueError(
        f"residual block {block_idx}: the branch must end in an affine BatchNorm or a conv to fold p_l "
        f"into; it ends in {type(layers[-1]).__name__ if layers else 'nothing'}")
