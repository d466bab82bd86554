"""Gates: which residual branches run in a training step (``gate_mode``), and how a branch is scaled.

``ResidualGate`` is the skip, ``shortcut + b_l * f_l(x)``, where a dropped branch is not computed at all. In
``batch`` mode the whole mini-batch keeps or skips the branch; in ``sample`` mode it runs on a fixed
k_l = round(p_l * B) of the B samples, gathered with ``index_select`` and added back with ``index_add`` (DINOv2's
``drop_add_residual_stochastic_depth``), so shapes stay static. ``GateSampler`` draws the gates. The settings
given here were checked where they come from (``SurvivalSettings``, ``convert_drop_path``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdzoo.files.checks import check_fraction, check_int
from sdzoo.gate_compile import BranchCall, compiled_batch_gate
from sdzoo.internals.torch_private import in_backward_pass, maybe_mark_dynamic, outside_vmap, skip_code, tree_leaves

__all__ = ["GATE_MODES", "derived_seed", "SCALINGS", "GateSampler", "ResidualGate", "Branch", "kept_per_sample_count",
           "samplers_of", "set_drop_rate_factor", "same_gates", "gate_state", "load_gate_state"]

GATE_MODES = ("batch", "sample", "off")
SCALINGS = ("expectation", "inverted")


# -- the gate -------------------------------------------------------------------------------------------------
class ResidualGate(nn.Module):
    """``shortcut + b_l * f_l(inputs)`` for one residual branch with survival probability p_l; b_l is gate
    ``index`` of the model's ``GateSampler``.

    A skipped branch runs no forward and no backward, but its parameters get zero gradients, as on torch.cond's
    untaken side: eager and compiled training agree, and DDP needs no ``find_unused_parameters``
    (``zero_grad_skipped=False`` leaves them missing). ``checkpointing`` recomputes the branch in the backward.
    """

    def __init__(self, survival_prob: float = 1.0, scaling: str = "expectation", index: int = 0,
                 sampler: Optional[GateSampler] = None, zero_grad_skipped: bool = True):
        super().__init__()
        self.survival_prob = float(survival_prob)
        self.scaling = scaling
        self.index = index
        self.sampler = sampler
        self.zero_grad_skipped = zero_grad_skipped
        self.checkpointing = False
        self.same_batch = True  # a zoo block sees the model's batch (see GateSampler.gate)

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4f}, scaling={self.scaling!r}, index={self.index}"

    def forward(self, branch: Branch, shortcut: Tensor, *inputs: Any) -> Tensor:
        gate = None
        if self.training and self.sampler is not None:
            gate = self.sampler.gate(self.index, shortcut.shape[0], shortcut.device, self.same_batch)
        return self.apply_gate(gate, branch, shortcut, *inputs)

    def apply_gate(self, gate: Optional[Tensor], branch: Branch, shortcut: Tensor, *inputs: Any) -> Tensor:
        """The block's output under ``gate``: None (the branch runs), a 0-dim bool or float (batch mode) or
        the indices of the kept samples (sample mode)."""
        p = self.survival_prob
        if not self.training or gate is None:
            out = self._run(branch, inputs)
            # A branch with p_l = 1 stays a plain add, so the eval graph is exactly a ResNet's.
            if not self.training and self.scaling == "expectation" and p < 1.0:
                out = out * p
            return shortcut + out
        scale = 1.0 / p if self.scaling == "inverted" and p < 1.0 else None
        if gate.dim() == 0:  # batch mode
            if gate.is_floating_point():  # the gate carries the inverted scale in effect (see GateSampler)
                scale = gate if self.scaling == "inverted" else None
                gate = gate > 0
            if torch.compiler.is_compiling():
                return compiled_batch_gate(branch, shortcut, inputs, gate, scale, self.checkpointing)
            if not gate:
                return self._skip(branch, shortcut, inputs)
            out = self._run(branch, inputs)
            return shortcut + (out if scale is None else out * scale)
        # Sample mode. Inverted scaling divides by the share actually kept, k_l / B, which at small batches can
        # be far from p_l: the expected branch is exact at every batch size.
        batch_size = shortcut.shape[0]
        flags = branch.batched + (None,) * (len(inputs) - len(branch.batched))
        kept_inputs = [gather_samples(t, gate) if _is_batched(t, flag, batch_size) else t
                       for t, flag in zip(inputs, flags)]
        out = self._run(branch, kept_inputs)
        if scale is not None:
            out = out * (batch_size / gate.shape[0])
        return add_samples(shortcut, gate, out.to(shortcut.dtype))

    def _run(self, branch: Branch, inputs: Sequence[Any]) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(branch, *inputs, use_reentrant=False)
        return branch(*inputs)

    def _skip(self, branch: Branch, shortcut: Tensor, inputs: Sequence[Any] = ()) -> Tensor:
        if not self.zero_grad_skipped or not torch.is_grad_enabled():
            return shortcut
        # Inputs made outside the branch (a norm before it, GC ViT's global query) get zero gradients too.
        needs_grad = [p for p in branch.parameters() if p.requires_grad]
        needs_grad += [t for t in inputs if isinstance(t, Tensor) and t.requires_grad and t is not shortcut]
        return _SkippedBranch.apply(shortcut, *needs_grad) if needs_grad else shortcut


# -- sample mode: the kept samples, gathered and added back in the input's memory format ---------------------
def _is_batched(value: Any, flag: Optional[bool], batch_size: int) -> bool:
    if not isinstance(value, Tensor) or value.dim() == 0 or flag is False:
        return False
    if flag and value.shape[0] != batch_size:
        raise ValueError(f"sample mode: a branch input of shape {tuple(value.shape)} should hold the "
                         f"{batch_size} samples of the batch in its first dimension")
    return value.shape[0] == batch_size


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _samples_first(t: Tensor) -> Tuple[Tensor, Optional[Tuple[int, ...]], Optional[Tuple[int, ...]]]:
    """A contiguous view of ``t`` with the samples first, the permutation that made it and the one that undoes
    it: index_select and index_add return contiguous tensors, so on this view channels_last stays channels_last."""
    memory_format, n = _CHANNELS_LAST.get(t.dim()), t.dim()
    if memory_format is None or t.is_contiguous() or not t.is_contiguous(memory_format=memory_format):
        return t, None, None
    perm = (0, *range(2, n), 1)
    return t.permute(perm), perm, (0, n - 1, *range(1, n - 1))


def gather_samples(t: Tensor, kept: Tensor) -> Tensor:
    """``t[kept]`` along the first dimension, in ``t``'s memory format."""
    view, _, undo = _samples_first(t)
    out = view.index_select(0, kept)
    return out if undo is None else out.permute(undo)


def add_samples(shortcut: Tensor, kept: Tensor, out: Tensor) -> Tensor:
    """``shortcut`` with ``out`` added to its rows ``kept``, in ``shortcut``'s memory format."""
    view, perm, undo = _samples_first(shortcut)
    if perm is None:
        return shortcut.index_add(0, kept, out)
    return view.index_add(0, kept, out.permute(perm)).permute(undo)


class _SkippedBranch(torch.autograd.Function):
    """A skipped branch in eager mode: the shortcut passes through and the backward pass hands the branch's
    parameters (and inputs) zero gradients, the way to give a parameter a gradient from a graph it took no part
    in (pytorch issue 90171). ``setup_context`` and a generated vmap rule let ``torch.vmap`` run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(shortcut: Tensor, *params: Tensor) -> Tensor:
        # A copy, not a view: what follows the block may change its output in place (RepVGG's in-place ReLU
        # after an Identity), which a view made by a custom Function may not be, and FSDP2 warns of a view.
        return shortcut.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[1:])  # references only: nothing is copied

    @staticmethod
    def backward(ctx, grad: Tensor):
        params = ctx.saved_tensors
        return (grad, *[torch.zeros_like(p) if needed else None
                        for p, needed in zip(params, ctx.needs_input_grad[1:])])


# -- the branch -----------------------------------------------------------------------------------------------
class Branch:
    """f_l as its gate runs it: ``fn(owner, *inputs)``, ``owner`` the block, so the block keeps its state-dict
    layout (the zoo's blocks: their method ``residual``; a converted timm block: code generated from its forward).

    ``module_names`` and ``param_names`` are what ``fn`` uses of the block: a skipped branch gives them zero
    gradients and torch.compile's skip threads their buffers through its cond. They are looked up at every call,
    so the branch follows whatever replaces a block's parameters (FSDP). ``batched[i]``: whether input i has the
    samples in its first dimension, for sample mode to gather (None: if its first dimension is the batch size).
    """

    def __init__(self, owner: nn.Module, fn: Callable[..., Tensor], module_names: Sequence[str],
                 param_names: Sequence[str] = (), batched: Optional[Sequence[Optional[bool]]] = None):
        self.owner = owner
        self.fn = fn
        self.module_names = tuple(module_names)
        self.param_names = tuple(param_names)
        self.batched = tuple(batched) if batched is not None else (True,)
        self.call_module = BranchCall(self)  # made here: a module cannot be made inside a compiled graph

    def __call__(self, *inputs: Any) -> Tensor:
        return self.fn(self.owner, *inputs)

    def modules(self) -> List[nn.Module]:
        return [self.owner.get_submodule(name) for name in self.module_names]

    def named_tensors(self, kind: str) -> List[Tuple[str, Tensor]]:
        """The branch's ``kind`` ("parameters", each once, or "buffers"), named as ``BranchCall`` holds them."""
        named = [(f"owner.{name}.{sub}" if name else f"owner.{sub}", t)
                 for name, module in zip(self.module_names, self.modules())
                 for sub, t in getattr(module, f"named_{kind}")()]
        if kind == "buffers":
            return named
        named += [(f"owner.{name}", self.owner.get_parameter(name)) for name in self.param_names]
        return list({id(p): (n, p) for n, p in named}.values())

    def parameters(self) -> List[nn.Parameter]:
        return [p for _, p in self.named_tensors("parameters")]


# -- the draws ------------------------------------------------------------------------------------------------
def derived_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for stream ``key`` of ``seed`` (numpy's SeedSequence: well mixed, the same everywhere): the
    gates' dice and the training data's streams, independent and with no stored generator state."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0] >> 1)


def kept_per_sample_count(survival_prob: float, batch_size: int, minimum: int = 1) -> int:
    """Samples that run a block's branch in ``sample`` mode: fixed per block, so shapes are static. At least
    ``minimum`` (2 for a branch that holds a BatchNorm, which cannot take batch statistics of one 1x1 map)."""
    return min(batch_size, max(minimum, int(survival_prob * batch_size + 0.5)))


# The training forwards drawn, as a non-persistent buffer of the model: DDP broadcasts rank 0's buffers before
# every forward, so a rank that ran an extra training forward is put back in step.
STEP_BUFFER = "sdzoo_gate_step"
MAX_STEP = 2**63 - 1  # the buffer is an int64


class GateSampler:
    """Draws, once per training forward, the gates of all residual branches of a model.

    ``attach(model)`` adds a forward pre-hook that draws on the CPU (no device sync decides a branch), outside
    any compiled graph, which can then neither bake one step's draws in (pytorch issue 95425) nor break to draw.
    Forward number ``step`` draws from (seed, step) alone, and ``step`` counts every training forward as
    BatchNorm's ``num_batches_tracked`` does: every run and rank draws the same gates, and setting ``step``
    restores the stream. The rates, warm-up included, stay out of compiled graphs too (``scale_in_gate``).

    In sample mode, a branch that sees ``r`` rows per sample (MobileViT's transformer: ``rows_per_sample``) has
    its rows drawn out of r B; ``min_kept`` keeps at least 2 samples in a branch that holds a BatchNorm.
    """

    def __init__(self, survival_probs: Sequence[float], mode: str = "batch", seed: int = 0,
                 scale_in_gate: bool = False):
        self.survival_probs = [float(p) for p in survival_probs]
        self.mode = mode
        self.seed = seed
        self._step = 0  # training forwards so far: the key of the next draw
        self._written: Optional[int] = None  # the step last written to the model's STEP_BUFFER
        self.drop_rate_factor = 1.0  # share of each target drop rate in effect (drop-rate warmup)
        # Batch gates as 0-dim floats holding 1/p_l in effect (0: skipped), so a moving rate never enters a
        # compiled graph as a constant. Off by default: the zoo's gates stay bools.
        self.scale_in_gate = scale_in_gate
        self.gates: List[Optional[Tensor]] = [None] * len(self.survival_probs)  # the forward in progress
        self.last_draw: Optional[Tuple[List[Optional[Tensor]], int]] = None  # (gates, batch size), for logs
        self._fresh = False  # the pre-hook drew ``gates`` for the forward in progress
        self._batch_size = 0
        self._taken: set = set()  # gates handed out since the last draw (outside hooked forwards)
        self._held: Optional[List[Any]] = None  # [key] while same_gates holds one draw; key None until drawn
        # Rows of the model's batch each branch sees per sample (None: not known, the branch draws for what it
        # sees when it runs), and the fewest samples a branch keeps in sample mode.
        self.rows_per_sample: List[Optional[int]] = [1] * len(self.survival_probs)
        self.min_kept: List[int] = [1] * len(self.survival_probs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mode={self.mode!r}, num_gates={len(self.survival_probs)}, "
                f"seed={self.seed}, step={self.step})")

    def set_drop_rate_factor(self, factor: float) -> None:
        """Put ``factor`` (in [0, 1]) of every target drop rate in effect, from the next draw on."""
        self.drop_rate_factor = check_fraction("drop_rate_factor", factor)
        self.scale_in_gate = True  # from now on the rate moves: keep it out of the graph

    def current_survival_probs(self) -> List[float]:
        """The p_l the next draw uses: the targets, or with a warmup factor f, 1 - f (1 - p_l)."""
        if self.drop_rate_factor == 1.0:
            return list(self.survival_probs)
        return [1.0 - self.drop_rate_factor * (1.0 - p) for p in self.survival_probs]

    @property
    def step(self) -> int:
        """Training forwards drawn so far: the key of the next draw."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = check_int("step", value, 0, MAX_STEP)

    def draw(self, batch_size: int, device: Optional[torch.device] = None,
             step: Optional[int] = None) -> List[Optional[Tensor]]:
        """The gates of training forward ``step`` (default: the next one), without using it up: per branch None
        (it runs for all), a 0-dim CPU bool (batch mode; with ``scale_in_gate`` a 0-dim CPU float, 1/p_l when
        kept, 0 when skipped) or the sorted indices of the kept samples (sample mode)."""
        if self.mode == "off":
            return [None] * len(self.survival_probs)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.step if step is None else step))
        probs = self.current_survival_probs()
        if self.mode == "batch":
            probs = torch.tensor(probs)
            keep = torch.rand(len(probs), generator=generator) < probs
            if self.scale_in_gate:
                return list(torch.where(keep, 1.0 / probs, 0.0).to(torch.float32).unbind(0))
            return list(keep.unbind(0))
        return [self._kept_samples(p, batch_size * (rows or 1), generator, device, minimum)
                for p, rows, minimum in zip(probs, self.rows_per_sample, self.min_kept)]

    def _kept_samples(self, survival_prob: float, batch_size: int, generator: torch.Generator, device,
                      minimum: int = 1) -> Tensor:
        count = kept_per_sample_count(survival_prob, batch_size, minimum)
        kept = torch.randperm(batch_size, generator=generator)[:count].sort().values
        if device is not None:
            kept = kept.to(device, non_blocking=True)
        if self.drop_rate_factor != 1.0:
            maybe_mark_dynamic(kept, 0)  # the count follows the moving rate: one graph, not a recompile per count
        return kept

    def start_forward(self, batch_size: int, device: Optional[torch.device] = None) -> List[Optional[Tensor]]:
        """Draw the gates of a new training forward (or keep the held ones) and count the step: a held group of
        micro-batches is one step, so accumulating over N micro-batches draws as N processes do."""
        key = self.step
        if self._held is None:
            self.step += 1
        elif self._held[0] is None:  # the first forward of a held group: the group is one step
            self._held[0] = key
            self.step += 1
        else:
            key = self._held[0]
        self.gates = self.draw(batch_size, device, step=key)
        self.last_draw = (self.gates, batch_size)
        self._batch_size, self._taken = batch_size, set()
        return self.gates

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Every training forward inside uses the gates of the first one (see ``same_gates``)."""
        outer, self._held = self._held, [None] if self._held is None else self._held
        try:
            yield
        finally:
            self._held = outer

    # -- the model's hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, device: Optional[torch.device] = None) -> None:
        """Draw the gates of each training forward of ``model`` before it runs, and keep the step in its
        buffer ``STEP_BUFFER`` (on ``device``, default: where the model's first parameter is)."""
        if device is None:
            device = next((p.device for p in model.parameters()), None)
        model.register_buffer(STEP_BUFFER, torch.tensor(self._step, dtype=torch.int64, device=device),
                              persistent=False)
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.register_forward_hook(self._after_forward, always_call=True)

    # The hooks do nothing in eval mode or with gates off, in a way torch.compile and torch.export can trace
    # (fullgraph=True, strict=True): only the draw itself runs outside any graph.
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and self.mode != "off":
            # torch.export in training: batch gates are Python decisions, and strict export cannot run the draw.
            if torch.compiler.is_exporting() and (self.mode == "batch" or torch.compiler.is_dynamo_compiling()):
                raise RuntimeError(_EXPORT_TRAINING)
            self._draw_for_forward(module, args, kwargs)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._fresh:
            self._fresh = False

    @torch.compiler.disable
    def _draw_for_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # The first tensor of nested args (a NaFlex dict, a tuple, ...): its first dimension is the batch.
        sample = next((leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)), None)
        if sample is None or sample.dim() == 0:  # no batch to draw for: the gates draw when they run
            self._fresh = False
            return
        counter = getattr(module, STEP_BUFFER, None)
        counted = counter is not None and counter.device.type != "meta"
        # Take the step from the buffer where something else (DDP's broadcast) wrote it since. Off the CPU reading
        # waits for the device, so it is read there only when a process group is up (no broadcast without one).
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if counted and self._written is not None and (counter.device.type == "cpu" or distributed):
            value = int(counter)
            if value != self._written:
                self._step = value
        # A draw made under vmap would be batched, and a batched gate cannot decide whether a branch runs.
        with outside_vmap():
            self.start_forward(sample.shape[0], sample.device)
            if counted:
                counter.fill_(self._step)
                self._written = self._step
        self._fresh = True

    def gate(self, index: int, batch_size: int, device: torch.device, same_batch: bool = False) -> Optional[Tensor]:
        """Branch ``index``'s gate in the training forward in progress. ``same_batch``: the branch is known to
        see ``rows_per_sample[index]`` rows per sample of the model's batch, so under torch.compile its batch
        size is not compared with the drawn one, which would specialise the graph on it."""
        if self.mode == "off":
            return None
        rows = self.rows_per_sample[index]
        if self._fresh and (self.mode != "sample" or (same_batch and torch.compiler.is_compiling())
                            or (rows is not None and batch_size == self._batch_size * rows)):
            return self.gates[index]
        return self._gate_outside_hooked_forward(index, batch_size, device)

    @torch.compiler.disable
    def _gate_outside_hooked_forward(self, index: int, batch_size: int, device: torch.device) -> Optional[Tensor]:
        if self._fresh:  # sample mode, a branch whose samples are not the model input's: its own draw
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.step - 1, index))
            return self._kept_samples(self.current_survival_probs()[index], batch_size, generator, device,
                                      self.min_kept[index])
        # Activation checkpointing recomputes a block in the backward pass: with the gates it ran with.
        if self.last_draw is None or (index in self._taken and not in_backward_pass()):
            self.start_forward(batch_size, device)
        self._taken.add(index)
        gate = self.gates[index]
        if gate is not None and gate.dim() == 1 and gate.device != device:
            gate = gate.to(device)
        return gate


# torch.compile(model) runs a module's hooks outside its graph but compiles each hook's own frame, where
# fullgraph=True would refuse the draw. Skipping the frames (not torch.compiler.disable) still lets a graph that
# calls the model (torch.export, a compiled function) inline them: in eval mode they do nothing.
skip_code(GateSampler._before_forward.__code__)
skip_code(GateSampler._after_forward.__code__)


_EXPORT_TRAINING = (
    "torch.export of a model with stochastic-depth gates in training mode: gate_mode='batch' decides in Python "
    "whether each branch runs, from a draw made outside the graph, and strict export cannot run that draw. "
    "What exports: the model in eval mode (model.eval(), the network used for inference), or in training mode "
    "with gate_mode='sample' (convert_drop_path(model, mode='sample')) and torch.export.export(..., "
    "strict=False), where the kept samples are drawn inside the exported graph.")


# -- model-level calls -------------------------------------------------------------------------------------------
def samplers_of(model: nn.Module) -> List[GateSampler]:
    """The gate samplers of a model (the zoo's ``gate_sampler``, a converted model's ``drop_path_sampler``),
    also inside wrappers such as DistributedDataParallel."""
    found = {id(v): v for module in model.modules() for v in vars(module).values() if isinstance(v, GateSampler)}
    return list(found.values())


def set_drop_rate_factor(model: nn.Module, factor: float) -> int:
    """Put ``factor`` of every target drop rate of ``model`` in effect (drop-rate warmup), on each of its gate
    samplers. Returns how many samplers were set (0: the model has no sdzoo gates)."""
    samplers = samplers_of(model)
    for sampler in samplers:
        sampler.set_drop_rate_factor(factor)
    return len(samplers)


class same_gates:
    """Every training forward of ``model`` inside the block uses the gates of the first one: gradient
    accumulation over micro-batches with one draw for the whole mini-batch, as in the paper::

        with sdzoo.same_gates(model):
            for micro_x, micro_y in zip(x.chunk(4), y.chunk(4)):
                loss_fn(model(micro_x), micro_y).div(4).backward()

    One object may be entered again, also while it is entered (the inner block shares the outer one's draw).
    The hold is the model's, not the thread's: forwards of the model in other threads use the held draw too.
    """

    def __init__(self, model: nn.Module):
        self.samplers = _require_samplers(model)
        self._entered: List[contextlib.ExitStack] = []  # one per entry not yet left, innermost last

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        for sampler in self.samplers:
            stack.enter_context(sampler.hold())
        self._entered.append(stack)

    def __exit__(self, *exc_info: Any) -> None:
        self._entered.pop().close()


def gate_state(model: nn.Module) -> Dict[str, int]:
    """The state of ``model``'s gate stream (its seed and the training forwards drawn so far), to save beside a
    state dict. The zoo's models need none: they restore it from their state dict (see SDResNet)."""
    (sampler,) = _require_samplers(model, one=True)
    return dict(seed=sampler.seed, step=sampler.step)


def load_gate_state(model: nn.Module, state: Dict[str, int]) -> None:
    """Restore what ``gate_state`` returned (both values, or if either is refused, neither): the model goes on
    with the gates it would have drawn."""
    (sampler,) = _require_samplers(model, one=True)
    if not isinstance(state, dict) or set(state) != {"seed", "step"}:
        raise ValueError(f"state must be what sdzoo.gate_state returned, a dict with the keys 'seed' and 'step'; "
                         f"got {state!r}")
    seed = check_int("state['seed']", state["seed"], 0, 2**63 - 1)
    step = check_int("state['step']", state["step"], 0, MAX_STEP)
    sampler.seed, sampler.step = seed, step


def _require_samplers(model: nn.Module, one: bool = False) -> List[GateSampler]:
    samplers = samplers_of(model)
    if not samplers or (one and len(samplers) > 1):
        raise ValueError(f"model must have {'one' if one else 'a'} sdzoo gate sampler (a zoo model or a model "
                         f"converted by sdzoo.convert_drop_path); {type(model).__name__} has {len(samplers)}")
    return samplers
