"""Depth on demand: a shallower network from one trained stochastic-depth model.

A network trained with stochastic depth has learned to work with blocks missing. Veit et al. (NeurIPS 2016)
deleted single blocks of trained ResNets at test time and lost little; LayerDrop (Fan et al., 2019) prunes a
model trained with layer drop to any depth. ``prune_blocks`` keeps ``keep`` residual blocks of a model and
returns an ordinary zoo model with fewer blocks per stage (``layers=[...]``), folded, gates off: a removed
block's branch contributes nothing, its shortcut (the identity) is all that is left of it. The first block of
each stage is always kept: it holds the stage's downsampling shortcut where the shape changes, and a stage
cannot be empty.

Which blocks go (``order``):

* ``"survival"``: the lowest trained p_l first (the deepest blocks under the linear rule), ties to the later
  block; a constant-depth model (every p_l 1) loses its deepest blocks first too, so the twins of a
  comparison lose the same blocks;
* ``"evenly"``: fairseq's advice for LayerDrop, the kept blocks spaced evenly within each stage (block
  ``floor(j * n / k)`` of a stage of n blocks keeping k: ``0, 2, 4`` of 6), each stage keeping its share of
  ``keep``;
* ``"greedy"``: Veit's lesion study as a search, one block at a time, the one whose removal raises the
  validation loss on ``data["val"]`` least; the record says how many evaluations that took;
* a list of block names to keep (``"layer1.0"``, ...).

The pruned model records where it came from in ``model.pruned_from`` (the source architecture and
``layers``, the names of the kept blocks there, the order, the BatchNorm recalibration), which config.json,
the weights' metadata and the ONNX metadata carry; a pruned model can be pruned again, and its record then
names blocks of the first source.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdzoo.fold import BATCH_NORMS, fold_survival

__all__ = ["ORDERS", "prune_blocks", "block_names", "required_blocks", "blocks_to_keep", "greedy_removals",
           "recalibrate_batchnorm", "trained_survival_probs"]

ORDERS = ("survival", "evenly", "greedy")
ProgressCallback = Optional[Callable[[str], None]]


# -- the model's blocks ---------------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> None:
    if not hasattr(model, "residual_blocks") or not hasattr(model, "survival_settings") or \
            not hasattr(model, "stage_names"):
        raise ValueError(f"model must be an sdzoo stochastic-depth ResNet (SDResNet, with residual blocks in "
                         f"stages); got {type(model).__name__}")


def _stage_depths(model: nn.Module) -> List[int]:
    return [len(getattr(model, name)) for name in model.stage_names]


def _names_of(stage_names: Sequence[str], layers: Sequence[int]) -> List[str]:
    return [f"{stage}.{i}" for stage, n in zip(stage_names, layers) for i in range(n)]


def block_names(model: nn.Module) -> List[str]:
    """The model's residual blocks by module name (``layer1.0``, ...), in schedule order l = 1..L."""
    _check_model(model)
    return _names_of(model.stage_names, _stage_depths(model))


def required_blocks(model: nn.Module) -> List[str]:
    """The blocks every pruned model keeps: the first of each stage."""
    _check_model(model)
    return [f"{stage}.0" for stage in model.stage_names]


def _source(model: nn.Module) -> Tuple[str, List[int], List[str]]:
    """(architecture, layers, the name there of each block of the model) of the model the weights were trained
    as: the model itself, or what a pruned model records."""
    record = getattr(model, "pruned_from", None)
    if record:
        return record["architecture"], list(record["layers"]), list(record["kept"])
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return architecture, _stage_depths(model), block_names(model)


def trained_survival_probs(model: nn.Module) -> List[float]:
    """p_l of each of the model's blocks under the settings its weights were trained with (after folding or
    pruning too): 1.0 for every block of a model trained at constant depth."""
    _check_model(model)
    _, layers, names = _source(model)
    trained = model.survival_settings.folded_from or model.survival_settings
    probs = trained.block_survival_probs(sum(layers))
    index = {name: i for i, name in enumerate(_names_of(model.stage_names, layers))}
    return [probs[index[name]] for name in names]


def _check_gates_match_settings(model: nn.Module) -> None:
    """The gates must hold what the survival settings say: p_l = 1 on a folded model (p_l is in its weights),
    the schedule's p_l on one that is not. A model whose weights were folded by other settings than it records
    would be folded again, or left unfolded, into a wrong network."""
    settings, gates = model.survival_settings, model.block_survival_probs()
    if settings.folded_from is not None:
        expected, state = [1.0] * len(gates), f"folded (folded_from={settings.folded_from.trained_dict()})"
    else:
        expected = settings.block_survival_probs(len(gates))
        state = (f"not folded, with survival_prob={settings.survival_prob}, survival_rule="
                 f"{settings.survival_rule!r}, gate_mode={settings.gate_mode!r}")
    wrong = [i for i, (p, q) in enumerate(zip(gates, expected)) if not math.isclose(p, q, abs_tol=1e-9)]
    if wrong:
        i = wrong[0]
        raise ValueError(f"model: its survival_settings say it is {state}, but its gates hold other p_l (block "
                         f"{i + 1} of {len(gates)}: {gates[i]:.4f}, the settings give {expected[i]:.4f}): its "
                         "weights and its metadata disagree, so it cannot be folded or pruned; rebuild it from "
                         "its files (timm.create_model) or fold it with sdzoo.fold.fold_survival")


# -- which blocks -------------------------------------------------------------------------------------------
def _check_keep(model: nn.Module, keep: Any) -> int:
    names, required = block_names(model), required_blocks(model)
    if len(names) == len(required):
        raise ValueError(f"model has no residual block to prune: each of its {len(names)} blocks is the first of "
                         "its stage, which every pruned model keeps")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an integer number of residual blocks, from {len(required)} to "
                         f"{len(names)}; got {keep!r}")
    if keep < len(required):
        lowest = f" ({', '.join(required)})"
        raise ValueError(f"keep must be at least {len(required)}, the first block of each stage{lowest}, which "
                         f"every pruned model keeps (it holds the stage's downsampling shortcut); got {keep}")
    if keep > len(names):
        raise ValueError(f"keep must be at most {len(names)}, the model's residual blocks; got {keep}")
    return keep


def _check_names(model: nn.Module, kept: Sequence[Any]) -> List[str]:
    names, required = block_names(model), required_blocks(model)
    if isinstance(kept, (str, bytes)) or not isinstance(kept, Sequence) or not kept:
        raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))} or a list of block names to keep; "
                         f"got {kept!r:.200}")
    unknown = [n for n in kept if n not in names]
    if unknown:
        raise ValueError(f"order: unknown block name(s) {', '.join(map(repr, unknown[:5]))}; the model's blocks "
                         f"are {names[0]} to {names[-1]} ({', '.join(names[:4])}, ...)")
    if len(set(kept)) != len(kept):
        raise ValueError(f"order: block names must not repeat; got {list(kept)!r:.200}")
    missing = [n for n in required if n not in kept]
    if missing:
        raise ValueError(f"order: the first block of each stage must be kept (it holds the stage's downsampling "
                         f"shortcut); missing {', '.join(missing)}")
    return sorted(kept, key=names.index)


def _survival_keep(model: nn.Module, keep: int) -> List[str]:
    names, required = block_names(model), set(required_blocks(model))
    probs = trained_survival_probs(model)
    # Highest p_l first, ties to the earlier block: the last ones in this order go first.
    ranked = sorted((i for i, n in enumerate(names) if n not in required), key=lambda i: (-probs[i], i))
    kept = set(required) | {names[i] for i in ranked[:keep - len(required)]}
    return [n for n in names if n in kept]


def _evenly_keep(model: nn.Module, keep: int) -> List[str]:
    depths = _stage_depths(model)
    # Each stage's share of keep, by its number of blocks: from its first block, one block at a time to the stage
    # furthest below its share (ties to the earlier stage).
    counts = [1] * len(depths)
    for _ in range(keep - len(depths)):
        open_stages = [s for s in range(len(depths)) if counts[s] < depths[s]]
        stage = max(open_stages, key=lambda s: (keep * depths[s] / sum(depths) - counts[s], -s))
        counts[stage] += 1
    return [f"{stage}.{(j * n) // k}" for stage, n, k in zip(model.stage_names, depths, counts) for j in range(k)]


def _loss(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size])
            total += float(F.cross_entropy(logits.float(), labels[start:start + batch_size], reduction="sum"))
    return total / len(images)


@contextlib.contextmanager
def _branches_off(model: nn.Module, names: Sequence[str]):
    """The blocks ``names`` of ``model`` return their shortcut, their branch contributing nothing: what the
    model pruned of them computes (a forward hook replaces the gate's output, ``shortcut + branch``)."""
    handles = [model.get_submodule(name).gate.register_forward_hook(lambda module, args, output: args[1])
               for name in names]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def greedy_removals(model: nn.Module, data: Any, down_to: Optional[int] = None,
                    progress: ProgressCallback = None) -> Tuple[List[str], int]:
    """The greedy order: the blocks in the order they are removed, each the one whose removal raises the loss
    on ``data["val"]`` least (Veit's lesion study, repeated), down to ``down_to`` blocks (default: the first
    block of each stage); and how many evaluations that took. Nested: the first k removals are those of a
    greedy prune by k blocks."""
    _check_model(model)
    images, labels = _split(data, "val", "order='greedy'", labels=True)
    names, required = block_names(model), required_blocks(model)
    down_to = len(required) if down_to is None else _check_keep(model, down_to)
    state, settings = _folded_source(model)
    folded = _pruned(model, (state, settings), names, record={}).eval()  # the folded model, a copy
    kept, removed, evaluations = list(names), [], 0
    while len(kept) > down_to:
        best = None
        for name in reversed(kept):  # from the last block: ties go to the later block
            if name in required:
                continue
            with _branches_off(folded, removed + [name]):
                loss = _loss(folded, images, labels)
            evaluations += 1
            if best is None or loss < best[0]:
                best = (loss, name)
        kept.remove(best[1])
        removed.append(best[1])
        if progress is not None:
            progress(f"greedy: removed {best[1]} (validation loss {best[0]:.4f}), {len(kept)} blocks left, "
                     f"{evaluations} evaluations so far")
    return removed, evaluations


def blocks_to_keep(model: nn.Module, keep: Optional[int], order: Union[str, Sequence[str]] = "survival",
                   data: Any = None, progress: ProgressCallback = None) -> Tuple[List[str], Optional[int]]:
    """The names of the blocks a prune keeps, in model order, and the evaluations it took (greedy only)."""
    _check_model(model)
    if not isinstance(order, str):
        kept = _check_names(model, order)
        if keep is not None and _check_keep(model, keep) != len(kept):
            raise ValueError(f"keep must be the number of blocks named by order ({len(kept)}) or None; got {keep}")
        _check_keep(model, len(kept))
        return kept, None
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))} or a list of block names to keep; "
                         f"got {order!r}")
    keep = _check_keep(model, keep)
    if order == "survival":
        return _survival_keep(model, keep), None
    if order == "evenly":
        return _evenly_keep(model, keep), None
    removed, evaluations = greedy_removals(model, data, down_to=keep, progress=progress)
    return [n for n in block_names(model) if n not in removed], evaluations


# -- data ---------------------------------------------------------------------------------------------------
def _split(data: Any, split: str, needed_by: str, labels: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``data[split]``: (images, labels) tensors (or arrays), the images normalised as the model's input."""
    if not isinstance(data, Mapping) or data.get(split) is None:
        what = "a held-out split to rank blocks on" if split == "val" else "training images"
        raise ValueError(f"data must be a mapping with {split!r}: (images, labels) ({what}) for {needed_by}; "
                         f"got {'None' if data is None else type(data).__name__}")
    value = data[split]
    images, targets = (value if isinstance(value, (tuple, list)) else (value, None))
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"data[{split!r}] images must be a non-empty (N, C, H, W) batch; got shape "
                         f"{tuple(images.shape)}")
    if labels:
        if targets is None or len(targets) != len(images):
            raise ValueError(f"data[{split!r}] must be (images, labels) with a label for each image")
        targets = torch.as_tensor(targets, dtype=torch.long)
    return images, targets


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Tensor, batch_size: int = 128) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images``, in place: the plain average over the
    images (``momentum=None``), no gradient, the rest of the model in eval mode (a folded or pruned model
    has no gates to draw). Returns the model."""
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return model


# -- the pruned model ----------------------------------------------------------------------------------------
def _folded_source(model: nn.Module) -> Tuple[Dict[str, Tensor], Any]:
    """The model's state dict with p_l folded into it, and its folded survival settings; the model is left as
    it is. With inverted scaling the eval network has no p_l: its weights are the folded ones."""
    _check_gates_match_settings(model)
    settings = model.survival_settings
    if settings.folded_from is not None:
        return model.state_dict(), settings
    if settings.scaling == "inverted":
        return model.state_dict(), settings.folded()
    folded = fold_survival(copy.deepcopy(model))
    return folded.state_dict(), folded.survival_settings


def _pruned(model: nn.Module, source: Tuple[Dict[str, Tensor], Any], kept: Sequence[str],
            record: Dict[str, Any]) -> nn.Module:
    """A new model of the same architecture holding the blocks ``kept`` of ``model`` (renumbered within their
    stage), built through timm with ``layers=[...]`` and loaded strictly."""
    import timm
    from timm.models import get_model_args

    state, settings = source
    architecture, source_layers, source_names = _source(model)
    if not architecture or not timm.is_model(architecture):
        raise ValueError(f"model must be a model of the zoo built by timm.create_model (its pretrained_cfg names "
                         f"its architecture); got architecture {architecture!r}")
    names = block_names(model)
    layers, renamed = [], {}
    for stage in model.stage_names:
        in_stage = [n for n in kept if n.rsplit(".", 1)[0] == stage]
        layers.append(len(in_stage))
        renamed.update({f"{n}.": f"{stage}.{j}." for j, n in enumerate(in_stage)})
    new_state = {}
    for key, value in state.items():
        stage_block = ".".join(key.split(".")[:2]) + "."
        if key.startswith("layer") and stage_block[:-1] in names:
            if stage_block not in renamed:
                continue  # a removed block
            key = renamed[stage_block] + key[len(stage_block):]
        new_state[key] = value
    args = dict(get_model_args(model), **settings.as_model_args(), layers=layers)
    args.pop("pruned_from", None)
    if record:
        index = {n: i for i, n in enumerate(names)}
        args["pruned_from"] = dict(record, architecture=architecture, layers=source_layers,
                                   kept=[source_names[index[n]] for n in kept])
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    pruned = timm.create_model(architecture, pretrained=False, pretrained_cfg=pretrained_cfg, **args)
    pruned.load_state_dict(new_state, strict=True)
    return pruned.train(model.training)


def prune_blocks(model: nn.Module, keep: Optional[int], order: Union[str, Sequence[str]] = "survival",
                 data: Any = None, recalibrate_bn: int = 0, progress: ProgressCallback = None) -> nn.Module:
    """A new folded model with ``keep`` of ``model``'s residual blocks, gates off; ``model`` is left unchanged.

    Args:
        model: a zoo model (``SDResNet``), folded or not, pruned before or not.
        keep: the number of residual blocks to keep, from the number of stages (the first block of each) to
            all of them (then the result is the folded model). None with a list of names as ``order``.
        order: which blocks go: ``"survival"``, ``"evenly"``, ``"greedy"`` (see the module's doc), or the
            list of block names to keep (``["layer1.0", "layer2.0", ...]``).
        data: a mapping of splits to (images, labels), images normalised as the model's input:
            ``"val"`` ranks the blocks for ``greedy`` (a held-out split, never the test split), ``"train"``
            gives the images of ``recalibrate_bn``.
        recalibrate_bn: re-estimate every BatchNorm's running statistics on the first N training images of
            ``data["train"]`` after pruning (0: keep the trained statistics).
        progress: called with a line of text at each step of a long search (greedy).

    Raises:
        ValueError: a bad argument (each message names it and what is allowed), a model that is not a zoo
            model, has no block to prune, or whose gates contradict its survival settings.
    """
    kept, evaluations = blocks_to_keep(model, keep, order, data, progress)
    if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
        raise ValueError(f"recalibrate_bn must be a number of training images >= 0; got {recalibrate_bn!r}")
    train_images = None
    if recalibrate_bn:
        train_images, _ = _split(data, "train", f"recalibrate_bn={recalibrate_bn}", labels=False)
        if recalibrate_bn > len(train_images):
            raise ValueError(f"recalibrate_bn must be at most {len(train_images)}, the images of data['train']; "
                             f"got {recalibrate_bn}")
    record: Dict[str, Any] = dict(order=order if isinstance(order, str) else "names", recalibrate_bn=recalibrate_bn)
    if evaluations is not None:
        record["evaluations"] = evaluations
    previous = getattr(model, "pruned_from", None)
    if previous:  # pruned again: the record keeps how the first prune was done too
        record["previous"] = {k: v for k, v in previous.items() if k not in ("architecture", "layers")}
    pruned = _pruned(model, _folded_source(model), kept, record)
    if train_images is not None:
        recalibrate_batchnorm(pruned, train_images[:recalibrate_bn])
    return pruned
