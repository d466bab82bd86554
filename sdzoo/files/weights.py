"""The one check of a weights file against the model about to be built from it, before anything is built.

Hub repos and run folders are untrusted, and timm's loader adapts what does not fit (it drops a classifier of
another class count). So ``check_before_build`` bounds the model arguments and checks them against the shapes in
the safetensors header and the settings in its metadata (folded weights never load into an unfolded model, nor
the other way round); the load is strict and NaN or inf is refused, as by a plain ``load_state_dict``'s pre-hook.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from timm.models import resolve_pretrained_cfg
from torch import nn

from sdzoo.files.checks import check_int, error_line
from sdzoo.files.disk import PathLike, write_bytes
from sdzoo.files.hub_http import LOAD_TIMEOUT_ENV, bounded_waits, is_timeout, load_timeout
from sdzoo.files.pretrained import require_published_weights
from sdzoo.files.run_folder import WEIGHTS_NAME
from sdzoo.internals.timm_private import load_state_dict_from_path, resolve_pretrained_source
from sdzoo.internals.transformers_private import transformers_checkpoint_files

# Bounds on what a config.json may ask for, far beyond the largest zoo models (sd_resnet1202_cifar: 600 blocks,
# sd_resnet152: 60M parameters; ImageNet-21k: 21,843 classes).
MAX_NUM_CLASSES = 100_000
MAX_BLOCKS = 1024
MAX_WIDTH = 4096
MAX_IN_CHANS = 256
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32
# Bounds on a safetensors header, checked before it is parsed (60 MB of hostile JSON costs a minute and a GB);
# the largest model allowed above has about 18,500 tensors.
MAX_TENSORS = 20_000
MAX_HEADER_BYTES = 4 * 2**20
_EXPANSION = {"basic": 1, "bottleneck": 4}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The safetensors metadata key of the settings: one key, as safetensors writes its metadata in hash order.
SETTINGS_KEY = "sdzoo"
# The key of a state dict's ``_metadata`` (kept by copies and torch.save, and no tensor) where a model records
# its survival settings: the dict still loads strictly into timm's ResNets.
PROVENANCE_KEY = "sdzoo_survival"
_WRAPPER_PREFIX = "timm_model."  # transformers' TimmWrapper saves its timm model's tensors under it
# build_args(kwargs, cfg): the arguments the model will be built with, from a factory's kwargs and pretrained cfg
BuildArgs = Callable[[Mapping[str, Any], Mapping[str, Any]], Dict[str, Any]]


class WeightsError(ValueError):
    """A weights file that does not fit what was asked for, contradicts its config, or holds NaN/inf."""


class MissingWeightsError(FileNotFoundError):
    """No safetensors weights where the model's source points."""


@dataclass(frozen=True)
class WeightsProvenance:
    """Where a model's weights came from, and the survival settings recorded there (None: nothing recorded)."""
    source: str
    recorded: Optional[Dict[str, Any]]

    @property
    def folded(self) -> Optional[bool]:
        """Whether the weights have p_l folded into them; None when nothing says."""
        return None if self.recorded is None else bool(self.recorded.get("folded_from"))


def count_parameters(layers: Sequence[int], widths: Sequence[int], block: str, stem: str, shortcut: str,
                     num_classes: int, in_chans: int, global_pool: str = "avg") -> int:
    """The parameters an SDResNet of these arguments has, counted without building it."""
    stem_chs = widths[0]
    total = in_chans * stem_chs * (9 if stem == "cifar" else 49) + (stem_chs if stem == "cifar" else 0) + 2 * stem_chs
    in_chs = stem_chs
    for stage, (num, chs) in enumerate(zip(layers, widths)):
        out = chs * _EXPANSION[block]
        # a block's parameters: per_in for each input channel (its first conv), and the rest
        if block == "basic":
            per_in, rest = 9 * chs, 9 * chs * out + 2 * chs + 2 * out
        else:
            per_in, rest = chs, 9 * chs * chs + chs * out + 4 * chs + 2 * out
        projection = shortcut == "projection" and (in_chs != out or stage > 0)
        total += in_chs * per_in + rest + projection * (in_chs * out + 2 * out) + (num - 1) * (out * per_in + rest)
        in_chs = out
    return total + (in_chs * (2 if global_pool == "catavgmax" else 1) + 1) * num_classes


def check_model_size(layers: Any, widths: Any, block: str, stem: str, shortcut: str, num_classes: Any,
                     in_chans: Any, global_pool: str = "avg") -> None:
    """Refuse arguments that would build an SDResNet beyond the bounds above, before a parameter is allocated."""
    for name, value in (("layers", layers), ("widths", widths)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
                any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"{name} must be a list of integers; got {value!r:.200}")
    layers, widths = list(layers), list(widths)
    check_int("num_classes", num_classes, 0, MAX_NUM_CLASSES)
    check_int("in_chans", in_chans, 1, MAX_IN_CHANS)
    if not layers or len(layers) != len(widths) or any(n < 1 for n in layers):
        raise ValueError(f"layers must give a positive block count for each of the {len(widths)} stages of "
                         f"widths; got layers={layers!r:.200}")
    if sum(layers) > MAX_BLOCKS:
        raise ValueError(f"layers must add up to at most {MAX_BLOCKS} residual blocks; got {sum(layers)} "
                         f"(layers={layers!r:.200})")
    if any(not 1 <= w <= MAX_WIDTH for w in widths):
        raise ValueError(f"widths must be integers in [1, {MAX_WIDTH}]; got {widths!r:.200}")
    if block not in _EXPANSION:
        return  # the constructor names the allowed blocks
    params = count_parameters(layers, widths, block, stem, shortcut, num_classes, in_chans, global_pool)
    if params > MAX_PARAMETERS:
        raise ValueError(f"these model arguments would build {params:,} parameters, more than the {MAX_PARAMETERS:,} "
                         f"allowed (layers={layers}, widths={widths}, block={block!r}, num_classes={num_classes})")


def read_header(path: os.PathLike) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, str]]:
    """Every tensor's shape and the metadata of a safetensors file, from its header alone (no tensor is read).
    The header's length (its first 8 bytes) and its tensor count are bounded before anything else is read."""
    try:
        with open(path, "rb") as f:
            length = f.read(8)
        if len(length) < 8:
            raise WeightsError(f"cannot read {path} as safetensors: it is {len(length)} bytes long, shorter than "
                               "the 8 bytes that give its header's length")
        header_bytes = int.from_bytes(length, "little")
        if header_bytes > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: its safetensors header is {header_bytes:,} bytes, more than the "
                               f"{MAX_HEADER_BYTES:,} that any sdzoo model needs; refused without reading it")
        with safe_open(os.fspath(path), framework="pt") as f:
            keys = list(f.keys())
            if len(keys) > MAX_TENSORS:
                raise WeightsError(f"{path} holds {len(keys):,} tensors, more than the {MAX_TENSORS:,} that any "
                                   "sdzoo model has; refused")
            return {k: tuple(f.get_slice(k).get_shape()) for k in keys}, dict(f.metadata() or {})
    except WeightsError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path} as safetensors: {e}") from None


def architecture_of(shapes: Mapping[str, Sequence[int]], where: str) -> Dict[str, Any]:
    """The SDResNet arguments that a state dict's shapes (timm's ResNet keys) fix, and ``pool_mult``: fc's
    input over the trunk's channels (2 for catavgmax; None without a head)."""
    conv1 = shapes.get("conv1.weight")
    if conv1 is None or len(conv1) != 4 or conv1[2] not in (3, 7):
        raise WeightsError(f"{where} is not an sdzoo ResNet's state dict: it has no 3x3 or 7x7 conv1.weight "
                           f"(got {conv1})")
    layers, widths = [], []
    while f"layer{len(layers) + 1}.0.conv1.weight" in shapes:
        stage = len(layers) + 1
        blocks = 0
        while f"layer{stage}.{blocks}.conv1.weight" in shapes:
            blocks += 1
        layers.append(blocks)
        widths.append(shapes[f"layer{stage}.0.conv1.weight"][0])
    if not layers:
        raise WeightsError(f"{where} is not an sdzoo ResNet's state dict: it has no layer1.0.conv1.weight")
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    fc = shapes.get("fc.weight")
    fc = fc if fc is not None and len(fc) == 2 else None
    features = widths[-1] * _EXPANSION[block]
    return dict(layers=layers, widths=widths, block=block, stem="cifar" if conv1[2] == 3 else "imagenet",
                shortcut="projection" if any(".downsample." in k for k in shapes) else "zero_pad",
                in_chans=conv1[1], num_classes=fc[0] if fc else 0,
                pool_mult=fc[1] // features if fc and fc[1] % features == 0 else None)


def recorded_settings(metadata: Mapping[str, str], where: str) -> Optional[Dict[str, Any]]:
    """What ``weights_metadata`` recorded (architecture, num_classes, model_args), or None for another file."""
    text = metadata.get(SETTINGS_KEY)
    if text is None:
        return None
    try:
        settings = json.loads(text)
    except ValueError:
        settings = None
    if not isinstance(settings, dict) or not isinstance(settings.get("model_args"), dict):
        raise WeightsError(f"{where}: its {SETTINGS_KEY!r} metadata is not a JSON object with model_args")
    return settings


def weights_metadata(model: nn.Module) -> Dict[str, str]:
    """The metadata of a weights file: the architecture, its classes and the survival settings, so that a bare
    ``model.safetensors`` brings what loading and folding it need (as a run folder's config.json does)."""
    survival = getattr(model, "survival_settings", None)
    if survival is None:
        return {"format": "pt"}
    settings = survival.as_recorded()
    if getattr(model, "pruned_from", None):  # a pruned model (sdzoo.prune): its layers, and what it was pruned from
        settings.update(layers=[len(getattr(model, name)) for name in model.stage_names], pruned_from=model.pruned_from)
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return {SETTINGS_KEY: json.dumps(dict(architecture=architecture, num_classes=model.num_classes,
                                          model_args=settings))}


def save_weights(path: PathLike, model: nn.Module) -> None:
    """The model's weights as safetensors, with ``weights_metadata`` (the one writer of weights files)."""
    # safetensors needs contiguous tensors; channels_last weights are not
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_bytes(path, save(tensors, metadata=weights_metadata(model)))


def read_weights_settings(path: PathLike) -> Optional[Dict[str, Any]]:
    """What ``weights_metadata`` stored in a safetensors file, or None for a file written elsewhere. Raises
    WeightsError (a ValueError) naming the file when the metadata is malformed or the header out of bounds."""
    return recorded_settings(read_header(path)[1], os.fspath(path))


def as_json_value(value: Any) -> Any:
    """A setting as JSON gives it back (a tuple comes back a list)."""
    return list(value) if isinstance(value, tuple) else value


def settings_equal(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(settings_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(settings_equal(a[k], b[k]) for k in a)
    return a == b


def fold_contradiction(recorded: Optional[Mapping[str, Any]], asked: Optional[Mapping[str, Any]],
                       whose: str = "the file's") -> Optional[str]:
    """What is wrong when weights whose record says ``folded_from=recorded`` go into a model built with
    ``folded_from=asked`` (None: they agree)."""
    if settings_equal(recorded or None, asked or None):
        return None
    if recorded and not asked:
        return (f"an unfolded model, while {whose} weights are folded (p_l is in them; trained with {recorded}): "
                f"they load only with folded_from={recorded}")
    if asked and not recorded:
        return (f"folded_from={asked} (a folded model), while {whose} weights are not folded: loading them "
                "would leave out every p_l")
    return f"folded_from={asked} ({whose}: {recorded})"


def check_weights_file(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str], where: str, variant: str,
                       args: Mapping[str, Any], asked_by: str = "the model arguments") -> WeightsProvenance:
    """Refuse ``args`` (every argument the model will be built with) that do not build the model the file holds,
    or that contradict the settings the file records, naming both values; returns the file's provenance."""
    expected = architecture_of(shapes, where)
    pool_mult = expected.pop("pool_mult")
    if len(expected["layers"]) == 1 and expected["block"] == "basic":
        expected.pop("shortcut")  # no block changes shape: either shortcut builds the same weights
    differ = [f"{k}={as_json_value(args[k])!r} ({where} holds {k}={v!r})"
              for k, v in expected.items() if not settings_equal(args[k], v)]
    asked_mult = 2 if args["global_pool"] == "catavgmax" else 1
    if pool_mult is not None and expected["num_classes"] and pool_mult != asked_mult:
        differ.append(f"global_pool={args['global_pool']!r} (the classifier of {where} takes "
                      f"{pool_mult}x the trunk's channels)")
    if differ:
        raise WeightsError(f"{where} does not fit {variant} as described by {asked_by}: {'; '.join(differ)}. "
                           "Nothing was built or loaded")
    recorded = recorded_settings(metadata, where)
    if recorded is None:
        return WeightsProvenance(where, None)
    if recorded.get("architecture") not in (None, variant):
        differ.append(f"architecture {variant!r} (the file's: {recorded['architecture']!r})")
    if recorded.get("num_classes") is not None and not settings_equal(recorded["num_classes"], args["num_classes"]):
        differ.append(f"num_classes={args['num_classes']!r} (the file's: {recorded['num_classes']!r})")
    model_args = recorded["model_args"]
    # the settings the weights were trained with, in the order the file records them
    differ += [f"{k}={args[k]!r} (the file's: {v!r})" for k, v in model_args.items()
               if k in args and k != "folded_from" and v is not None and not settings_equal(v, args[k])]
    fold = fold_contradiction(model_args.get("folded_from"), args["folded_from"])
    differ += [fold] if fold else []
    if differ:
        raise WeightsError(f"the settings recorded in {where} contradict {asked_by}, which asks for "
                           f"{'; '.join(differ)}. Nothing was built or loaded")
    return WeightsProvenance(where, dict(model_args))


def _weights_location(cfg: Dict[str, Any], cache_dir=None
                      ) -> Tuple[Optional[str], Optional[Dict[str, torch.Tensor]], str]:
    """(safetensors path, or a state dict, and how to name it) of the weights timm's loader reads next."""
    load_from, location = resolve_pretrained_source(cfg)  # timm's own resolution of the cfg's source
    if load_from == "state_dict":
        return None, location, "the pretrained state_dict"
    if load_from == "local-dir":
        folder = Path(location)
        path = folder / WEIGHTS_NAME
        if path.is_file():
            return str(path), None, str(path)
        # timm's save_for_hf writes pytorch_model.bin by default; timm reads it weights-only (no code runs), and
        # so do these checks, with the same choice of file as timm's loader.
        found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if not found:
            raise MissingWeightsError(f"{folder} has no {WEIGHTS_NAME} (nor another weights file); a model folder "
                                      f"holds timm's config.json and {WEIGHTS_NAME}")
        try:
            state_dict = load_state_dict_from_path(folder, weights_only=True)
        except Exception as e:  # noqa: BLE001  unpickling errors of every kind; nothing in the file was run
            raise WeightsError(f"{folder} has no {WEIGHTS_NAME}, and its {', '.join(found)} cannot be read "
                               f"weights-only ({error_line(e, 200)}); nothing in it was run") from None
        return None, state_dict, f"{folder}'s {found[0]}"
    if load_from == "file":
        if not str(location).endswith(".safetensors"):
            raise WeightsError(f"pretrained file {location}: sdzoo loads weights from .safetensors files only "
                               "(their header is checked before anything is built, and nothing is unpickled)")
        if not os.path.isfile(location):
            raise MissingWeightsError(f"pretrained file {location} does not exist")
        return str(location), None, str(location)
    if load_from == "hf-hub":
        repo, filename = location if isinstance(location, (list, tuple)) else (location, WEIGHTS_NAME)
        repo_id, _, revision = repo.partition("@")  # timm's hf_hub_id names a revision after an "@"
        if not filename.endswith(".safetensors"):
            raise WeightsError(f"hf-hub:{repo}: sdzoo loads weights from .safetensors files only; got {filename}")
        timeout = load_timeout()
        try:
            with bounded_waits(timeout):  # into timm's cache, as timm's loader downloads it
                downloaded = hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir)
            return downloaded, None, f"hf-hub:{repo} {filename}"
        except EntryNotFoundError:
            raise MissingWeightsError(f"hf-hub:{repo} has no {filename} (pickle checkpoints are not loaded)") from None
        except Exception as e:  # noqa: BLE001  the client raises a timeout wrapped in errors of its own
            if not is_timeout(e):
                raise
            raise TimeoutError(f"hf-hub:{repo}: downloading {filename} did not end within {timeout:g} s "
                               f"(${LOAD_TIMEOUT_ENV} sets this bound; nothing was built)") from None
    raise WeightsError(f"{cfg.get('architecture')}: sdzoo loads pretrained weights from local-dir:, hf-hub: or a "
                       f".safetensors file (pretrained_cfg_overlay=dict(file=...)); got {load_from or 'no source'} "
                       f"{location!r:.200}")


def _checked_args(build_args: BuildArgs, kwargs: Mapping[str, Any], cfg: Mapping[str, Any],
                  asked_by: str) -> Dict[str, Any]:
    """``build_args(kwargs, cfg)``, bounded (``check_model_size``) before anything is read or built."""
    try:
        args = build_args(kwargs, cfg)
        check_model_size(args["layers"], args["widths"], args["block"], args["stem"], args["shortcut"],
                         args["num_classes"], args["in_chans"], args["global_pool"])
    except ValueError as e:
        raise WeightsError(f"{asked_by}: {e}. Nothing was built or loaded") from None
    return args


def check_before_build(variant: str, kwargs: Dict[str, Any], pretrained: bool,
                       build_args: BuildArgs) -> Optional[WeightsProvenance]:
    """The ``pretrained=True`` weights, or the file transformers sets into a model it builds with
    ``pretrained=False``, checked before anything is built; returns their provenance, or None without weights."""
    if pretrained:
        return _check_pretrained(variant, kwargs, build_args)
    files = transformers_checkpoint_files()
    return None if files is None else _check_loader_files(files, variant, kwargs, build_args)


def _check_pretrained(variant: str, kwargs: Dict[str, Any], build_args: BuildArgs) -> WeightsProvenance:
    # a clear error, saying how to get weights, for a tag that has none
    require_published_weights(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
    if cfg.get("source") == "local-dir":
        asked_by = str(Path(cfg.get("file", "")) / "config.json")
    elif cfg.get("source") == "hf-hub":
        asked_by = f"hf-hub:{cfg.get('hf_hub_id')} config.json"
    else:
        asked_by = "the model arguments"
    args = _checked_args(build_args, kwargs, cfg, asked_by)
    if kwargs.pop("pretrained_strict", True) is not True:
        raise WeightsError("pretrained_strict must be True: sdzoo loads every tensor of a weights file or none")
    path, state_dict, where = _weights_location(cfg, kwargs.get("cache_dir"))
    if path is not None:
        shapes, metadata = read_header(path)
    else:
        shapes, metadata = {k: tuple(v.shape) for k, v in state_dict.items() if hasattr(v, "shape")}, {}
    provenance = check_weights_file(shapes, metadata, where, variant, args, asked_by)
    if not kwargs.get("features_only") and cfg.get("num_classes") != args["num_classes"]:
        # timm's loader drops a classifier whose class count differs from the cfg's and loads the rest non-strict.
        raise WeightsError(f"{asked_by} says num_classes={cfg.get('num_classes')!r} for the pretrained cfg and "
                           f"builds num_classes={args['num_classes']!r}: timm would drop the classifier of {where}. "
                           "Load with the file's classes, then model.reset_classifier(n) for a new head")
    return provenance


def _check_loader_files(paths: Sequence[str], variant: str, kwargs: Mapping[str, Any],
                        build_args: BuildArgs) -> WeightsProvenance:
    # transformers' load is not strict, so every tensor the model has must be in the file with its shape
    folder = Path(paths[0]).parent
    asked_by = f"{folder / 'config.json'} (loaded by transformers)"
    args = _checked_args(build_args, kwargs, resolve_pretrained_cfg(variant).to_dict(), asked_by)
    if len(paths) != 1 or not str(paths[0]).endswith(".safetensors"):
        raise WeightsError(f"{folder}: sdzoo weights are one .safetensors file ({WEIGHTS_NAME}); transformers "
                           f"would load {', '.join(Path(p).name for p in paths)}. Nothing was built or loaded")
    path = str(paths[0])
    shapes, metadata = read_header(path)
    shapes = {k[len(_WRAPPER_PREFIX):] if k.startswith(_WRAPPER_PREFIX) else k: v for k, v in shapes.items()}
    provenance = check_weights_file(shapes, metadata, path, variant, args, asked_by)
    with safe_open(path, framework="pt") as f:
        _refuse_nonfinite(((k, f.get_tensor(k)) for k in f.keys()), path)
    return provenance


def install_state_dict_checks(model: nn.Module) -> None:
    """Every ``state_dict()`` of ``model`` (an SDResNet) records its survival settings, and every
    ``load_state_dict`` is checked before a tensor is copied."""
    model.register_state_dict_post_hook(_record_settings)
    model.register_load_state_dict_pre_hook(_check_loaded_state)


def _record_settings(module: nn.Module, state_dict, prefix: str, local_metadata: Dict[str, Any]) -> None:
    local_metadata[PROVENANCE_KEY] = module.survival_settings.as_recorded()


def _check_loaded_state(module: nn.Module, state_dict, prefix: str, local_metadata: Dict[str, Any], *args) -> None:
    """No NaN or inf, and no p_l lost or applied twice by what the source model recorded: folded weights go into
    a folded model or one that applies no p_l (a plain ResNet at eval); unfolded ones never into a folded model."""
    _refuse_nonfinite(((k, t) for k, t in state_dict.items() if k.startswith(prefix)), "the state dict")
    recorded = local_metadata.get(PROVENANCE_KEY)
    recorded = recorded if isinstance(recorded, dict) else None
    weights_folded = (recorded or {}).get("folded_from") or None
    applies_p_l = module.folded_from or (
        module.scaling == "expectation" and any(p < 1.0 for p in module.block_survival_probs()))
    if recorded is not None and (applies_p_l or not weights_folded):
        fold = fold_contradiction(weights_folded, module.folded_from, whose="the state dict's")
        if fold:
            raise WeightsError(f"the state dict comes from an sdzoo model whose settings contradict this model, "
                               f"which is {fold}. Nothing was loaded")
    module.weights_provenance = WeightsProvenance(
        "a state dict of an sdzoo model" if recorded else "a state dict without sdzoo's record of its settings",
        recorded)


def _refuse_nonfinite(tensors: Iterable[Tuple[str, Any]], where: str) -> None:
    bad = [k for k, t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()
           and t.device.type != "meta" and not bool(torch.isfinite(t).all())]
    if bad:
        raise WeightsError(f"{where} holds NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                           f"{', ...' if len(bad) > 3 else ''}): these are no usable weights; refused")


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse a model with NaN or infinite weights or statistics (what a diverged run leaves)."""
    _refuse_nonfinite(model.state_dict().items(), where)


def out_of_memory_message(error: BaseException, what: str) -> Optional[str]:
    """A one-line message for an allocation failure (as torch raises it on the CPU or a GPU) while building or
    loading ``what``; None for other errors."""
    text = str(error)
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)):
        return (f"not enough memory to build and load {what} ({error_line(error)}); the weights fit the "
                "architecture, the machine has too little free memory for it")
    return None


def load_failure_reason(error: BaseException, model: str) -> str:
    """Why building ``model`` and loading its weights failed, in one line (the caller names the weights):
    too little memory, or torch's strict load, whose error lists the tensors that do not fit."""
    return out_of_memory_message(error, model) or f"its tensors do not fit {model}: {error_line(error, 400, lines=4)}"
