"""Run-folder files, written so that nothing is ever half-written.

Every file goes through ``sdzoo._files`` (a temporary file in the same directory, then renamed over the
old one), so a run killed at any moment leaves either the previous version or the new one. The run folder is a timm local-dir (``config.json`` + ``model.safetensors``), so
``timm.create_model("local-dir:RUN", pretrained=True)`` loads the best weights; beside them, the resume
state ``checkpoint.pt`` holds plain types and tensors only and is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ._files import TEMP_SUFFIX, atomic_write, save_json

__all__ = [
    "CHECKPOINT_NAME", "WEIGHTS_NAME", "CONFIG_NAME", "CheckpointError", "atomic_write", "save_json",
    "save_state", "load_state", "save_weights", "save_model_config", "remove_stale_temp_files",
    "state_dict_mismatch",
]

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

PathLike = Union[str, os.PathLike]


class CheckpointError(Exception):
    """A resume state that is missing or unreadable: a user error, reported without a traceback."""


def remove_stale_temp_files(folder: PathLike) -> None:
    """Temporary files of a process that was killed mid-write."""
    for temp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)


def save_state(path: PathLike, state: Dict[str, Any]) -> None:
    atomic_write(path, lambda temp: torch.save(state, temp))


def load_state(path: PathLike, map_location: Optional[torch.device] = None) -> Dict[str, Any]:
    """The resume state, read with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None


def _weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    # safetensors needs contiguous tensors; channels_last weights are not.
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_weights(path: PathLike, model: nn.Module, metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.cpu() for k, v in _weights(model).items()}
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata or {"format": "pt"}))


def save_model_config(path: PathLike, model: nn.Module, data_config: Dict[str, Any], tag: Optional[str] = None,
                      label_names: Optional[List[str]] = None) -> None:
    """timm's ``config.json``: architecture, the model arguments (survival settings included), the
    preprocessing the weights were trained with, and the class names."""
    from timm.models._hub import save_config_for_hf

    model_config: Dict[str, Any] = {}
    if tag:
        model_config["pretrained_cfg"] = dict(tag=tag)
    if label_names:
        model_config["label_names"] = list(label_names)
    atomic_write(path, lambda temp: save_config_for_hf(model, temp, model_config=model_config,
                                                       data_config=data_config))


def state_dict_mismatch(expected: Dict[str, torch.Tensor], given: Dict[str, torch.Tensor]) -> str:
    """What keeps ``given`` from loading strictly where ``expected`` is: '' when it fits."""
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & given.keys())
              if tuple(getattr(given[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)
