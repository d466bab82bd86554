"""A real skip for timm's own drop-path models: ``convert_drop_path`` moves their DropPath'd residuals onto the
zoo's gates (``sdzoo.gate``), in place.

timm's DropPath computes a branch for the whole batch and then multiplies it by a random mask, so a dropped
branch costs as much as a kept one. A converted block is the same module with another forward, so the state
dict, and with it timm's checkpoints, do not change. Each block family is one adapter (``ADAPTERS``): the block
class, the names of its DropPath slots, and a forward that hands each residual's branch to its gate. A branch
whose rate is below ``min_drop_rate`` stays timm's mask: there the real skip's gather and scatter cost more than
the branch time they save (``BREAK_EVEN_DROP_RATE``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from timm.layers import DropPath
from timm.models.convnext import ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block as ViTBlock

from ._checks import check_choice, check_fraction, check_int
from .gate import GateSampler, ResidualGate, run_branch

__all__ = ["convert_drop_path", "CONVERT_MODES", "BREAK_EVEN_DROP_RATE", "ADAPTERS", "DropPathGate",
           "DropPathSampler"]

CONVERT_MODES = ("sample", "batch")
# Below this per-branch rate a branch stays timm's mask. On a 2-core CPU, ViT-Tiny, sample mode broke even at
# about 0.03 and batch mode was faster at every rate measured, 0.02 included (README, "Real skip for timm's
# drop-path models"); not measured on a GPU: scripts/benchmark.py --convert MODEL --uniform-rate measures it.
BREAK_EVEN_DROP_RATE = 0.05


class DropPathSampler(GateSampler):
    """The model's gate sampler, for blocks that timm's forward calls without gates.

    A converted model's forward is timm's, which passes no gates down, so each branch takes its own gate
    from here. All gates of a step are drawn at once, when the first branch asks; a step starts when a
    branch asks again (the next forward), except during the backward pass, where activation checkpointing
    recomputes blocks with the gates they ran with.
    """

    def __init__(self, survival_probs: Sequence[float], mode: str, seed: int):
        # Batch gates carry their inverted scale as a tensor: no rate is ever a constant of a compiled graph.
        super().__init__(survival_probs, mode, seed, scale_in_gate=True)
        self.gates: Optional[List[Optional[Tensor]]] = None  # the step's draws
        self._taken: set = set()
        # timm's masks left below min_drop_rate, with their target rates, for the warmup to ramp as well.
        self.masks: List[Tuple[DropPath, float]] = []

    def set_drop_rate_factor(self, factor: float) -> None:
        super().set_drop_rate_factor(factor)
        for mask, target in self.masks:  # timm's float rate: under torch.compile a change recompiles
            mask.drop_prob = factor * target

    @torch.compiler.disable
    def take(self, index: int, batch_size: int, device: torch.device) -> Optional[Tensor]:
        """Branch ``index``'s gate for this step (drawing the step's gates first when a new step begins)."""
        in_backward = torch._C._current_graph_task_id() != -1  # checkpoint recompute: keep the step's gates
        if self.gates is None or (index in self._taken and not in_backward):
            self.gates = self.draw(batch_size, device)
            self._taken = set()
        self._taken.add(index)
        return self.gates[index]


class DropPathGate(ResidualGate):
    """timm's DropPath slot, converted: the zoo's gate (inverted scaling), fed by the model's sampler."""

    def __init__(self, drop_prob: float, index: int, sampler: DropPathSampler):
        super().__init__(1.0 - drop_prob, scaling="inverted")
        self.index = index
        # A reference, not a child module: the sampler belongs to the model root (one generator per model).
        object.__setattr__(self, "sampler", sampler)

    @property
    def drop_prob(self) -> float:
        """timm's name for the branch's target rate."""
        return 1.0 - self.survival_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}, mode={self.sampler.mode!r}, index={self.index}"

    def forward(self, branch: Sequence[nn.Module], x: Tensor, shortcut: Tensor) -> Tensor:
        gate = self.sampler.take(self.index, x.shape[0], x.device) if self.training else None
        return super().forward(branch, x, shortcut, gate)


def residual(slot: nn.Module, branch: Sequence, x: Tensor, shortcut: Tensor) -> Tensor:
    """``shortcut + slot(f(x))``: through the gate when the slot was converted, else timm's own mask (or
    Identity) on the whole branch, computed as timm computes it."""
    if isinstance(slot, DropPathGate):
        return slot(branch, x, shortcut)
    return shortcut + slot(run_branch(branch, x))


class BranchFn:
    """One step of a branch that is not a module of its own (ConvNeXt's permutes and layer-scale gamma),
    with the parameters it uses, so a skipped branch still gives them zero gradients. No buffers."""

    def __init__(self, fn: Callable[[Tensor], Tensor], params: Sequence[nn.Parameter] = ()):
        self.fn = fn
        self.params = [p for p in params if p is not None]

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def parameters(self):
        return iter(self.params)

    def named_buffers(self):
        return iter(())

    def buffers(self):
        return iter(())


# -- adapters: one per family ------------------------------------------------------------------------
class GatedResNetBlock:
    """timm's ResNet BasicBlock / Bottleneck: branch, (SE), drop path, + shortcut, then the last act."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        if isinstance(self, Bottleneck):
            branch = [self.conv1, self.bn1, self.act1, self.conv2, self.bn2, self.drop_block, self.act2,
                      self.aa, self.conv3, self.bn3]
            last_act = self.act3
        else:
            branch = [self.conv1, self.bn1, self.drop_block, self.act1, self.aa, self.conv2, self.bn2]
            last_act = self.act2
        if self.se is not None:
            branch.append(self.se)
        return last_act(residual(self.drop_path, branch, x, shortcut))


class GatedConvNeXtBlock:
    """timm's ConvNeXtBlock: dw conv, norm, MLP, layer-scale gamma (all in the branch), drop path, + shortcut."""

    def forward(self, x: Tensor) -> Tensor:
        branch = [self.conv_dw, self.norm, self.mlp] if self.use_conv_mlp else \
            [self.conv_dw, BranchFn(lambda t: t.permute(0, 2, 3, 1)), self.norm, self.mlp,
             BranchFn(lambda t: t.permute(0, 3, 1, 2))]
        if self.gamma is not None:
            gamma = self.gamma
            branch.append(BranchFn(lambda t: t.mul(gamma.reshape(1, -1, 1, 1)), [gamma]))
        return residual(self.drop_path, branch, x, self.shortcut(x))


class GatedViTBlock:
    """timm's ViT / DeiT Block: attention and MLP residuals (with layer scale ls1 / ls2), each its own gate."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        attn = self.attn if attn_mask is None and not is_causal else \
            BranchFn(lambda t: self.attn(t, attn_mask=attn_mask, is_causal=is_causal), list(self.attn.parameters()))
        x = residual(self.drop_path1, [self.norm1, attn, self.ls1], x, x)
        return residual(self.drop_path2, [self.norm2, self.mlp, self.ls2], x, x)


@dataclass(frozen=True)
class Adapter:
    """How one family's block is converted: its timm class, its DropPath slots, and the gated forward."""
    family: str
    block: type
    slots: Tuple[str, ...]
    forward: type  # a mixin whose ``forward`` replaces the block's
    # The activation applied after the residual add, if any: a skipped branch returns the block's input itself,
    # which that activation must not overwrite in place.
    act_after_add: Optional[str] = None


ADAPTERS: List[Adapter] = [
    Adapter("ResNet (timm.models.resnet BasicBlock, Bottleneck)", BasicBlock, ("drop_path",), GatedResNetBlock,
            act_after_add="act2"),
    Adapter("ResNet (timm.models.resnet BasicBlock, Bottleneck)", Bottleneck, ("drop_path",), GatedResNetBlock,
            act_after_add="act3"),
    Adapter("ConvNeXt (ConvNeXtBlock)", ConvNeXtBlock, ("drop_path",), GatedConvNeXtBlock),
    Adapter("ViT / DeiT (timm.models.vision_transformer.Block)", ViTBlock, ("drop_path1", "drop_path2"),
            GatedViTBlock),
]

_GATED_CLASSES: Dict[type, type] = {}


def _gated_class(adapter: Adapter) -> type:
    """``Gated<Block>``: the timm block class with the adapter's forward, made once per class."""
    if adapter.block not in _GATED_CLASSES:
        _GATED_CLASSES[adapter.block] = type(f"Gated{adapter.block.__name__}", (adapter.forward, adapter.block),
                                             {"__module__": __name__})
    return _GATED_CLASSES[adapter.block]


def supported_families() -> str:
    return "; ".join(dict.fromkeys(a.family for a in ADAPTERS))


def _adapter_for(module: nn.Module) -> Optional[Adapter]:
    return next((a for a in ADAPTERS if type(module) is a.block or type(module) is _GATED_CLASSES.get(a.block)),
                None)


def convert_drop_path(model: nn.Module, mode: str = "sample", seed: int = 0,
                      min_drop_rate: float = BREAK_EVEN_DROP_RATE) -> nn.Module:
    """Give a timm model built with ``drop_path_rate`` a real skip, in place; returns the model.

    Args:
        model: a timm model whose residual blocks hold DropPath layers (``drop_path_rate > 0``).
        mode: "sample" (DINOv2's fixed-size subset of round(keep * B) samples) or "batch" (one gate per
            branch for the whole batch). Both scale a kept branch as timm does (divided by the kept share).
        seed: seed of the model's gate generator: the same seed gives the same gates on every run and rank.
        min_drop_rate: a branch whose drop rate is below this stays timm's mask, where the real skip does not
            pay (default: ``BREAK_EVEN_DROP_RATE``; 0 converts every DropPath'd branch).

    Raises ValueError when the model has no DropPath with a positive rate, or when one sits in a block no
    adapter knows (the message lists the supported families).
    """
    check_choice("mode", mode, CONVERT_MODES)
    check_int("seed", seed, 0, 2**63 - 1)
    check_fraction("min_drop_rate", min_drop_rate, include_one=False)
    if any(isinstance(m, DropPathSampler) for m in model.modules()):
        raise ValueError("model is already converted (it has a drop_path_sampler)")

    # Every DropPath must sit in a block an adapter knows: a silently unconverted family would keep paying.
    slots: List[Tuple[nn.Module, Adapter, str, float]] = []
    owned = set()
    for block in model.modules():
        adapter = _adapter_for(block)
        if adapter is None:
            continue
        for name in adapter.slots:
            slot = getattr(block, name, None)
            if isinstance(slot, DropPath):
                owned.add(id(slot))
                if slot.drop_prob > 0:
                    slots.append((block, adapter, name, float(slot.drop_prob)))
    stray = [name for name, m in model.named_modules() if isinstance(m, DropPath) and id(m) not in owned]
    if stray:
        raise ValueError(
            f"convert_drop_path has no adapter for the block holding {stray[0]!r} ({type(model).__name__}); "
            f"supported: {supported_families()}")
    if not slots:
        raise ValueError(
            f"nothing to convert in {type(model).__name__}: no DropPath with a positive rate (build it with "
            f"drop_path_rate > 0); supported: {supported_families()}")

    converted = [(block, adapter, name, rate) for block, adapter, name, rate in slots if rate >= min_drop_rate]
    sampler = DropPathSampler([1.0 - rate for *_, rate in converted], mode, seed)
    sampler.masks = [(getattr(block, name), rate) for block, _, name, rate in slots if rate < min_drop_rate]
    model.drop_path_sampler = sampler
    for index, (block, adapter, name, rate) in enumerate(converted):
        setattr(block, name, DropPathGate(rate, index, sampler))
        if type(block) is adapter.block:
            # Same module, another forward: every attribute and the state-dict layout stay timm's.
            block.__class__ = _gated_class(adapter)
        act = getattr(block, adapter.act_after_add) if adapter.act_after_add else None
        if hasattr(act, "inplace"):
            act.inplace = False
    sampler.train(model.training)
    return model
