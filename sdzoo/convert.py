"""A real skip for timm's own drop-path models: ``convert_drop_path`` moves every ``shortcut + drop_path(f(x))``
of a model onto the zoo's gates (``sdzoo.gate``), in place. Each block's forward is traced with torch.fx, the
branch that feeds each DropPath is found in that graph, and the residual add becomes a call of the gate, in a
subclass of the block's class whose forward differs in training only (docs/convert.md, "One mechanism for every
block class").
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import operator
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call
from timm.layers import DropPath, get_notrace_functions
from timm.layers.drop import drop_path

from sdzoo.files.checks import check_choice, check_fraction, check_input_size, check_int, error_line
from sdzoo.fold import BATCH_NORMS
from sdzoo.gate import Branch, GateSampler, ResidualGate
from sdzoo.internals.torch_private import (FX_ASSERTS, FakeTensorMode, OptimizedModule, fx_output_spec,
                                          tree_unflatten)

__all__ = ["convert_drop_path", "CONVERT_MODES", "BREAK_EVEN_DROP_RATE", "DropPathGate", "DropPathSampler",
           "inspect_drop_paths", "BlockReport", "install_create_model_hook", "CONVERT_ENV", "SEED_ENV",
           "model_input_size"]

CONVERT_MODES = ("sample", "batch")
# Below this rate the real skip costs more than it saves (docs/benchmarks.md, "Sample mode's break-even").
BREAK_EVEN_DROP_RATE = 0.05


class DropPathSampler(GateSampler):
    """``model.drop_path_sampler``: batch gates carry their scale as a tensor (no rate is a constant of a compiled
    graph), and the masks left ramp with the warmup too."""

    def __init__(self, survival_probs: Sequence[float], mode: str, seed: int):
        super().__init__(survival_probs, mode, seed, scale_in_gate=True)
        self.masks: List[Tuple[DropPath, float]] = []  # timm's masks left, with their target rates

    def set_drop_rate_factor(self, factor: float) -> None:
        super().set_drop_rate_factor(factor)
        for mask, target in self.masks:  # timm's float rate: under torch.compile a change recompiles
            mask.drop_prob = factor * target


class DropPathGate(ResidualGate):
    """timm's DropPath slot, converted: called as ``slot(site, branch, shortcut, *inputs)`` by the rewritten
    forward (a gate per site that uses the slot), and as ``slot(x)`` timm's DropPath at the rate in effect."""

    def __init__(self, drop_prob: float, scale_by_keep: bool, indices: Sequence[int], sampler: DropPathSampler):
        # timm divides a kept branch by its keep rate unless scale_by_keep is off: then nothing is scaled.
        super().__init__(1.0 - drop_prob, scaling="inverted" if scale_by_keep else "expectation", index=indices[0],
                         sampler=sampler)
        self.indices = tuple(indices)
        self.scale_by_keep = scale_by_keep

    @property
    def drop_prob(self) -> float:
        """timm's name for the branch's target rate."""
        return 1.0 - self.survival_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}, mode={self.sampler.mode!r}, gates={list(self.indices)}"

    def forward(self, *args: Any) -> Tensor:
        if len(args) == 1:
            rate = self.sampler.drop_rate_factor * self.drop_prob
            return drop_path(args[0], rate, self.training, self.scale_by_keep)
        site, branch, shortcut, *inputs = args
        index = self.indices[site]
        # Rows per sample seen at conversion: the pre-hook drew this branch's rows (see GateSampler.gate).
        known_rows = self.sampler.rows_per_sample[index] is not None
        gate = self.sampler.gate(index, shortcut.shape[0], shortcut.device, known_rows) if self.training else None
        return self.apply_gate(gate, branch, shortcut, *inputs)


# -- finding the residuals of a block ------------------------------------------------------------------------
class NotConvertible(Exception):
    """A block whose drop paths cannot be moved onto gates; the message says why."""


class _BlockTracer(fx.Tracer):
    """Traces one block's own forward: every submodule a call, timm's registered functions opaque (as timm's FX
    feature extraction keeps them)."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return True


# Targets of call_function (functions) and call_method (method names) nodes, together: see ``_calls``.
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_DIVS = {operator.truediv, torch.div, "div", "div_"}
_SCALES = {operator.mul, operator.imul, operator.itruediv, torch.mul, "mul", "mul_", *_DIVS}
# Ops that move or pad values without mixing samples or changing a zero: they may follow a drop path.
_LAYOUT = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze",
           "view_as", "reshape_as", "roll", "flip", torch.reshape, torch.permute, torch.transpose, torch.flatten,
           torch.unflatten, torch.squeeze, torch.unsqueeze, torch.roll, torch.flip, operator.getitem, F.pad}
_SIZES = {"size", "dim", "numel"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}
_INT_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
            operator.getitem, operator.truediv}
_TENSOR = "tensor"  # a tensor argument in a call key (``_call_key_fast``)


def _calls(node: fx.Node, targets: Set[Any]) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _own_class(block: nn.Module) -> type:  # under a converted block, the timm class
    return getattr(type(block), "_sdzoo_timm_class", type(block))


def _forward_params(block: nn.Module) -> List[inspect.Parameter]:
    return list(inspect.signature(_own_class(block).forward).parameters.values())[1:]


def _trace(block: nn.Module, key: Tuple[Any, ...]) -> fx.Graph:
    concrete = {p.name: list(k[1]) if k[0] == "list" else k[1]
                for p, k in zip(_forward_params(block), key) if k != _TENSOR}
    # The training forward of timm's class; the block's own flag only, so a frozen BatchNorm inside stays frozen.
    was_training, cls = block.training, type(block)
    block.training = True
    block.__class__ = _own_class(block)
    try:
        graph = _BlockTracer().trace(block, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001  (FX raises many kinds; each is a reason to report, not a crash)
        raise NotConvertible(f"its forward cannot be traced with torch.fx ({error_line(e, 200)})") from None
    finally:
        block.__class__ = cls
        block.training = was_training
    # Sizes unpacked and not used (``_, H, W, _ = x.shape``) would hold the tensor outside any branch.
    for node in reversed(list(graph.nodes)):
        if not node.users and node.op == "call_function" and _is_shape(node):
            graph.erase_node(node)
    return graph


@dataclass
class _Site:
    """One ``shortcut + post(drop_path(branch))`` in a block's graph."""
    slot: str
    drop: fx.Node
    add: fx.Node
    shortcut: fx.Node
    region: List[fx.Node]  # the branch, the drop path and what follows it up to the add, in graph order
    end: fx.Node  # the region's value that the add adds


def _depends_on(node: fx.Node, roots: Set[fx.Node], memo: Dict[fx.Node, bool]) -> bool:
    if node not in memo:
        memo[node] = node in roots or any(_depends_on(a, roots, memo) for a in node.all_input_nodes)
    return memo[node]


def _is_shape(node: Any) -> bool:
    """A size or property of a tensor, not values: a branch recomputes it from its own (kept) samples."""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS or _calls(node, _SIZES):
        return True
    return _calls(node, _INT_OPS) and all(_is_shape(a) for a in node.all_input_nodes)


def _inplace_module(block: nn.Module, node: fx.Node) -> bool:
    return node.op == "call_module" and getattr(block.get_submodule(node.target), "inplace", False) is True


def _post_op_reason(block: nn.Module, node: fx.Node, carried: Set[fx.Node]) -> Optional[str]:
    """Why ``node``, which reads the dropped branch (``carried``), may not sit between the drop path and the add
    (None: it may, being a scale, a layout op, a size, or an identity or scale module)."""
    if _calls(node, _SCALES):
        carried_args = [a for a in node.all_input_nodes if a in carried]
        if len(carried_args) == 1 and not (node.target in _DIVS and node.args[0] is not carried_args[0]):
            return None
        return f"{node.format_node()} mixes the dropped branch with itself"
    if _is_shape(node) or _calls(node, _LAYOUT):
        if node.target is F.pad and node.kwargs.get("value", 0) != 0:
            return "a non-zero pad follows the drop path"
        return None
    if node.op == "call_module":
        module = block.get_submodule(node.target)
        if isinstance(module, nn.Identity) or _is_scale_module(module):
            return None
    return f"the drop path's output goes through {node.format_node()}, which is not a scale or a layout op"


_SCALE_MODULES: Dict[Tuple[Any, ...], bool] = {}  # (class, its flags) -> whether it only scales


def _is_scale_module(module: nn.Module) -> bool:
    """A module whose forward only scales its input by its own parameters (LayerScale, MetaFormer's Scale)."""
    key = (type(module), *sorted((k, v) for k, v in vars(module).items() if isinstance(v, (bool, int, float, str))))
    if key not in _SCALE_MODULES:
        _SCALE_MODULES[key] = _only_scales(module)
    return _SCALE_MODULES[key]


def _only_scales(module: nn.Module) -> bool:
    try:
        graph = _BlockTracer().trace(module)
    except Exception:  # noqa: BLE001  (not traceable: not known to be a scale)
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    carried = set(inputs[:1])
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or not set(node.all_input_nodes) & carried:
            continue
        if node.op == "call_module" or _post_op_reason(module, node, carried) is not None:
            return False
        carried.add(node)
    return len(inputs) == 1


def _find_sites(block: nn.Module, graph: fx.Graph, slots: Iterable[str]) -> Tuple[List[_Site], Dict[str, str]]:
    """The residual sites of the drop-path ``slots`` in a block's graph, and why each slot used but not gated is not."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites, kept_as_mask = [], {}
    for slot in slots:
        try:
            sites += [_site(block, slot, n, order) for n in order if n.op == "call_module" and n.target == slot]
        except NotConvertible as e:
            kept_as_mask[slot] = str(e)
    sites.sort(key=lambda s: order[s.add])
    # A residual inside another's branch (EdgeNeXt's attention) stays timm's mask: the outer gate skips both.
    regions = [set(s.region) for s in sites]
    sites = [s for i, s in enumerate(sites) if not any(
        j != i and s.add in outer and regions[i] <= outer for j, outer in enumerate(regions))]
    claimed: Set[fx.Node] = set()
    for site in sites:
        if claimed & set(site.region):
            raise NotConvertible(f"the branches of {site.slot} and another drop path share nodes")
        claimed |= set(site.region)
    return sites, kept_as_mask


def _site(block: nn.Module, slot: str, drop: fx.Node, order: Dict[fx.Node, int]) -> _Site:
    if len(drop.args) != 1 or drop.kwargs or not isinstance(drop.args[0], fx.Node):
        raise NotConvertible(f"{slot} is called with {len(drop.args)} arguments")
    # Walk from the drop path to the residual add: what follows it must scale or move its values only.
    carried, post, add, end = {drop}, [], None, None
    frontier = sorted(drop.users, key=order.get)
    while frontier:
        node = frontier.pop(0)
        if node in carried:
            continue
        data_args = [a for a in node.all_input_nodes if a in carried]
        if (_calls(node, _ADDS) and len(node.args) == 2 and not node.kwargs and len(data_args) == 1
                and not _is_shape(node)):
            if add is not None and add is not node:
                raise NotConvertible(f"the output of {slot} reaches two adds")
            add, end = node, data_args[0]
            continue
        if node.op == "output":
            raise NotConvertible(f"the output of {slot} is the block's output (no residual add in this block)")
        reason = _post_op_reason(block, node, carried)
        if reason:
            raise NotConvertible(reason)
        carried.add(node)
        post.append(node)
        frontier = sorted(set(frontier) | set(node.users), key=order.get)
    if add is None:
        raise NotConvertible(f"the output of {slot} is not added to a shortcut")
    shortcut = next(a for a in add.args if a is not end)
    if not isinstance(shortcut, fx.Node) or _depends_on(shortcut, {drop}, {}):
        raise NotConvertible(f"the shortcut of {slot}'s residual add depends on the branch")
    # Every value that follows the drop path must end in the add (not in the block's output as well).
    for node in post:
        if any(u not in carried and u is not add for u in node.users):
            raise NotConvertible(f"{node.format_node()} after {slot} is also used outside the residual")

    # The branch: the nodes before the drop path that nothing but the region uses.
    region = set(post) | {drop}
    branch_out = drop.args[0]
    for node in sorted((n for n in order if order[n] < order[drop]), key=order.get, reverse=True):
        if node.op in ("placeholder", "output") or not node.users:
            continue
        if all(u in region for u in node.users) and (node is branch_out or _depends_on(branch_out, {node}, {})
                                                     or node.op == "get_attr"):
            region.add(node)
    if branch_out not in region or branch_out.op in ("placeholder", "get_attr"):
        raise NotConvertible(f"{slot} drops the shortcut or a shared value: there is no branch of its own to skip")
    # Indexing and reshapes of a call that stays outside (MViTv2's attention and its feature size): nothing to skip.
    if all(n in post or n is drop or _is_shape(n) or n.op == "get_attr" or _calls(n, _LAYOUT) for n in region):
        raise NotConvertible(f"the branch of {slot} computes nothing of its own: its value comes from "
                             f"{branch_out.format_node()}, whose call is also used outside the residual")
    for node in region:
        in_place = node.op == "call_method" and str(node.target).endswith("_") or _inplace_module(block, node)
        if in_place and node.args and node.args[0] not in region:
            raise NotConvertible(f"the branch of {slot} changes a value outside it in place ({node.format_node()})")
    return _Site(slot, drop, add, shortcut, sorted(region, key=order.get), end)


# -- the rewrite -------------------------------------------------------------------------------------------------
@dataclass
class _Rewrite:
    """A block's training forward for one kind of call: generated code and the branches it hands its gates."""
    fn: Any
    branches: Tuple[Branch, ...]


def _compile_graph(graph: fx.Graph, name: str, out_spec: Any = None):
    """The graph's code as a function; with ``out_spec``, it returns that structure of the graph's flat output."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<sdzoo {name}>", "exec"), namespace)  # noqa: S102  (FX's own generated code)
    fn = namespace["forward"]
    return fn if out_spec is None else lambda *args: tree_unflatten(fn(*args), out_spec)


def _branch_of(block: nn.Module, site: _Site, placeholders: List[fx.Node], name: str) -> Tuple[Branch, List[fx.Node]]:
    """The site's branch as a function of its inputs (nodes of the block's graph), which it also returns."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    inputs: List[fx.Node] = []
    sizes: List[fx.Node] = []  # sizes read before the branch, in an order that computes each after its inputs

    def add_input(node: fx.Node) -> None:
        if node in env:
            return
        if node.op != "placeholder" and _is_shape(node) and node.all_input_nodes:
            for arg in node.all_input_nodes:
                add_input(arg)
            env[node] = node  # copied below, once every input has its placeholder
            sizes.append(node)
        else:
            inputs.append(node)
            env[node] = graph.placeholder(f"in{len(inputs)}")

    region = set(site.region)
    for arg in (a for node in site.region for a in node.all_input_nodes if a not in region):
        add_input(arg)
    for node in sizes + site.region:
        env[node] = env[node.args[0]] if node is site.drop else graph.node_copy(node, lambda n: env[n])
    graph.output(env[site.end])
    graph.lint()
    # A get_attr may also read a buffer (the attention mask of Swin's shifted windows): not the branch's state.
    parameters = dict(block.named_parameters(remove_duplicate=False))
    modules = sorted({n.target for n in site.region if n.op == "call_module"})
    params = sorted({n.target for n in site.region if n.op == "get_attr" and n.target in parameters})
    extras = getattr(block, "_sdzoo_batched_inputs", None) or {}
    branch = Branch(block, _compile_graph(graph, name), modules, param_names=params,
                    batched=[_input_batched(n, placeholders, extras) for n in inputs])
    return branch, inputs


def _input_batched(node: fx.Node, placeholders: List[fx.Node], extras: Dict[str, bool]) -> Optional[bool]:
    """Whether a branch input holds the samples first (None: "if its first dimension is the batch size"): one
    made from the block's main input is judged by its size, from extra inputs by what the probe saw of them."""
    roots = [p for p in placeholders if _depends_on(node, {p}, {})]
    if not roots or placeholders[0] in roots:
        return None
    flags = [extras.get(_argument_name(r, list(extras))) for r in roots]
    if all(f is False for f in flags):
        return False
    return True if any(flags) else None


def _argument_name(placeholder: fx.Node, params: Sequence[str]) -> str:
    """The forward parameter a placeholder stands for (FX names a specialised tuple's ``<name>_1``, ...)."""
    target = str(placeholder.target)
    if target in params:
        return target
    matches = [p for p in params if re.fullmatch(rf"{re.escape(p)}_\d+", target)]
    return max(matches, key=len) if matches else target


def _rewrite(block: nn.Module, key: Tuple[Any, ...], slots: Sequence[str]) -> Tuple[_Rewrite, List[_Site]]:
    """The training forward of ``block`` with each gated site's add replaced by a call of its gate."""
    graph = _trace(block, key)
    sites, _ = _find_sites(block, graph, slots)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    cls = type(block).__name__
    made = [_branch_of(block, site, placeholders, f"{cls}.{site.slot}.branch{i}") for i, site in enumerate(sites)]
    # The same graph, each site's region and add replaced by ``slot(site, branch, ...)``, and one placeholder per
    # forward parameter (the trace has one per element of a specialised tuple, which fed asserts only).
    new = fx.Graph()
    branches_arg = new.placeholder("sdzoo_branches")
    params = [p.name for p in _forward_params(block)]
    arguments = {name: new.placeholder(name) for name in params}
    env: Dict[fx.Node, Any] = {}
    for node in placeholders:
        if _argument_name(node, params) not in arguments:
            raise NotConvertible(f"its trace has an input {node.target!r} that is not a parameter of its forward")
        env[node] = arguments[_argument_name(node, params)]
    skipped = {n for s in sites for n in s.region}
    at_add = {s.add: i for i, s in enumerate(sites)}
    uses: Counter = Counter()  # the sites of each slot so far
    for node in graph.nodes:
        if node in skipped or node.op == "placeholder" or _calls(node, FX_ASSERTS):
            continue  # the asserts: the trace's checks of its specialised arguments, which the cache key makes
        if node in at_add:
            site, inputs = sites[at_add[node]], made[at_add[node]][1]
            branch = new.call_function(operator.getitem, (branches_arg, at_add[node]))
            env[node] = new.call_module(site.slot, (uses[site.slot], branch, env[site.shortcut],
                                                    *[env[n] for n in inputs]))
            uses[site.slot] += 1
        else:
            env[node] = new.node_copy(node, lambda n: env[n])
    for node in reversed(list(new.nodes)):  # the comparisons that fed the dropped asserts
        if node.op == "call_function" and node.target is operator.eq and not node.users:
            new.erase_node(node)
    new.lint()
    # A specialised tuple (a feature size) makes FX trace with its pytree codegen: the output is flattened.
    fn = _compile_graph(new, f"{cls}.forward", fx_output_spec(graph))
    return _Rewrite(fn, tuple(branch for branch, _ in made)), sites


# -- converted blocks ---------------------------------------------------------------------------------------------
_REWRITES = "_sdzoo_rewrites"  # call key -> _Rewrite (None: the call runs timm's forward, with masks)
_REWRITE_KEYS = "_sdzoo_rewrite_keys"  # in a pickled block's state: call key -> whether it had a rewrite
_NAME = "_sdzoo_name"  # the block's name in the converted model, for messages


class DropPathGatedBlock:
    """Mixed into a converted block's class: the rewritten forward in training, timm's in eval mode."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            rewrite = _rewrite_for(self, args, kwargs)
            if rewrite is not None:
                defaults = [kwargs.get(name, default) for name, default in self._sdzoo_params[len(args):]]
                return rewrite.fn(self, rewrite.branches, *args, *defaults)
        return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol: int):
        # Only the kinds of call are pickled: a copy (EMA, spawn, torch.load) makes its rewrites as it is rebuilt.
        state = {k: v for k, v in self.__dict__.items() if k != _REWRITES}
        state[_REWRITE_KEYS] = {key: rewrite is not None for key, rewrite in self.__dict__[_REWRITES].items()}
        return _new_gated_block, (_own_class(self),), state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        keys = state.pop(_REWRITE_KEYS, {})
        super().__setstate__(state)
        self.__dict__[_REWRITES] = {key: None for key, made in keys.items() if not made}  # warned already
        for key, made in keys.items():
            if made:
                _build_rewrite(self, key)


_GATED_CLASSES: Dict[type, type] = {}


def _gated_class(cls: type) -> type:
    """``Gated<Block>``, made once per class; it names the block's class also under subclasses (FSDP's)."""
    if cls not in _GATED_CLASSES:
        _GATED_CLASSES[cls] = type(f"Gated{cls.__name__}", (DropPathGatedBlock, cls),
                                   {"__module__": __name__, "__qualname__": f"Gated{cls.__qualname__}",
                                    "_sdzoo_timm_class": cls})
    return _GATED_CLASSES[cls]


def _new_gated_block(cls: type) -> nn.Module:
    return object.__new__(_gated_class(cls))


def _rewrite_for(block: nn.Module, args: tuple, kwargs: dict) -> Optional[_Rewrite]:
    key = _call_key_fast(block, args, kwargs)
    rewrites = block.__dict__[_REWRITES]
    if key in rewrites:  # (None: a call whose arguments make no key; it was warned of)
        return rewrites[key]
    if not torch.compiler.is_compiling():
        return _build_rewrite(block, key)
    # Names only: inside a compiled frame the values may be symbolic, which dynamo cannot format.
    name = block.__dict__.get(_NAME) or type(block).__name__
    names = [n for n, _ in block._sdzoo_params][:len(args)] + sorted(kwargs)
    what = "with " + ", ".join(names) if key is not None else "with an argument that makes no kind of call"
    raise RuntimeError(
        f"convert_drop_path: a compiled training forward called the converted block {name!r} "
        f"({type(block).__name__}) {what}, in a kind of call it was not prepared for at conversion (which ran "
        f"one training forward at the model's input size: another input size changes a feature size). "
        f"Convert with input_size=(C, H, W) of the training inputs, or run one training step of the model as "
        f"it will be called before torch.compile, so that the block's rewrite for the call is made eagerly.")


def _call_key_fast(block: nn.Module, args: tuple, kwargs: dict) -> Optional[Tuple[Any, ...]]:
    """Which arguments are tensors and the values of the others (None: no key), without ``inspect``: compiled."""
    params = block._sdzoo_params
    if len(args) > len(params):
        return None
    key = []
    for i, (name, default) in enumerate(params):
        value = args[i] if i < len(args) else kwargs.get(name, default)
        if isinstance(value, Tensor):
            key.append(_TENSOR)
        elif value is None or isinstance(value, (bool, int, float, str)):
            key.append(("value", value))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            # A list (MViTv2's feat_size) keys as the tuple of its items and is traced as a list again.
            key.append(("value", value) if isinstance(value, tuple) else ("list", tuple(value)))
        else:
            return None
    return tuple(key)


@torch.compiler.disable
def _build_rewrite(block: nn.Module, key: Optional[Tuple[Any, ...]]) -> Optional[_Rewrite]:
    """The rewrite for a kind of call, made at conversion or when a new kind first runs eagerly. Where it cannot
    be made, the call runs timm's forward and masks, with a warning once for the block and kind of call."""
    slots = {name: m for name, m in block.named_children() if isinstance(m, DropPathGate)}
    try:
        if key is None:
            raise NotConvertible("an argument is neither a tensor nor a number, string or flat tuple/list of them")
        rewrite, sites = _rewrite(block, key, list(slots))
        counts = {name: sum(s.slot == name for s in sites) for name in slots}
        if any(counts[name] != len(gate.indices) for name, gate in slots.items()):
            raise NotConvertible(f"this call uses its drop paths {counts} times, the conversion saw "
                                 f"{ {n: len(g.indices) for n, g in slots.items()} }")
    except NotConvertible as e:
        name = block.__dict__.get(_NAME) or "?"
        warnings.warn(f"convert_drop_path: block {name!r} ({_own_class(block).__name__}) called with {key}: {e}; "
                      f"this call runs timm's drop-path masks in training (no real skip)", RuntimeWarning,
                      stacklevel=3)
        rewrite = None
    else:
        _keep_shortcuts_unchanged(block, sites)
        for site in sites:  # a branch with a BatchNorm keeps 2 samples: one sample's 1x1 map has no statistics
            if any(isinstance(m, BATCH_NORMS) for n in site.region if n.op == "call_module"
                   for m in block.get_submodule(n.target).modules()):
                for index in slots[site.slot].indices:
                    slots[site.slot].sampler.min_kept[index] = 2
    block.__dict__.setdefault(_REWRITES, {})[key] = rewrite
    return rewrite


def _keep_shortcuts_unchanged(block: nn.Module, sites: Sequence[_Site]) -> None:
    """An in-place module after the add (RepVGG's ReLU, also behind an Identity or a reshape) made out of place: a
    skipped branch returns its shortcut, which the caller may still hold."""
    for site in sites:
        frontier = list(site.add.users)
        while frontier:
            user = frontier.pop()
            if _inplace_module(block, user):
                block.get_submodule(user.target).inplace = False
            elif (user.op == "call_module" and isinstance(block.get_submodule(user.target), nn.Identity)
                  or _calls(user, _LAYOUT)):
                frontier.extend(user.users)


# -- what a model's drop paths are ---------------------------------------------------------------------------------
@dataclass
class BlockReport:
    """What ``convert_drop_path`` finds in one block that holds DropPath layers with a positive rate."""
    name: str  # the block's name in the model
    block: nn.Module
    rates: Dict[str, float]  # slot -> timm's rate
    sites: Dict[str, int] = field(default_factory=dict)  # slot -> residual adds it feeds (0: never called)
    masks: Dict[str, str] = field(default_factory=dict)  # slot -> why it stays timm's mask
    refused: Optional[str] = None  # why the block cannot be converted at all

    @property
    def block_class(self) -> str:
        cls = _own_class(self.block)
        return f"{cls.__module__}.{cls.__qualname__}"


def inspect_drop_paths(model: nn.Module) -> List[BlockReport]:
    """Every block of ``model`` that holds a DropPath with a positive rate, and what its forward does with it."""
    holders: Dict[str, Tuple[nn.Module, Dict[str, float]]] = {}
    for name, module in model.named_modules():
        for slot, child in module.named_children():
            if isinstance(child, DropPath) and child.drop_prob > 0:
                holders.setdefault(name, (module, {}))[1][slot] = float(child.drop_prob)
    reports = []
    for name, (block, rates) in holders.items():
        report = BlockReport(name, block, rates)
        try:
            sites, report.masks = _find_sites(block, _trace(block, _default_key(block)), list(rates))
            report.sites = {slot: sum(s.slot == slot for s in sites) for slot in rates if slot not in report.masks}
        except NotConvertible as e:
            report.refused = str(e)
        reports.append(report)
    return reports


def _default_key(block: nn.Module) -> Tuple[Any, ...]:  # the call key of ``block(x)``
    return tuple(_TENSOR if i == 0 or p.default is inspect.Parameter.empty or isinstance(p.default, Tensor)
                 else ("value", p.default) for i, p in enumerate(_forward_params(block)))


# -- the calls of a training forward ----------------------------------------------------------------------------
def _probe_calls(model: nn.Module, blocks: Sequence[nn.Module], batch_sizes: Sequence[int],
                 size: Optional[Tuple[int, ...]]) -> Dict[int, Set[Any]]:
    """The kinds of call (``_call_key_fast``) each block gets in a training forward at ``size``, seen without
    memory or compute, so that their rewrites are made at conversion, not in a compiled graph. At two batch
    sizes it also sees which extra tensor inputs hold the batch first (masks, rotary tables), and the rows per
    sample a block gets (MobileViT's transformer: patches x batch); what it cannot see is judged at run time."""
    keys: Dict[int, Set[Any]] = {id(b): set() for b in blocks}
    if size is None:
        return keys
    shapes: Dict[int, Dict[str, List[Tuple[int, ...]]]] = {id(b): {} for b in blocks}  # argument -> its shapes

    def record(block, args, kwargs):
        keys[id(block)].add(_call_key_fast(block, args, kwargs))
        for name, value in dict(zip([n for n, _ in block._sdzoo_params], args), **kwargs).items():
            if isinstance(value, Tensor) and value.dim() > 0:
                shapes[id(block)].setdefault(name, []).append(tuple(value.shape))

    def reset():  # what a failed way recorded
        for values in (*keys.values(), *shapes.values()):
            values.clear()

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    modes = {m: m.training for m in model.modules()}  # restored one by one: a frozen BatchNorm stays frozen
    model.train()
    try:
        ran = _run_without_memory(model, size, batch_sizes, reset)
    finally:
        for h in handles:
            h.remove()
        for module, training in modes.items():
            module.training = training
    if not ran:  # a model that needs other inputs: its calls are met at run time
        return {id(b): set() for b in blocks}
    if len(batch_sizes) < 2:
        return keys
    low, high = batch_sizes[0], batch_sizes[-1]
    for block in blocks:
        main = shapes[id(block)].pop(block._sdzoo_params[0][0] if block._sdzoo_params else None, [])
        block._sdzoo_batched_inputs = {name: (seen[0][0], seen[-1][0]) == (low, high)
                                       for name, seen in shapes[id(block)].items()
                                       if len(seen) >= 2 and len({len(s) for s in seen}) == 1}
        # Where the block's batch is a fixed multiple of the model's, the pre-hook draws its rows too.
        rows = main[0][0] // low if main else None
        if main and any(shape[0] != rows * b for shape, b in zip(main, batch_sizes)):
            rows = None
        for gate in block.children():
            if isinstance(gate, DropPathGate):
                for index in gate.indices:
                    gate.sampler.rows_per_sample[index] = rows
    return keys


def _run_without_memory(model: nn.Module, size: Tuple[int, ...], batch_sizes: Sequence[int], reset) -> bool:
    """Whether training forwards of ``model`` at ``size`` ran, computing and changing nothing: on meta copies of
    its parameters and buffers, or (a model that makes CPU tensors of its own) with fake tensors, many times slower."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    meta_state = {name: torch.empty_like(t, device="meta") for name, t in named}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # A model built for another input size fails here, and the fake-tensor mode logs each failing op first.
    fake_log = logging.getLogger(FakeTensorMode.__module__)
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        for on_meta in (True, False):
            reset()
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if on_meta:
                        for batch in batch_sizes:
                            functional_call(model, meta_state, (torch.empty(batch, *size, device="meta"),))
                        return True
                    for m in model.modules():  # the real buffers: running statistics left as they are
                        if getattr(m, "running_mean", None) is not None:
                            m.eval()
                    with FakeTensorMode(allow_non_fake_inputs=True):
                        for batch in batch_sizes:
                            model(torch.empty(batch, *size, device=device))
                    return True
            except Exception:  # noqa: BLE001  (the next way, or none)
                continue
        return False
    finally:
        fake_log.setLevel(level)


def model_input_size(model: nn.Module) -> Optional[Tuple[int, ...]]:
    """(C, H, W) the model is built for: its patch embedding's image size, else its pretrained cfg's (or None)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(s, int) for s in img_size):
        return (getattr(model, "in_chans", 3), *img_size)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return tuple(size) if size else None


# -- the conversion ------------------------------------------------------------------------------------------------
def convert_drop_path(model: nn.Module, mode: str = "sample", seed: int = 0,
                      min_drop_rate: float = BREAK_EVEN_DROP_RATE,
                      input_size: Optional[Sequence[int]] = None) -> nn.Module:
    """Give a timm model built with ``drop_path_rate`` a real skip, in place; returns the model (docs/convert.md).

    mode: "sample" (DINOv2's subset of round(keep * B) samples) or "batch" (one gate per branch for the batch).
    seed: the gates' generator, the same on every run and rank. min_drop_rate: a branch below it stays timm's mask.
    input_size: (C, H, W) whose calls are prepared at conversion (default: ``model_input_size``).
    ``model`` may be wrapped in DistributedDataParallel. Raises ValueError, naming the block and why, where nothing
    converts or a block cannot be traced; a DropPath off a residual stays timm's mask (``inspect_drop_paths``).
    """
    check_choice("mode", mode, CONVERT_MODES)
    check_int("seed", seed, 0, 2**63 - 1)
    check_fraction("min_drop_rate", min_drop_rate, include_one=False)
    size = check_input_size("input_size", input_size) if input_size is not None else None
    target = _unwrap(model)
    if getattr(target, "drop_path_sampler", None) is not None:
        raise ValueError("model is already converted (it has a drop_path_sampler)")

    reports = inspect_drop_paths(target)
    refused = [r for r in reports if r.refused]
    if refused:
        first = refused[0]
        more = f" (and {len(refused) - 1} more blocks)" if len(refused) > 1 else ""
        raise ValueError(f"convert_drop_path cannot convert {first.block_class} ({first.name!r} of "
                         f"{type(target).__name__}): {first.refused}{more}")
    gated = [(r, slot) for r in reports for slot, count in r.sites.items()
             if count and r.rates[slot] >= min_drop_rate]
    if not gated:
        masks = [f"{r.block_class}.{slot}: {why}" for r in reports for slot, why in r.masks.items()]
        detail = f"; these DropPaths are not on a residual branch: {'; '.join(masks[:3])}" if masks else ""
        raise ValueError(f"nothing to convert in {type(target).__name__}: no DropPath with a rate of at least "
                         f"min_drop_rate={min_drop_rate} on a residual branch (build it with drop_path_rate > 0)"
                         f"{detail}")
    never = [f"{r.name}.{slot}" for r, slot in gated if r.rates[slot] >= 1.0]
    if never:  # the gates trust their rates: checked here, once
        raise ValueError(f"drop_prob of {', '.join(never[:3])} must be below 1 to convert (at 1 the branch "
                         f"never runs: a survival probability of 0)")

    sampler = DropPathSampler([1.0 - r.rates[slot] for r, slot in gated for _ in range(r.sites[slot])], mode, seed)
    sampler.rows_per_sample = [None] * len(sampler.survival_probs)  # until the probe below sees the batches
    sampler.masks = [(getattr(r.block, slot), rate) for r in reports for slot, rate in r.rates.items()
                     if r.sites.get(slot) and rate < min_drop_rate]
    start = 0
    for report, slot in gated:
        count = report.sites[slot]
        gate = DropPathGate(report.rates[slot], getattr(report.block, slot).scale_by_keep,
                            range(start, start + count), sampler)
        setattr(report.block, slot, gate)
        start += count
    converted = [r for r in reports if any(r is g for g, _ in gated)]
    for report in converted:
        report.block._sdzoo_params = tuple((p.name, None if p.default is inspect.Parameter.empty else p.default)
                                           for p in _forward_params(report.block))
        report.block.__dict__[_NAME] = report.name
    calls = _probe_calls(target, [r.block for r in converted], (2, 3) if mode == "sample" else (2,),
                         size or model_input_size(target))
    for report in converted:
        block = report.block
        block.__class__ = _gated_class(type(block))
        block.__dict__[_REWRITES] = {}
        for key in calls[id(block)] or {_default_key(block)}:  # the default: a model the probe cannot run
            _build_rewrite(block, key)

    target.drop_path_sampler = sampler
    sampler.attach(target)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    if isinstance(model, OptimizedModule):
        raise ValueError("convert_drop_path(model) must come before torch.compile(model): the compiled model "
                         "has traced the unconverted forward")
    if isinstance(model, fx.GraphModule):
        raise ValueError("convert_drop_path cannot convert a torch.fx GraphModule (such as features_only "
                         "with feature_cls='fx'): its code calls the layers of each block directly; convert the "
                         "model before tracing it")
    return model


# -- timm's own scripts, unedited: an opt-in by environment ----------------------------------------------------------
CONVERT_ENV = "SDZOO_CONVERT_DROP_PATH"
SEED_ENV = "SDZOO_CONVERT_SEED"
_OFF_VALUES = ("", "0", "off", "no", "false")


def install_create_model_hook() -> bool:
    """With ``SDZOO_CONVERT_DROP_PATH=sample`` (or ``batch``), ``timm.create_model`` converts every model it builds
    with drop paths (``SDZOO_CONVERT_SEED``: the seed), timm's train.py too. Whether the hook is in place."""
    import timm
    import timm.models

    if os.environ.get(CONVERT_ENV, "").strip().lower() in _OFF_VALUES:
        return False
    original = timm.models.create_model
    if getattr(original, "_sdzoo_converting", False):
        return True

    @functools.wraps(original)
    def create_model(model_name, *args, **kwargs):
        mode, seed = _environment_settings()
        model = original(model_name, *args, **kwargs)
        if getattr(model, "drop_path_sampler", None) is None and any(
                isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules()):
            try:
                convert_drop_path(model, mode=mode, seed=seed)
            except ValueError as e:  # masks only, or a block FX cannot read: train as timm would, and say so
                warnings.warn(f"{CONVERT_ENV}={mode}: {model_name} keeps timm's drop-path masks: {e}",
                              RuntimeWarning, stacklevel=2)
                return model
            print(f"sdzoo: {CONVERT_ENV}={mode}: {model_name} converted, "
                  f"{len(model.drop_path_sampler.survival_probs)} branches on gates (seed {seed})", file=sys.stderr)
        return model

    create_model._sdzoo_converting = True
    # timm's public names of the factory; timm's own code calls it through them (its scripts: timm.models)
    for module in (timm.models, timm):
        if getattr(module, "create_model", None) is original:
            module.create_model = create_model
    return True


def _environment_settings() -> Tuple[str, int]:
    mode = os.environ.get(CONVERT_ENV, "").strip().lower()
    if mode not in CONVERT_MODES:
        raise ValueError(f"{CONVERT_ENV} must be one of {', '.join(map(repr, CONVERT_MODES))} (or unset, or "
                         f"'off'); got {os.environ.get(CONVERT_ENV)!r}")
    raw = os.environ.get(SEED_ENV, "0").strip()
    return mode, check_int(SEED_ENV, int(raw) if raw.isdecimal() else raw, 0, 2**63 - 1)
