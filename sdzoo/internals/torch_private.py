"""PyTorch's private names that sdzoo uses, in one place; checked against torch 2.14.1, which has no public
equivalent for any of them. Why each is needed:

* ``_current_graph_task_id``: a gate asked inside the backward pass (checkpointing) reuses its draw.
* ``maybe_current_level``, ``_DisableFuncTorch``: gates are drawn as plain tensors inside ``torch.vmap``.
* ``skip_code``: dynamo never compiles the sampler's hooks as frames of their own, yet still inlines them
  (``torch.compiler.disable`` would forbid the inlining).
* ``maybe_mark_dynamic``: sample mode's kept count is one dynamic size, not a recompile per count.
* ``assume_static_by_default``: tells ``torch.compile(dynamic=True)`` apart, where a ``torch.cond`` branch
  holding floats (BatchNorm's eps) cannot be traced.
* ``OptimizedModule``: ``convert_drop_path`` refuses a compiled model (it traced the unconverted forward).
* ``tree_leaves``, ``tree_unflatten``, ``_PyTreeCodeGen``: the batch among nested forward arguments, and a
  rewritten FX forward's output rebuilt in the structure FX flattened it to (kept nowhere public).
* ``_assert``, ``_assert_is_none``: FX's asserts on specialised arguments, dropped from a rewritten forward.
* ``CompileCounterWithBackend``, ``counters``: the graphs and graph breaks ``sdzoo coverage`` counts.
* ``FakeTensorMode``: a training forward that allocates nothing, for models that make CPU tensors of their own.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch._dynamo
from torch import fx
from torch._dynamo.eval_frame import OptimizedModule, skip_code
from torch._dynamo.utils import counters as dynamo_counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph import _PyTreeCodeGen
from torch.utils._pytree import tree_leaves, tree_unflatten

__all__ = ["INTERNALS", "in_backward_pass", "outside_vmap", "skip_code", "maybe_mark_dynamic",
           "compiling_with_dynamic_shapes", "OptimizedModule", "tree_leaves", "tree_unflatten", "fx_output_spec",
           "FX_ASSERTS", "FakeTensorMode", "compile_counter", "dynamo_counters"]

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


def compile_counter(backend: Any) -> Any:
    """``CompileCounterWithBackend(backend)``: the graphs torch.compile makes, for ``sdzoo coverage``. Imported
    here, on use: torch._dynamo.testing loads functorch.compile and networkx, a quarter second that every
    ``import timm`` would otherwise pay (sdzoo loads with timm)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    return CompileCounterWithBackend(backend)
