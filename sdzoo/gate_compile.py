"""Batch mode's skip under torch.compile: a ``torch.cond`` on the drawn gate, where an ``if`` would bake the first
step's dice into the graph or recompile at every draw. Most of this is what ``torch.cond`` asks of its two sides:
BatchNorm's buffers threaded through it (a side may not mutate its inputs) and both sides' gradients in one layout.

A branch here is ``sdzoo.gate.Branch``; this module does not import it, so that the gate can import this one.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from sdzoo.internals.torch_private import compiling_with_dynamic_shapes

__all__ = ["compiled_batch_gate", "BranchCall"]


class BranchCall(nn.Module):
    """The branch as a module with the block as its child ``owner``, so ``functional_call`` can swap the
    branch's buffers. Off the model's module tree, so the state dict does not see it."""

    def __init__(self, branch):
        super().__init__()
        self.owner = branch.owner
        object.__setattr__(self, "branch", branch)  # a reference, not state

    def forward(self, *inputs: Any) -> Tensor:
        return self.branch(*inputs)


def compiled_batch_gate(branch, shortcut: Tensor, inputs: Sequence[Any], keep: Tensor, scale,
                        checkpointing: bool) -> Tensor:
    """The batch gate inside a compiled graph: only the taken side of the cond runs, forward and backward, and
    the side not taken gives the parameters zero gradients. The branch runs on copies of its buffers, the updated
    copies come out of the cond and are written back after it (a skipped branch returns them unchanged)."""
    if compiling_with_dynamic_shapes():  # dynamic=True: floats are symbolic
        raise RuntimeError(_DYNAMIC_FLOATS)
    params, buffers = branch.named_tensors("parameters"), branch.named_tensors("buffers")
    floats = [(n, b) for n, b in buffers if b.is_floating_point()]
    # Other integer buffers (Swin's relative-position index) are tables the branch only reads.
    counters = [(n, b) for n, b in buffers if not b.is_floating_point() and n.endswith(".num_batches_tracked")]
    # Nothing to swap (a transformer's linear layers and norms): the branch runs as it is, its parameters lifted
    # by dynamo, which traces far less than functional_call's swap of every parameter.
    direct = not floats and not counters and not any(_layout_may_differ(p, _PARAM) for _, p in params)
    if direct:
        params = []
    # Copies the branch may count on (BatchNorm's num_batches_tracked += 1); the real counters are moved below.
    counter_copies = {name: c.clone() for name, c in counters}
    tensor_at = [i for i, t in enumerate(inputs) if isinstance(t, Tensor)]
    n_tensors, n_buffers = len(tensor_at), len(floats)

    def run(shortcut, *operands):
        shortcut = _in_operand_layout(shortcut, _SHORTCUT)
        # Only inputs and parameters whose gradient's layout can differ get the layout Function: each one is
        # traced forward and backward on both sides of every cond, which is much of batch mode's compile time.
        values = list(inputs)
        for i, t in zip(tensor_at, operands):
            values[i] = _in_operand_layout(t, _INPUT)
        state = {name: b.clone() for (name, _), b in zip(floats, operands[n_tensors:n_tensors + n_buffers])}
        state.update({name: c.clone() for name, c in counter_copies.items()})
        state.update({name: _in_operand_layout(p, _PARAM)
                      for (name, _), p in zip(params, operands[n_tensors + n_buffers:])})
        fn = branch if direct else (lambda *v: functional_call(branch.call_module, state, v, strict=False))
        out = checkpoint(fn, *values, use_reentrant=False) if checkpointing else fn(*values)
        # In the shortcut's layout, as the skipped side's copy is (both sides must agree; inductor fuses the two).
        return (shortcut.clone().add_(out if scale is None else out * scale), *[state[name] for name, _ in floats])

    def skip(shortcut, *operands):
        shortcut = _in_operand_layout(shortcut, _SHORTCUT)
        param_operands = operands[n_tensors + n_buffers:]
        # The parameters' zero gradients made as the taken side makes its gradients, so their layouts agree.
        touched = sum(_in_operand_layout(p, _PARAM)[(0,) * p.dim()] * 0 for p in param_operands)
        out = shortcut.clone() + touched if param_operands else shortcut.clone()
        return (out, *[b.clone() for b in operands[n_tensors:n_tensors + n_buffers]])

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


_DYNAMIC_FLOATS = (
    "gate_mode='batch' under torch.compile(dynamic=True): the real skip is a torch.cond, and PyTorch cannot "
    "trace a torch.cond branch whose layers hold float settings (BatchNorm's momentum and eps, LayerNorm's "
    "eps) once dynamic=True has made every float symbolic. Use torch.compile(model) with the default "
    "dynamic=None (a new batch size recompiles once, into a graph with a dynamic batch size), or mark the "
    "batch dimension alone with torch._dynamo.mark_dynamic(x, 0), or gate_mode='sample'.")


class _GradInOperandLayout(torch.autograd.Function):
    """Identity whose gradient has the strides of its input: both sides of a ``torch.cond`` must give gradients
    in the operand's layout, and autograd may not (a 1x1 conv's weight gradient after ConvNeXt's LayerNorm2d is
    channels_last). The copy is unconditional: dynamo traces this backward before it sees the real strides."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        # The strides zeros_like(x) has on the untaken side (for size-1 dimensions they can differ from x's).
        ctx.layout = (x.shape, torch.empty_like(x, device="meta").stride())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        shape, stride = ctx.layout
        return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


# From how many dimensions a tensor's gradient can come in another layout: an image-shaped input, a convolution
# weight; a shortcut only through a size-1 dimension.
_INPUT, _PARAM, _SHORTCUT = 4, 3, math.inf


def _layout_may_differ(t: Tensor, from_dim: float) -> bool:
    return t.dim() >= from_dim or 1 in t.shape


def _in_operand_layout(t: Tensor, from_dim: float) -> Tensor:
    return _GradInOperandLayout.apply(t) if _layout_may_differ(t, from_dim) else t
