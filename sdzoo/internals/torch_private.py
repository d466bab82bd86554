"""PyTorch's private names that sdzoo uses, in one place; none of them has a public equivalent in torch 2.14.1.

Every name below was checked against torch 2.14.1. Per name, what it is for:

* ``torch._C._current_graph_task_id``: -1 outside a backward pass. A gate asked for its draw inside the
  backward pass is activation checkpointing recomputing a block, which must reuse the draw it ran with.
* ``torch._C._functorch.maybe_current_level`` and ``torch._C._DisableFuncTorch``: whether a ``torch.vmap`` is
  running, and a way to step outside it, so the gates are drawn as plain tensors (functorch's own code uses
  them; a batched gate cannot decide whether a branch runs).
* ``torch._dynamo.eval_frame.skip_code``: dynamo never compiles the gate sampler's hook frames on their own
  (fullgraph=True would refuse the draw there), while a graph that inlines them still traces them.
  ``torch.compiler.disable`` would also forbid the inlining.
* ``torch._dynamo.maybe_mark_dynamic``: the kept-sample count of sample mode follows a moving drop rate as
  one dynamic size instead of a recompile per count.
* ``torch._dynamo.config.assume_static_by_default``: False under ``torch.compile(dynamic=True)``, where a
  ``torch.cond`` branch holding float settings (BatchNorm's eps) cannot be traced; the gate says so.
* ``torch._dynamo.eval_frame.OptimizedModule``: what ``torch.compile(module)`` returns, refused by
  ``convert_drop_path`` (the compiled model has traced the unconverted forward).
* ``torch.utils._pytree.tree_leaves`` and ``tree_unflatten``: the first tensor of nested forward arguments
  (the batch), and a rewritten FX forward's output rebuilt in the structure FX flattened it to.
* ``torch.fx.graph._PyTreeCodeGen``: the FX code generator that flattens a traced forward's output; its
  ``pytree_info.out_spec`` is the structure, kept nowhere public.
* ``torch._assert`` and ``torch.fx._symbolic_trace._assert_is_none``: the assert calls FX traces for the
  arguments it specialised, dropped from a rewritten forward.
* ``torch._dynamo.testing.CompileCounterWithBackend`` and ``torch._dynamo.utils.counters``: the graphs and
  graph breaks that ``sdzoo coverage`` counts for its compile table (dynamo reports them nowhere public).
* ``torch._subclasses.fake_tensor.FakeTensorMode``: a training forward that allocates nothing, for models
  that make tensors of their own on the CPU (the meta device is tried first).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch._dynamo
from torch import fx
from torch._dynamo.eval_frame import OptimizedModule, skip_code
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters as dynamo_counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph import _PyTreeCodeGen
from torch.utils._pytree import tree_leaves, tree_unflatten

__all__ = ["INTERNALS", "in_backward_pass", "outside_vmap", "skip_code", "maybe_mark_dynamic",
           "compiling_with_dynamic_shapes", "OptimizedModule", "tree_leaves", "tree_unflatten", "fx_output_spec",
           "FX_ASSERTS", "FakeTensorMode", "CompileCounterWithBackend", "dynamo_counters"]

# (module, attribute, what sdzoo uses it for): every private name this module exposes, for tests/test_internals.py.
INTERNALS: List[Tuple[str, str, str]] = [
    ("torch._C", "_current_graph_task_id", "a gate asked in the backward pass reuses its draw (checkpointing)"),
    ("torch._C._functorch", "maybe_current_level", "whether the gates are drawn inside torch.vmap"),
    ("torch._C", "_DisableFuncTorch", "the gates drawn outside torch.vmap"),
    ("torch._dynamo.eval_frame", "skip_code", "the gate sampler's hooks never compiled as frames of their own"),
    ("torch._dynamo", "maybe_mark_dynamic", "a moving kept-sample count as one dynamic size"),
    ("torch._dynamo.config", "assume_static_by_default", "torch.compile(dynamic=True) told apart"),
    ("torch._dynamo.eval_frame", "OptimizedModule", "convert_drop_path refuses a compiled model"),
    ("torch.utils._pytree", "tree_leaves", "the first tensor of nested forward arguments"),
    ("torch.utils._pytree", "tree_unflatten", "a rewritten FX forward's output in its traced structure"),
    ("torch.fx.graph", "_PyTreeCodeGen", "the output structure of an FX trace with flattened output"),
    ("torch", "_assert", "FX's asserts on specialised arguments, dropped from a rewritten forward"),
    ("torch.fx._symbolic_trace", "_assert_is_none", "FX's asserts on None arguments, dropped likewise"),
    ("torch._subclasses.fake_tensor", "FakeTensorMode", "convert_drop_path's probe forward without memory"),
    ("torch._dynamo.testing", "CompileCounterWithBackend", "sdzoo coverage counts the graphs torch.compile makes"),
    ("torch._dynamo.utils", "counters", "sdzoo coverage counts the graph breaks"),
]

maybe_mark_dynamic = torch._dynamo.maybe_mark_dynamic
FX_ASSERTS = frozenset({torch._assert, _assert_is_none})


def in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def outside_vmap() -> Iterator[None]:
    """Code inside runs on plain tensors also inside ``torch.vmap`` (nothing changes outside one)."""
    if torch._C._functorch.maybe_current_level() is None:
        yield
        return
    with torch._C._DisableFuncTorch():
        yield


def compiling_with_dynamic_shapes() -> bool:
    """Whether dynamo traces with every size and float symbolic (``torch.compile(dynamic=True)``)."""
    return not torch._dynamo.config.assume_static_by_default


def fx_output_spec(graph: fx.Graph) -> Optional[Any]:
    """The structure of what ``graph``'s forward returns where FX flattened it (a specialised tuple argument
    makes it trace with its pytree code generator), else None."""
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        return codegen.pytree_info.out_spec
    return None
