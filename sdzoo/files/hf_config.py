"""config.json, its one writer and its one reader: a file that both timm and transformers load.

transformers' ``TimmWrapper`` calls ``timm.create_model(architecture, num_classes=config.num_labels, **model_args)``,
so ``num_classes`` leaves the ``model_args`` that timm writes for the top level, as do ``global_pool`` at its
default and the class names; ``in_chans`` at its default is left out (readers take it from ``input_size``).
Readers take the head arguments from model_args, else the top level, else the architecture's defaults
(``head_args``), so that folders written before keep loading.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence

import timm
from torch import nn

from sdzoo.files.disk import PathLike, save_json
from sdzoo.internals.timm_private import save_config_for_hf

HEAD_ARGS = ("num_classes", "in_chans", "global_pool")


def _architecture_defaults(architecture: str) -> Dict[str, Any]:
    """in_chans and global_pool as ``timm.create_model(architecture)`` builds them: in_chans from the default
    cfg's input size (as timm's factory fills it), global_pool from the model class's default."""
    if not timm.is_model(architecture):
        return {}
    cfg = timm.get_pretrained_cfg(architecture)
    defaults = {"in_chans": cfg.input_size[0]} if cfg is not None and cfg.input_size else {}
    module = timm.models.model_entrypoint(architecture).__module__
    if module.startswith("sdzoo."):
        # every sdzoo entrypoint builds the SDResNet of its own module; read there, so this layer imports no model
        params = inspect.signature(sys.modules[module].SDResNet.__init__).parameters
        defaults.setdefault("in_chans", params["in_chans"].default)
        defaults["global_pool"] = params["global_pool"].default
    return defaults


def normalize_config(config: Mapping[str, Any], source: str = "config.json") -> Dict[str, Any]:
    """A copy of the config in the layout both loaders read. Raises ValueError naming ``source`` when
    model_args and the top level disagree on num_classes or global_pool."""
    config = json.loads(json.dumps(config))  # a deep copy, JSON types only
    model_args = dict(config.get("model_args") or {})
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
    # one place for the names: timm moves the top-level ones into its cfg on load
    label_names = config.setdefault("pretrained_cfg", {}).pop("label_names", None)
    label_names = config.get("label_names") or label_names
    if label_names:
        config["label_names"] = label_names if isinstance(label_names, dict) else list(label_names)
    if model_args:
        config["model_args"] = model_args
    else:
        config.pop("model_args", None)
    return config


def write_config(path: PathLike, model: nn.Module, data_config: Optional[Dict[str, Any]] = None,
                 tag: Optional[str] = None, label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Write the config.json of ``model`` to ``path`` and return it: timm's ``save_config_for_hf``, then
    ``normalize_config``. ``label_names`` default to those of the model's cfg when they fit its head."""
    model_config: Dict[str, Any] = {"pretrained_cfg": dict(tag=tag)} if tag else {}
    num_classes = getattr(model, "num_classes", None)
    if label_names is None:
        label_names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        if label_names is not None and len(label_names) != num_classes:
            label_names = None  # the names of another head (the model was given a new one)
    elif len(label_names) != num_classes:
        raise ValueError(f"label_names must name each of the model's {num_classes} classes; "
                         f"got {len(label_names)} names")
    if label_names:
        model_config["label_names"] = dict(label_names) if isinstance(label_names, dict) else list(label_names)
    with tempfile.TemporaryDirectory(prefix="sdzoo-config-") as tmp:  # timm writes only to a path
        save_config_for_hf(model, os.path.join(tmp, "config.json"), model_config=model_config, data_config=data_config)
        with open(os.path.join(tmp, "config.json"), encoding="utf-8") as f:
            config = normalize_config(json.load(f))
    save_json(path, config)
    return config


def head_args(config: Mapping[str, Any]) -> Dict[str, Any]:
    """num_classes, in_chans and global_pool of a config.json (or of a weights file's settings): from
    model_args, else the top level (or pretrained_cfg), else the architecture's defaults; left out when unknown."""
    model_args = config.get("model_args") or {}
    pretrained_cfg = config.get("pretrained_cfg") or {}
    input_size = pretrained_cfg.get("input_size") or [None]
    in_cfg = dict(num_classes=pretrained_cfg.get("num_classes"), in_chans=input_size[0])
    found = _architecture_defaults(config.get("architecture") or "")
    for key in HEAD_ARGS:
        value = next((v for v in (model_args.get(key), config.get(key), in_cfg.get(key)) if v is not None), None)
        if value is not None:
            found[key] = value
    return {key: found[key] for key in HEAD_ARGS if key in found}


def model_kwargs_of_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Every model argument a config describes: model_args with the head arguments of ``head_args``."""
    return dict(config.get("model_args") or {}, **head_args(config))
