"""Gates: which residual branches run in a training step, and how a branch is scaled.

Two pieces, used by every model in the zoo:

* ``GateSampler`` (one per model) rolls the dice for a step. It owns a seeded ``torch.Generator``, so the
  same seed gives the same gates on every run and on every data-parallel rank, and it runs outside any
  compiled graph so that torch.compile cannot bake one step's draws into the graph (pytorch issue 95425).
* ``ResidualGate`` (one per block) applies a draw: ``shortcut + b_l * f_l(x)``. A dropped branch is not
  computed at all, which is where stochastic depth saves its forward, backward and weight-gradient time.

Gate modes:
  ``batch``  one Bernoulli(p_l) draw per block per step for the whole mini-batch (the paper's).
  ``sample`` per-sample drop: a fixed number k_l = round(p_l * B) (at least 1) of the B samples run the
             branch, the others skip it; the branch is computed on the kept samples only, and shapes stay
             static. The kept share is k_l / B, which is p_l up to rounding: at small batches (p_l * B
             near 1) it can be far from p_l, so use ``batch`` mode there.
  ``off``    constant depth: every branch runs, p_l = 1.

Scalings:
  ``expectation`` no scaling in training, branch times p_l at eval (the paper's).
  ``inverted``    kept branch divided by p_l in training, identity at eval (timm's DropPath, torchvision).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._checks import check_choice, check_int, check_survival_prob

GATE_MODES = ("batch", "sample", "off")
SCALINGS = ("expectation", "inverted")


def kept_per_sample_count(survival_prob: float, batch_size: int) -> int:
    """Samples that run a block's branch in ``sample`` mode: fixed per block, so shapes are static."""
    return min(batch_size, max(1, int(survival_prob * batch_size + 0.5)))


class GateSampler(nn.Module):
    """Draws, once per training step, the gates of all residual blocks of a model.

    The draws happen in eager Python on the CPU (no device sync to decide a branch), from a generator
    the model owns. Nothing is drawn in eval mode or with gates off, so evaluation between epochs does
    not shift the training dice.
    """

    def __init__(self, survival_probs: Sequence[float], mode: str = "batch", seed: int = 0):
        super().__init__()
        check_choice("gate_mode", mode, GATE_MODES)
        self.survival_probs = [check_survival_prob("survival_probs", p) for p in survival_probs]
        self.mode = mode
        self.seed = check_int("gate_seed", seed, 0, 2**63 - 1)
        self.generator = torch.Generator().manual_seed(self.seed)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_blocks={len(self.survival_probs)}, seed={self.seed}"

    @property
    def active(self) -> bool:
        return self.training and self.mode != "off"

    def manual_seed(self, seed: int) -> None:
        self.seed = check_int("gate_seed", seed, 0, 2**63 - 1)
        self.generator.manual_seed(self.seed)

    def get_rng_state(self) -> Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    @torch.compiler.disable
    def draw(self, batch_size: int, device: torch.device) -> List[Optional[Tensor]]:
        """One gate per block: None (branch runs for all), a 0-dim CPU bool (batch), or kept indices (sample)."""
        num_blocks = len(self.survival_probs)
        if not self.active:
            return [None] * num_blocks
        if self.mode == "batch":
            keep = torch.rand(num_blocks, generator=self.generator) < torch.tensor(self.survival_probs)
            return list(keep.unbind(0))
        gates = []
        for survival_prob in self.survival_probs:
            count = kept_per_sample_count(survival_prob, batch_size)
            kept = torch.randperm(batch_size, generator=self.generator)[:count].sort().values
            gates.append(kept.to(device, non_blocking=True))
        return gates


class ResidualGate(nn.Module):
    """``shortcut + b_l * f_l(x)`` for one residual block, with the block's survival probability p_l."""

    def __init__(self, survival_prob: float = 1.0, scaling: str = "expectation"):
        super().__init__()
        check_choice("scaling", scaling, SCALINGS)
        self.survival_prob = check_survival_prob("survival_prob", survival_prob)
        self.scaling = scaling

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4f}, scaling={self.scaling!r}"

    def forward(self, branch: nn.Module, x: Tensor, shortcut: Tensor, gate: Optional[Tensor]) -> Tensor:
        survival_prob = self.survival_prob
        if not self.training or gate is None:
            out = branch(x)
            # A branch with p_l = 1 stays a plain add, so the eval graph is exactly a ResNet's.
            if not self.training and self.scaling == "expectation" and survival_prob < 1.0:
                out = out * survival_prob
            return shortcut + out
        scale = 1.0 / survival_prob if self.scaling == "inverted" and survival_prob < 1.0 else None
        if gate.dim() == 0:  # batch mode: the whole mini-batch keeps or skips the branch
            if torch.compiler.is_compiling():
                return _compiled_batch_gate(branch, x, shortcut, gate, scale)
            if not gate:
                return shortcut
            out = branch(x)
            return shortcut + (out if scale is None else out * scale)
        # sample mode: run the branch on the kept samples only and add it back in place. Inverted scaling
        # divides by the share actually kept, k_l / B, so the expected branch is exact at every batch size.
        out = branch(x.index_select(0, gate))
        if scale is not None:
            out = out * (x.shape[0] / gate.shape[0])
        return shortcut.index_add(0, gate, out.to(shortcut.dtype))


def _compiled_batch_gate(branch: nn.Module, x: Tensor, shortcut: Tensor, keep: Tensor, scale) -> Tensor:
    """The batch gate inside a compiled graph: ``torch.cond`` keeps the draw a runtime input, so the graph
    neither bakes the first step's dice in nor recompiles when they change, and a skipped branch still
    costs nothing (only the taken side of the cond runs, forward and backward).

    cond branches may not mutate their inputs, but BatchNorm updates its running statistics in place.
    The branch therefore runs on copies of its buffers, returns the updated copies, and they are written
    back outside the cond; a skipped branch returns its statistics unchanged.
    """
    float_names = [n for n, b in branch.named_buffers() if b.is_floating_point()]
    float_buffers = [b for n, b in branch.named_buffers() if b.is_floating_point()]
    counters = {n: b for n, b in branch.named_buffers() if not b.is_floating_point()}
    counter_copies = {n: c.clone() for n, c in counters.items()}

    def run_branch(x, shortcut, *buffers):
        state = {n: b.clone() for n, b in zip(float_names, buffers)}
        state.update({n: c.clone() for n, c in counter_copies.items()})
        out = functional_call(branch, state, (x,), strict=False)
        if scale is not None:
            out = out * scale
        return (shortcut + out, *[state[n] for n in float_names])

    def skip_branch(x, shortcut, *buffers):
        return (shortcut.clone(), *[b.clone() for b in buffers])

    # Operands are copies: the write-back below must not touch tensors that autograd saved.
    results = torch.cond(keep, run_branch, skip_branch, (x, shortcut, *[b.clone() for b in float_buffers]))
    with torch.no_grad():
        for buffer, updated in zip(float_buffers, results[1:]):
            buffer.copy_(updated.detach())
        for counter in counters.values():
            counter.add_(keep.to(counter.dtype))
    return results[0]
