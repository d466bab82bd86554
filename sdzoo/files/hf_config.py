"""config.json, the one writer and the one reader of it: a file that timm and transformers both load.

timm's ``save_for_hf`` writes ``num_classes``, ``in_chans`` and ``global_pool`` into ``model_args``.
timm reads that back, but transformers' ``TimmWrapper`` calls ``timm.create_model(architecture,
num_classes=config.num_labels, **model_args)``, which fails with "got multiple values for keyword argument
'num_classes'". So every config.json that sdzoo writes (run folders, Hub folders, exports) goes through
``write_config``: timm's writer, then

* ``num_classes`` leaves ``model_args`` and stays top-level, where timm and transformers both read it;
* ``in_chans`` and ``global_pool`` leave ``model_args`` when they are what ``timm.create_model(architecture)``
  builds anyway (``global_pool`` stays top-level, as timm writes it); other values stay, so that both
  loaders rebuild the same network;
* the class names (``label_names``) are top-level, where timm and transformers' pipeline both read them;
* the survival settings stay in ``model_args``.

Readers of config.json take those three keys from ``model_args``, else from the top level, else the
architecture's defaults (``head_args``), so that folders written before keep loading.
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

from torch import nn

from sdzoo.files.disk import PathLike, save_json
from sdzoo.internals.timm_private import save_config_for_hf

__all__ = ["HEAD_ARGS", "write_config", "hf_config_of", "normalize_config", "head_args", "model_kwargs_of_config"]

# The model arguments that timm's writer records in model_args and that also come from elsewhere: the top
# level of config.json (num_classes, global_pool), the input size of pretrained_cfg (in_chans), or the
# architecture's defaults.
HEAD_ARGS = ("num_classes", "in_chans", "global_pool")


def _architecture_defaults(architecture: str) -> Dict[str, Any]:
    """What ``timm.create_model(architecture)`` builds when in_chans and global_pool are not given: in_chans
    from the default cfg's input size (timm's factory fills it from there), global_pool from the model
    class's own default (the zoo's cfgs do not set one)."""
    import timm

    defaults: Dict[str, Any] = {}
    cfg = timm.get_pretrained_cfg(architecture) if timm.is_model(architecture) else None
    if cfg is not None and cfg.input_size:
        defaults["in_chans"] = cfg.input_size[0]
    module = timm.models.model_entrypoint(architecture).__module__ if timm.is_model(architecture) else ""
    if module.startswith("sdzoo."):
        # An entrypoint does not say which class it builds; every sdzoo entrypoint builds the SDResNet of its own
        # module, read from there so that this layer never imports a model.
        params = inspect.signature(sys.modules[module].SDResNet.__init__).parameters
        defaults.setdefault("in_chans", params["in_chans"].default)
        defaults["global_pool"] = params["global_pool"].default
    return defaults


def normalize_config(config: Mapping[str, Any], source: str = "config.json") -> Dict[str, Any]:
    """The config in the layout both loaders read (see the module's doc). Raises ValueError naming
    ``source`` when model_args and the top level disagree on num_classes or global_pool."""
    config = json.loads(json.dumps(config))  # a deep copy, JSON types only
    model_args = dict(config.get("model_args") or {})
    pretrained_cfg = config.setdefault("pretrained_cfg", {})
    for key in ("num_classes", "global_pool"):
        if key in model_args and key in config and model_args[key] != config[key]:
            raise ValueError(f"{source}: model_args[{key!r}] = {model_args[key]!r} disagrees with "
                             f"{key} = {config[key]!r} at the top level")
    if "num_classes" in model_args:
        config["num_classes"] = model_args.pop("num_classes")
    defaults = _architecture_defaults(config.get("architecture") or "")
    for key in ("in_chans", "global_pool"):
        if key in model_args and key in defaults and model_args[key] == defaults[key]:
            value = model_args.pop(key)
            if key == "global_pool" and value:
                config[key] = value
    label_names = config.get("label_names") or pretrained_cfg.pop("label_names", None)
    pretrained_cfg.pop("label_names", None)  # one place: timm moves the top-level names into its cfg on load
    if label_names:
        config["label_names"] = list(label_names) if not isinstance(label_names, dict) else label_names
    if model_args:
        config["model_args"] = model_args
    else:
        config.pop("model_args", None)
    return config


def hf_config_of(model: nn.Module, data_config: Optional[Dict[str, Any]] = None, tag: Optional[str] = None,
                 label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The config.json of ``model``: timm's ``save_config_for_hf`` (the architecture, the model arguments,
    the preprocessing), then ``normalize_config``. ``label_names`` default to those of the model's cfg when
    they fit its head."""
    model_config: Dict[str, Any] = {}
    if tag:
        model_config["pretrained_cfg"] = dict(tag=tag)
    num_classes = getattr(model, "num_classes", None)
    names = label_names
    if names is None:
        names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        if names is not None and len(names) != num_classes:
            names = None  # the names of another head (the model was given a new one): not this model's
    elif len(names) != num_classes:
        raise ValueError(f"label_names must name each of the model's {num_classes} classes; got {len(names)} names")
    if names:
        model_config["label_names"] = list(names) if not isinstance(names, dict) else dict(names)
    # timm writes only to a path; a private temporary one, read back at once.
    with tempfile.TemporaryDirectory(prefix="sdzoo-config-") as tmp:
        path = os.path.join(tmp, "config.json")
        save_config_for_hf(model, path, model_config=model_config, data_config=data_config)
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    return normalize_config(config)


def write_config(path: PathLike, model: nn.Module, data_config: Optional[Dict[str, Any]] = None,
                 tag: Optional[str] = None, label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Write ``hf_config_of(model, ...)`` to ``path`` (a temporary file, then renamed); returns it."""
    config = hf_config_of(model, data_config=data_config, tag=tag, label_names=label_names)
    save_json(path, config)
    return config


def head_args(config: Mapping[str, Any]) -> Dict[str, Any]:
    """num_classes, in_chans and global_pool of a config.json (or of a weights file's settings): from
    model_args, else the top level (in_chans: the input size of pretrained_cfg), else the architecture's
    defaults. Keys with no value anywhere are left out."""
    model_args = config.get("model_args") or {}
    pretrained_cfg = config.get("pretrained_cfg") or {}
    found: Dict[str, Any] = {}
    for key in HEAD_ARGS:
        if model_args.get(key) is not None:
            found[key] = model_args[key]
        elif config.get(key) is not None:
            found[key] = config[key]
        elif key == "num_classes" and pretrained_cfg.get("num_classes") is not None:
            found[key] = pretrained_cfg["num_classes"]
        elif key == "in_chans" and pretrained_cfg.get("input_size"):
            found[key] = pretrained_cfg["input_size"][0]
    for key, value in _architecture_defaults(config.get("architecture") or "").items():
        found.setdefault(key, value)
    return found


def model_kwargs_of_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Every model argument a config describes: model_args with num_classes, in_chans and global_pool
    resolved as ``head_args`` does."""
    return dict(config.get("model_args") or {}, **head_args(config))

