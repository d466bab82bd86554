"""Batch mode's skip under torch.compile, and what dynamo must be told about the gates.

In eager mode a skipped branch is an ``if`` (``sdzoo.gate.ResidualGate``). Inside a compiled graph that ``if``
would bake the first step's dice into the graph, or recompile at every new draw; ``compiled_batch_gate`` makes it
a ``torch.cond`` on the drawn gate instead. Much of what follows is what ``torch.cond`` asks of its two sides:
BatchNorm's buffers threaded through it (a side may not mutate its inputs), both sides' gradients in one layout
(``_GradInOperandLayout``), the branch as a module whose buffers ``functional_call`` can swap (``BranchCall``).

A branch here is ``sdzoo.gate.Branch`` (its ``owner``, ``module_names``, ``param_names``, ``modules()``); this
module does not import it, so that the gate can import this one.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from sdzoo.internals.torch_private import compiling_with_dynamic_shapes, maybe_mark_dynamic, skip_code

__all__ = ["compiled_batch_gate", "BranchCall", "mark_size_dynamic", "never_compile_alone"]


def never_compile_alone(*functions: Callable) -> None:
    """dynamo never compiles these functions' frames on their own (it runs them as Python), but inlines them
    into a graph that calls them. ``torch.compiler.disable`` would forbid the inlining too."""
    for fn in functions:
        skip_code(fn.__code__)


def mark_size_dynamic(t: Tensor) -> None:
    """``t``'s first size is a dynamic size to dynamo where it can be: a count that moves (the kept samples
    under a drop-rate warmup) is then one graph, not a recompile per count."""
    maybe_mark_dynamic(t, 0)


class BranchCall(nn.Module):
    """A module whose forward is the branch, with the block as its child ``owner``: what ``functional_call``
    needs to swap the branch's buffers. Off the model's module tree, so the state dict does not see it."""

    def __init__(self, branch):
        super().__init__()
        self.owner = branch.owner
        object.__setattr__(self, "branch", branch)  # a reference, not state

    def forward(self, *inputs: Any) -> Tensor:
        return self.branch(*inputs)


def _named_parameters(branch) -> List[Tuple[str, nn.Parameter]]:
    """The branch's parameters, named for ``_functional``."""
    named = [(f"owner.{name}.{p_name}" if name else f"owner.{p_name}", p)
             for name, module in zip(branch.module_names, branch.modules()) for p_name, p in module.named_parameters()]
    named += [(f"owner.{name}", branch.owner.get_parameter(name)) for name in branch.param_names]
    return list({id(p): (n, p) for n, p in named}.values())


def _buffers(branch) -> Tuple[List[Tuple[str, Tensor]], List[Tuple[str, Tensor]]]:
    """(float buffers, BatchNorm batch counters) of the branch's modules, named for ``_functional``. Other
    integer buffers (Swin's relative-position index) are tables the branch only reads."""
    floats, counters = [], []
    for name, module in zip(branch.module_names, branch.modules()):
        for buffer_name, buffer in module.named_buffers():
            entry = (f"owner.{name}.{buffer_name}" if name else f"owner.{buffer_name}", buffer)
            if buffer.is_floating_point():
                floats.append(entry)
            elif buffer_name.rsplit(".", 1)[-1] == "num_batches_tracked":
                counters.append(entry)
    return floats, counters


def _functional(branch, state: Dict[str, Tensor], *inputs: Any) -> Tensor:
    """The branch with the buffers in ``state`` in place of the modules' own (torch.cond branches may not
    mutate their inputs, and BatchNorm updates its running statistics in place)."""
    return functional_call(branch.call_module, state, inputs, strict=False)


def compiled_batch_gate(branch, shortcut: Tensor, inputs: Sequence[Any], keep: Tensor, scale,
                         checkpointing: bool) -> Tensor:
    """The batch gate inside a compiled graph: ``torch.cond`` keeps the draw a runtime input, so the graph
    neither bakes the first step's dice in nor recompiles when they change, and a skipped branch still
    costs nothing (only the taken side of the cond runs, forward and backward; the parameters of the side
    not taken get zero gradients).

    cond branches may not mutate their inputs, but BatchNorm updates its running statistics in place. The
    branch therefore runs on copies of its buffers (``_functional``), the updated copies are returned,
    and they are written back outside the cond; a skipped branch returns its statistics unchanged.
    """
    if compiling_with_dynamic_shapes():  # dynamic=True: floats are symbolic
        raise RuntimeError(_DYNAMIC_FLOATS)
    floats, counters = _buffers(branch)
    float_names = [name for name, _ in floats]
    # Copies the branch may count on (BatchNorm's num_batches_tracked += 1); the real counters are moved below.
    counter_copies = {name: c.clone() for name, c in counters}
    tensor_at = [i for i, t in enumerate(inputs) if isinstance(t, Tensor)]

    def with_operands(operands: Sequence[Tensor]) -> List[Any]:
        values = list(inputs)
        for i, t in zip(tensor_at, operands):
            values[i] = t
        return values

    params = _named_parameters(branch)
    n_tensors, n_buffers = len(tensor_at), len(floats)

    def run(shortcut, *operands):
        shortcut = _GradInOperandLayout.apply(shortcut) if 1 in shortcut.shape else shortcut
        # Inputs and parameters where the gradient's layout can differ from the operand's: a size-1 dimension
        # makes layouts ambiguous, and the gradient of a 4-D input or convolution weight can come out
        # channels_last (CoAtNet's attention behind a LayerNorm2d). Not the others (linear and norm weights):
        # each such Function is traced forward and backward, on both sides of every cond, which is much of
        # batch mode's compile time.
        tensors = [_in_operand_layout(t) for t in operands[:n_tensors]]
        buffers = operands[n_tensors:n_tensors + n_buffers]
        state = {name: b.clone() for name, b in zip(float_names, buffers)}
        state.update({name: c.clone() for name, c in counter_copies.items()})
        state.update({name: _in_operand_layout(p, is_param=True)
                      for (name, _), p in zip(params, operands[n_tensors + n_buffers:])})
        values = with_operands(tensors)
        if checkpointing:
            out = checkpoint(lambda *v: _functional(branch, state, *v), *values, use_reentrant=False)
        else:
            out = _functional(branch, state, *values)
        if scale is not None:
            out = out * scale
        # In the shortcut's layout, as the skipped side's copy is (both sides must agree; inductor fuses the two).
        return (shortcut.clone().add_(out), *[state[name] for name in float_names])

    def skip(shortcut, *operands):
        shortcut = _GradInOperandLayout.apply(shortcut) if 1 in shortcut.shape else shortcut
        # The parameters' zero gradients made as the taken side makes its gradients, so their layouts agree.
        touched = sum(_in_operand_layout(p, is_param=True)[(0,) * p.dim()] * 0
                      for p in operands[n_tensors + n_buffers:])
        buffers = operands[n_tensors:n_tensors + n_buffers]
        return (shortcut.clone() + touched if params else shortcut.clone(), *[b.clone() for b in buffers])

    if not floats and not counters and not any(_layout_may_differ(p, is_param=True) for _, p in params):
        # Nothing to swap (a transformer's linear layers and norms): the branch runs as it is, its parameters
        # lifted by dynamo, which traces far less than functional_call's swap of every parameter.
        def run_direct(shortcut, *operands):
            shortcut = _GradInOperandLayout.apply(shortcut) if 1 in shortcut.shape else shortcut
            values = with_operands([_in_operand_layout(t) for t in operands])
            out = checkpoint(branch, *values, use_reentrant=False) if checkpointing else branch(*values)
            return shortcut.clone().add_(out if scale is None else out * scale)

        def skip_direct(shortcut, *operands):
            shortcut = _GradInOperandLayout.apply(shortcut) if 1 in shortcut.shape else shortcut
            return shortcut.clone()

        out = torch.cond(keep, run_direct, skip_direct, (shortcut, *[inputs[i] for i in tensor_at]))
        return _GradInOperandLayout.apply(out)

    # Buffer operands are copies: the write-back below must not touch tensors that autograd saved.
    operands = [inputs[i] for i in tensor_at] + [b.clone() for _, b in floats] + [p for _, p in params]
    results = torch.cond(keep, run, skip, (shortcut, *operands))
    with torch.no_grad():
        for (_, buffer), updated in zip(floats, results[1:]):
            buffer.copy_(updated.detach())
        for _, counter in counters:
            counter.add_(keep.to(counter.dtype))
    # The gradient enters the cond's backward in the output's own layout (inductor can assume another one).
    return _GradInOperandLayout.apply(results[0])


# Under torch.compile(dynamic=True), dynamo makes every float setting of a module symbolic.
_DYNAMIC_FLOATS = (
    "gate_mode='batch' under torch.compile(dynamic=True): the real skip is a torch.cond, and PyTorch cannot "
    "trace a torch.cond branch whose layers hold float settings (BatchNorm's momentum and eps, LayerNorm's "
    "eps) once dynamic=True has made every float symbolic. Use torch.compile(model) with the default "
    "dynamic=None (a new batch size recompiles once, into a graph with a dynamic batch size), or mark the "
    "batch dimension alone with torch._dynamo.mark_dynamic(x, 0), or gate_mode='sample'.")


class _GradInOperandLayout(torch.autograd.Function):
    """Identity whose gradient has the strides of its input. Both sides of a ``torch.cond`` must give gradients
    of one layout, and the untaken side gives zeros in the operand's, while the taken side's autograd may give
    other strides: a 1x1 conv's weight gradient takes the layout of its input (channels_last after ConvNeXt's
    LayerNorm2d), and for size-1 dimensions torch.cond's check tells equal layouts apart. The copy is
    unconditional: dynamo traces this backward before it sees the real gradient's strides."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        # The strides zeros_like(x) has on the untaken side (for size-1 dimensions they can differ from x's).
        ctx.layout = (x.shape, torch.empty_like(x, device="meta").stride())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        shape, stride = ctx.layout
        return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def _layout_may_differ(t: Tensor, is_param: bool = False) -> bool:
    """Whether the gradient of ``t`` can come in another layout than ``t``'s: a size-1 dimension, an
    image-shaped (4-D or more) input, a convolution weight (3-D or more)."""
    return t.dim() > (2 if is_param else 3) or 1 in t.shape


def _in_operand_layout(t: Tensor, is_param: bool = False) -> Tensor:
    """``t`` with its gradient in its own layout where that can differ (see ``_GradInOperandLayout``)."""
    return _GradInOperandLayout.apply(t) if _layout_may_differ(t, is_param) else t
