"""Gates: which residual branches run in a training step, and how a branch is scaled (the models'
``gate_mode`` and ``scaling`` arguments).

* ``GateSampler`` (one per model) draws a step's gates from its own seeded ``torch.Generator``, so that every
  run and every data-parallel rank draws the same ones. It runs outside any compiled graph, so that
  torch.compile cannot bake one step's draws into the graph (pytorch issue 95425).
* ``ResidualGate`` (one per block) applies a draw, ``shortcut + b_l * f_l(x)``; a dropped branch is not
  computed at all, which is where stochastic depth saves its time.

``sample`` mode runs the branch on a fixed k_l = round(p_l * B) (at least 1) of the B samples, so that shapes
stay static; at small batches the kept share k_l / B can be far from p_l. The drop rates, warm-up included
(``set_drop_rate_factor``), stay out of any compiled graph too: the sampler draws with them on the CPU, and a
batch gate carries its inverted scale as a 0-dim tensor (0 when the branch is skipped) instead of a Python
float the graph would bake in.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._checks import check_choice, check_fraction, check_int, check_survival_prob

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

    def __init__(self, survival_probs: Sequence[float], mode: str = "batch", seed: int = 0,
                 scale_in_gate: bool = False):
        super().__init__()
        check_choice("gate_mode", mode, GATE_MODES)
        self.survival_probs = [check_survival_prob("survival_probs", p) for p in survival_probs]
        self.mode = mode
        self.seed = check_int("gate_seed", seed, 0, 2**63 - 1)
        self.generator = torch.Generator().manual_seed(self.seed)
        # Share of each block's drop rate in effect (drop-rate warmup); 1.0: the targets.
        self.drop_rate_factor = 1.0
        # Batch gates as 0-dim floats holding 1/p_l in effect (0: skipped), so a moving rate never enters a
        # compiled graph as a constant. Off by default: the zoo's gates stay the bools they always were.
        self.scale_in_gate = scale_in_gate
        # The gates of the last training draw and its batch size, for logs (the depth a step ran at).
        self.last_draw: Optional[Tuple[List[Optional[Tensor]], int]] = None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_blocks={len(self.survival_probs)}, seed={self.seed}"

    @property
    def active(self) -> bool:
        return self.training and self.mode != "off"

    def manual_seed(self, seed: int) -> None:
        self.seed = check_int("gate_seed", seed, 0, 2**63 - 1)
        self.generator.manual_seed(self.seed)

    def set_drop_rate_factor(self, factor: float) -> None:
        """Put ``factor`` (in [0, 1]) of every target drop rate in effect, from the next draw on."""
        self.drop_rate_factor = check_fraction("drop_rate_factor", factor)
        self.scale_in_gate = True  # from now on the rate moves: keep it out of the graph

    def current_survival_probs(self) -> List[float]:
        """The p_l the next draw uses: the targets, or with a warmup factor f, 1 - f (1 - p_l)."""
        if self.drop_rate_factor == 1.0:
            return list(self.survival_probs)
        return [1.0 - self.drop_rate_factor * (1.0 - p) for p in self.survival_probs]

    def get_rng_state(self) -> Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    @torch.compiler.disable
    def draw(self, batch_size: int, device: torch.device) -> List[Optional[Tensor]]:
        """One gate per block: None (branch runs for all), a 0-dim CPU bool (batch), or kept indices (sample).

        With ``scale_in_gate`` a batch gate is a 0-dim CPU float instead: 1/p_l when kept, 0 when skipped.
        """
        gates = self._draw(batch_size, device) if self.active else [None] * len(self.survival_probs)
        if self.training:  # what the last training step ran (constant depth too); eval draws nothing
            self.last_draw = (gates, batch_size)
        return gates

    def _draw(self, batch_size: int, device: torch.device) -> List[Tensor]:
        probs = self.current_survival_probs()
        if self.mode == "batch":
            probs = torch.tensor(probs)
            keep = torch.rand(len(probs), generator=self.generator) < probs
            if self.scale_in_gate:
                return list(torch.where(keep, 1.0 / probs, 0.0).to(torch.float32).unbind(0))
            return list(keep.unbind(0))
        gates = []
        for survival_prob in probs:
            count = kept_per_sample_count(survival_prob, batch_size)
            kept = torch.randperm(batch_size, generator=self.generator)[:count].sort().values
            kept = kept.to(device, non_blocking=True)
            if self.drop_rate_factor != 1.0:
                # The kept count follows the moving rate: a dynamic size, not a recompile per count.
                torch._dynamo.maybe_mark_dynamic(kept, 0)
            gates.append(kept)
        return gates


class ResidualGate(nn.Module):
    """``shortcut + b_l * f_l(x)`` for one residual block, with the block's survival probability p_l.

    The branch f_l is given as its layers in order (the block's own modules), so the block keeps timm's
    state-dict layout (``layer1.0.conv1``, ``layer1.0.downsample``) and the gate can run the branch with
    substitute buffers under torch.compile.

    A skipped branch runs no forward and no backward, but every one of its parameters still receives a
    gradient: zeros. This is what torch.compile gives (the untaken side of ``torch.cond``) and what the
    authors' optimizer saw, so eager and compiled training agree, weight decay and momentum move skipped
    blocks with any optimizer, and DistributedDataParallel works without ``find_unused_parameters``.
    ``zero_grad_skipped=False`` leaves a skipped branch's gradients missing instead (the cost is compared in
    scripts/benchmark.py).
    """

    def __init__(self, survival_prob: float = 1.0, scaling: str = "expectation", zero_grad_skipped: bool = True):
        super().__init__()
        check_choice("scaling", scaling, SCALINGS)
        self.survival_prob = check_survival_prob("survival_prob", survival_prob)
        self.scaling = scaling
        self.zero_grad_skipped = zero_grad_skipped

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4f}, scaling={self.scaling!r}"

    def forward(self, branch: Sequence[nn.Module], x: Tensor, shortcut: Tensor, gate: Optional[Tensor]) -> Tensor:
        survival_prob = self.survival_prob
        if not self.training or gate is None:
            out = run_branch(branch, x)
            # A branch with p_l = 1 stays a plain add, so the eval graph is exactly a ResNet's.
            if not self.training and self.scaling == "expectation" and survival_prob < 1.0:
                out = out * survival_prob
            return shortcut + out
        scale = 1.0 / survival_prob if self.scaling == "inverted" and survival_prob < 1.0 else None
        if gate.dim() == 0:  # batch mode: the whole mini-batch keeps or skips the branch
            if gate.is_floating_point():  # the gate carries the inverted scale in effect (see GateSampler)
                scale = gate if self.scaling == "inverted" else None
                gate = gate > 0
            if torch.compiler.is_compiling():
                return _compiled_batch_gate(branch, x, shortcut, gate, scale)
            if not gate:
                return self._skip(branch, shortcut)
            out = run_branch(branch, x)
            return shortcut + (out if scale is None else out * scale)
        # sample mode: run the branch on the kept samples only and add it back in place. Inverted scaling
        # divides by the share actually kept, k_l / B, so the expected branch is exact at every batch size.
        out = run_branch(branch, x.index_select(0, gate))
        if scale is not None:
            out = out * (x.shape[0] / gate.shape[0])
        return shortcut.index_add(0, gate, out.to(shortcut.dtype))

    def _skip(self, branch: Sequence[nn.Module], shortcut: Tensor) -> Tensor:
        params = [p for layer in branch for p in layer.parameters() if p.requires_grad]
        if not self.zero_grad_skipped or not params or not torch.is_grad_enabled():
            return shortcut
        return skipped_branch(shortcut, *params)


@torch.fx.wrap  # a leaf in torch.fx graphs (timm's and torchvision's feature extractors), so its backward runs
def skipped_branch(shortcut: Tensor, *params: Tensor) -> Tensor:
    """The shortcut, with a zero gradient for each of ``params`` in the backward pass."""
    return _SkippedBranch.apply(shortcut, *params)


def run_branch(branch: Sequence[nn.Module], x: Tensor) -> Tensor:
    """f_l(x): the branch's layers, one after the other."""
    for layer in branch:
        x = layer(x)
    return x


class _SkippedBranch(torch.autograd.Function):
    """A skipped branch in eager mode: the shortcut passes through, and the backward pass hands the
    branch's parameters zero gradients without computing anything of the branch. A custom autograd function
    is the way to give a parameter a gradient from a graph it took no part in (pytorch issue 90171)."""

    @staticmethod
    def forward(ctx, shortcut: Tensor, *params: Tensor) -> Tensor:
        ctx.save_for_backward(*params)  # references only: nothing is copied
        return shortcut.view_as(shortcut)

    @staticmethod
    def backward(ctx, grad: Tensor):
        params = ctx.saved_tensors
        return (grad, *[torch.zeros_like(p) if needed else None
                        for p, needed in zip(params, ctx.needs_input_grad[1:])])


def _compiled_batch_gate(branch: Sequence[nn.Module], x: Tensor, shortcut: Tensor, keep: Tensor, scale) -> Tensor:
    """The batch gate inside a compiled graph: ``torch.cond`` keeps the draw a runtime input, so the graph
    neither bakes the first step's dice in nor recompiles when they change, and a skipped branch still
    costs nothing (only the taken side of the cond runs, forward and backward; the parameters of the side
    not taken get zero gradients).

    cond branches may not mutate their inputs, but BatchNorm updates its running statistics in place.
    Each layer with buffers therefore runs on copies of them (``functional_call``), the updated copies are
    returned, and they are written back outside the cond; a skipped branch returns its statistics unchanged.
    """
    float_buffers = [[(n, b) for n, b in layer.named_buffers() if b.is_floating_point()] for layer in branch]
    counters = [b for layer in branch for b in layer.buffers() if not b.is_floating_point()]
    counter_copies = [{n: b.clone() for n, b in layer.named_buffers() if not b.is_floating_point()}
                      for layer in branch]
    flat_buffers = [b for layer_buffers in float_buffers for _, b in layer_buffers]

    def run(x, shortcut, *buffers):
        updated, position, out = [], 0, x
        for layer, names, counts in zip(branch, float_buffers, counter_copies):
            if not names and not counts:
                out = layer(out)
                continue
            state = {n: b.clone() for (n, _), b in zip(names, buffers[position:position + len(names)])}
            state.update({n: c.clone() for n, c in counts.items()})
            position += len(names)
            out = functional_call(layer, state, (out,), strict=False)
            updated.extend(state[n] for n, _ in names)
        if scale is not None:
            out = out * scale
        return (shortcut + out, *updated)

    def skip(x, shortcut, *buffers):
        return (shortcut.clone(), *[b.clone() for b in buffers])

    # Operands are copies: the write-back below must not touch tensors that autograd saved.
    results = torch.cond(keep, run, skip, (x, shortcut, *[b.clone() for b in flat_buffers]))
    with torch.no_grad():
        for buffer, updated in zip(flat_buffers, results[1:]):
            buffer.copy_(updated.detach())
        for counter in counters:
            counter.add_(keep.to(counter.dtype))
    return results[0]


def set_drop_rate_factor(model: nn.Module, factor: float) -> int:
    """Put ``factor`` of every target drop rate of ``model`` in effect (drop-rate warmup), on each of its
    gate samplers: the zoo's models and models converted by ``sdzoo.convert_drop_path``. Returns how many
    samplers were set (0: the model has no sdzoo gates)."""
    samplers = [m for m in model.modules() if isinstance(m, GateSampler)]
    for sampler in samplers:
        sampler.set_drop_rate_factor(factor)
    return len(samplers)
