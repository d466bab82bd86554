"""Depth on demand: a shallower network from one trained stochastic-depth model (docs/depth-on-demand.md).

A network trained with stochastic depth works with blocks missing (Veit et al., 2016; LayerDrop, 2019).
``prune_blocks`` keeps some residual blocks and returns an ordinary zoo model with fewer blocks per stage,
folded, gates off; a removed block leaves only its shortcut. The first block of each stage is always kept: it
holds the stage's downsampling shortcut. ``model.pruned_from`` records the source and the blocks kept there.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.models import get_model_args
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from sdzoo.fold import fold_survival

__all__ = ["ORDERS", "prune_blocks", "block_names", "required_blocks", "blocks_to_keep", "greedy_removals",
           "trained_survival_probs"]

ORDERS = ("survival", "evenly", "greedy")
ProgressCallback = Optional[Callable[[str], None]]


def _names_of(stage_names: Sequence[str], layers: Sequence[int]) -> List[str]:
    return [f"{stage}.{i}" for stage, n in zip(stage_names, layers) for i in range(n)]


def _stage_depths(model: nn.Module) -> List[int]:
    return [len(getattr(model, name)) for name in model.stage_names]


def block_names(model: nn.Module) -> List[str]:
    """The model's residual blocks by module name (``layer1.0``, ...), in schedule order l = 1..L."""
    if not all(hasattr(model, a) for a in ("residual_blocks", "survival_settings", "stage_names")):
        raise ValueError(f"model must be an sdzoo stochastic-depth ResNet (SDResNet, with residual blocks in "
                         f"stages); got {type(model).__name__}")
    return _names_of(model.stage_names, _stage_depths(model))


def required_blocks(model: nn.Module) -> List[str]:
    """The blocks every pruned model keeps: the first of each stage."""
    return [name for name in block_names(model) if name.endswith(".0")]


def _source(model: nn.Module) -> Tuple[str, List[int], List[str]]:
    """(architecture, layers, each block's name there) of the model the weights were trained as."""
    names, record = block_names(model), getattr(model, "pruned_from", None)
    if record:
        return record["architecture"], list(record["layers"]), list(record["kept"])
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture"), _stage_depths(model), names


def trained_survival_probs(model: nn.Module) -> List[float]:
    """p_l of each block under the settings its weights were trained with, folded or pruned since or not."""
    _, layers, names = _source(model)
    trained = model.survival_settings.folded_from or model.survival_settings
    probs = dict(zip(_names_of(model.stage_names, layers), trained.block_survival_probs(sum(layers))))
    return [probs[name] for name in names]


def _check_gates_match_settings(model: nn.Module) -> None:
    """Weights folded by other settings than the model records would be folded again, or left unfolded."""
    settings, gates = model.survival_settings, model.block_survival_probs()
    expected = settings.block_survival_probs(len(gates))  # 1.0 each where folded: its gates are off
    wrong = [i for i, (p, q) in enumerate(zip(gates, expected)) if not math.isclose(p, q, abs_tol=1e-9)]
    if wrong:
        i = wrong[0]
        folded = settings.folded_from is not None
        state = f"folded (folded_from={settings.folded_from.trained_dict()})" if folded else (
            f"not folded, with survival_prob={settings.survival_prob}, survival_rule={settings.survival_rule!r}, "
            f"gate_mode={settings.gate_mode!r}")
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
        raise ValueError(f"keep must be at least {len(required)}, the first block of each stage "
                         f"({', '.join(required)}), which every pruned model keeps (it holds the stage's "
                         f"downsampling shortcut); got {keep}")
    if keep > len(names):
        raise ValueError(f"keep must be at most {len(names)}, the model's residual blocks; got {keep}")
    return keep


def _check_names(model: nn.Module, kept: Sequence[Any]) -> List[str]:
    names, required = block_names(model), required_blocks(model)
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
    names, required, probs = block_names(model), required_blocks(model), trained_survival_probs(model)
    # Highest p_l first, ties to the earlier block: the last ones in this order go.
    ranked = sorted((i for i, n in enumerate(names) if n not in required), key=lambda i: (-probs[i], i))
    kept = set(required) | {names[i] for i in ranked[:keep - len(required)]}
    return [n for n in names if n in kept]


def _evenly_keep(model: nn.Module, keep: int) -> List[str]:
    # Each stage its share of keep (one block at a time to the stage furthest below its share, ties to the
    # earlier), spaced as fairseq advises for LayerDrop: block floor(j * n / k) of a stage of n keeping k.
    depths = _stage_depths(model)
    counts = [1] * len(depths)
    for _ in range(keep - len(depths)):
        open_stages = [s for s in range(len(depths)) if counts[s] < depths[s]]
        counts[max(open_stages, key=lambda s: (keep * depths[s] / sum(depths) - counts[s], -s))] += 1
    return [f"{stage}.{(j * n) // k}" for stage, n, k in zip(model.stage_names, depths, counts) for j in range(k)]


def _loss(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    with torch.no_grad():
        total = sum(float(F.cross_entropy(model(x).float(), y, reduction="sum"))
                    for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return total / len(images)


def _shortcut_only(gate: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """A forward hook on a block's gate: the block returns its shortcut, what the model pruned of it computes."""
    return args[1]


def greedy_removals(model: nn.Module, data: Any, down_to: Optional[int] = None,
                    progress: ProgressCallback = None) -> Tuple[List[str], int]:
    """The blocks in the order greedy removes them (Veit's lesion study, repeated: the block whose removal raises
    the loss on ``data["val"]`` least), down to ``down_to`` (default: the first of each stage), and the
    evaluations that took. Nested: the first k removals are those of a greedy prune by k blocks."""
    images, labels = _split(data, "val", "order='greedy'", labels=True)
    names, required = block_names(model), required_blocks(model)
    down_to = len(required) if down_to is None else _check_keep(model, down_to)
    folded = _pruned(model, names, record={}).eval()  # a copy: hooks stay on it
    removed, evaluations = [], 0
    while len(names) - len(removed) > down_to:
        losses = {}
        for name in reversed(names):  # from the last block: ties go to the later block
            if name not in required and name not in removed:
                with folded.get_submodule(name).gate.register_forward_hook(_shortcut_only):
                    losses[name] = _loss(folded, images, labels)
        evaluations += len(losses)
        best = min(losses, key=losses.get)
        folded.get_submodule(best).gate.register_forward_hook(_shortcut_only)
        removed.append(best)
        if progress is not None:
            progress(f"greedy: removed {best} (validation loss {losses[best]:.4f}), {len(names) - len(removed)} "
                     f"blocks left, {evaluations} evaluations so far")
    return removed, evaluations


def blocks_to_keep(model: nn.Module, keep: Optional[int], order: Union[str, Sequence[str]] = "survival",
                   data: Any = None, progress: ProgressCallback = None) -> Tuple[List[str], Optional[int]]:
    """The names of the blocks a prune keeps, in model order, and the evaluations it took (greedy only)."""
    names = block_names(model)
    is_list = not isinstance(order, (str, bytes)) and isinstance(order, Sequence) and len(order) > 0
    if not is_list and not (isinstance(order, str) and order in ORDERS):
        raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))} or a list of block names to keep; "
                         f"got {order!r:.200}")
    if is_list:
        kept = _check_names(model, order)
        if _check_keep(model, len(kept) if keep is None else keep) != len(kept):
            raise ValueError(f"keep must be the number of blocks named by order ({len(kept)}) or None; got {keep}")
        return kept, None
    keep = _check_keep(model, keep)
    if order == "greedy":
        removed, evaluations = greedy_removals(model, data, down_to=keep, progress=progress)
        return [n for n in names if n not in removed], evaluations
    return (_survival_keep if order == "survival" else _evenly_keep)(model, keep), None


def _split(data: Any, split: str, needed_by: str, labels: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``data[split]``: (images, labels) tensors (or arrays), the images normalised as the model's input."""
    if not isinstance(data, Mapping) or data.get(split) is None:
        what = "a held-out split to rank blocks on" if split == "val" else "training images"
        raise ValueError(f"data must be a mapping with {split!r}: (images, labels) ({what}) for {needed_by}; "
                         f"got {'None' if data is None else type(data).__name__}")
    images, targets = data[split] if isinstance(data[split], (tuple, list)) else (data[split], None)
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"data[{split!r}] images must be a non-empty (N, C, H, W) batch; got shape "
                         f"{tuple(images.shape)}")
    if labels and (targets is None or len(targets) != len(images)):
        raise ValueError(f"data[{split!r}] must be (images, labels) with a label for each image")
    return images, torch.as_tensor(targets, dtype=torch.long) if labels else None


# -- the pruned model ----------------------------------------------------------------------------------------
def _folded_source(model: nn.Module) -> Tuple[Dict[str, Tensor], Any]:
    """The model's state dict with p_l in it, and its folded settings; the model is left as it is. With
    inverted scaling the eval network has no p_l: its weights are the folded ones."""
    _check_gates_match_settings(model)
    settings = model.survival_settings
    if settings.folded_from is not None:
        return model.state_dict(), settings
    if settings.scaling == "inverted":
        return model.state_dict(), settings.folded()
    folded = fold_survival(copy.deepcopy(model))
    return folded.state_dict(), folded.survival_settings


def _pruned(model: nn.Module, kept: Sequence[str], record: Dict[str, Any]) -> nn.Module:
    """A new folded model of the same architecture holding the blocks ``kept`` of ``model`` (renumbered within
    their stage), built through timm with ``layers=[...]`` and loaded strictly."""
    state, settings = _folded_source(model)
    architecture, source_layers, source_names = _source(model)
    if not architecture or not timm.is_model(architecture):
        raise ValueError(f"model must be a model of the zoo built by timm.create_model (its pretrained_cfg names "
                         f"its architecture); got architecture {architecture!r}")
    names = block_names(model)
    in_stage = {stage: [n for n in kept if n.startswith(stage + ".")] for stage in model.stage_names}
    renamed = {n: f"{stage}.{j}" for stage, blocks in in_stage.items() for j, n in enumerate(blocks)}
    new_state = {}
    for key, value in state.items():
        parts = key.split(".", 2)
        block = ".".join(parts[:2])
        if block in names:  # a block's tensor: renumbered, or gone with its block
            if block not in renamed:
                continue
            key = f"{renamed[block]}.{parts[2]}"
        new_state[key] = value
    args = dict(get_model_args(model), **settings.as_model_args(), layers=[len(b) for b in in_stage.values()])
    args.pop("pruned_from", None)
    if record:
        source_name = dict(zip(names, source_names))
        args["pruned_from"] = dict(record, architecture=architecture, layers=source_layers,
                                   kept=[source_name[n] for n in kept])
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    pruned = timm.create_model(architecture, pretrained=False, pretrained_cfg=pretrained_cfg, **args)
    pruned.load_state_dict(new_state, strict=True)
    return pruned.train(model.training)


def prune_blocks(model: nn.Module, keep: Optional[int], order: Union[str, Sequence[str]] = "survival",
                 data: Any = None, recalibrate_bn: int = 0, progress: ProgressCallback = None) -> nn.Module:
    """A new folded model with ``keep`` of ``model``'s residual blocks, gates off; ``model`` is left unchanged.

    ``order``: ``"survival"`` (the lowest trained p_l first, ties to the later block), ``"evenly"`` (each stage
    its share, evenly spaced), ``"greedy"`` (see ``greedy_removals``; ``data["val"]``, a held-out split), or the
    names of the blocks to keep, ``keep`` None. ``recalibrate_bn``: re-estimate every BatchNorm's statistics on
    the first N images of ``data["train"]`` after pruning. Each bad argument is a ValueError that names it.
    """
    kept, evaluations = blocks_to_keep(model, keep, order, data, progress)
    if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
        raise ValueError(f"recalibrate_bn must be a number of training images >= 0; got {recalibrate_bn!r}")
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
    pruned = _pruned(model, kept, record)
    if recalibrate_bn:  # the plain average over the images; gates are off, so train mode draws none
        update_bn(train_images[:recalibrate_bn].split(128), pruned)
    return pruned
