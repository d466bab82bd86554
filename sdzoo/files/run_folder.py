"""A run folder's files: a timm local-dir (config.json + model.safetensors), the logs beside them and
``checkpoint.pt``, the resume state (its keys are ``sdzoo.training.resume``'s). Every file is written atomically
(``sdzoo.files.disk``), so a run killed at any moment leaves the previous version or the new one."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from filelock import FileLock, Timeout
from torch import nn

from sdzoo.files.checks import error_line
from sdzoo.files.disk import PathLike, write_bytes, write_text
from sdzoo.files.hf_config import normalize_config, write_config

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CURVES_NAME = "curves.png"
ONNX_NAME = "model.onnx"  # where an export of the run goes by default, and what sdzoo push publishes beside it
LOCK_NAME = ".lock"


def gates_name(rank: int) -> str:
    """The file of one process's gate draws (``--log-gates``)."""
    return f"gates_rank{rank}.txt"


class CheckpointError(Exception):
    """A resume state that is missing or unreadable: a user error, reported without a traceback."""


class RunFolderBusy(Exception):
    """Another process is writing to the run folder."""


def save_state(path: PathLike, state: Dict[str, Any]) -> None:
    # Serialised in memory, then written by Python: a full disk is then an OSError that names the file
    # (torch's own file writer reports it as an unexplained RuntimeError).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer())


def load_state(path: PathLike, map_location: Optional[torch.device] = None) -> Dict[str, Any]:
    """The resume state, read with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which would run the file's code
        raise CheckpointError(f"--resume: {path} holds objects other than tensors and plain types; it is not "
                              "a checkpoint of this trainer and was not loaded (nothing in it was run)") from None
    except Exception as e:  # noqa: BLE001  (torch.load's errors have no common type; each one is refused)
        raise CheckpointError(f"--resume: cannot read {path} as a torch file ({error_line(e)})") from None


def read_run_config(path: PathLike) -> Dict[str, Any]:
    """A run folder's config.json, checked: a JSON object naming an architecture, whose model_args (if any)
    is a mapping that agrees with the top level. Raises ValueError naming the file."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object (timm's config.json); got a {type(config).__name__}")
    if not isinstance(config.get("architecture"), str):
        raise ValueError(f"{path}: 'architecture' must be a model name; got {config.get('architecture')!r}")
    if not isinstance(config.get("model_args", {}), dict):
        raise ValueError(f"{path}: 'model_args' must be a JSON object of keyword arguments; got a "
                         f"{type(config['model_args']).__name__}")
    normalize_config(config, source=str(path))  # raises when model_args and the top level disagree
    return config


class _RunFolderLock(FileLock):
    def close(self) -> None:
        self.release(force=True)


def lock_run_folder(folder: PathLike) -> _RunFolderLock:
    """Hold the run folder's lock file (an OS lock, dropped when the process ends, however it ends) until
    ``close()`` is called on the returned lock. Raises ``RunFolderBusy`` when another process holds it."""
    lock = _RunFolderLock(Path(folder) / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderBusy(f"another process is writing to {folder} (it holds {lock.lock_file}); wait for it to "
                            "finish, or choose another --output") from None
    return lock


def check_run_folder_free(folder: PathLike) -> None:
    """Raise ``RunFolderBusy`` when another process holds the folder's lock (the lock is not kept)."""
    if (Path(folder) / LOCK_NAME).exists():
        lock_run_folder(folder).close()


def save_model_config(path: PathLike, model: nn.Module, data_config: Dict[str, Any], tag: Optional[str] = None,
                      label_names: Optional[List[str]] = None) -> None:
    """The run folder's config.json (``hf_config.write_config``), with the preprocessing the weights were trained
    with and the class names."""
    write_config(path, model, data_config=data_config, tag=tag, label_names=label_names)


def truncate_lines(path: Path, keep: Callable[[str], bool]) -> None:
    """Drop the lines of a log that a killed run wrote after its last checkpoint (those where ``keep`` is
    false) and a half-written last line (no newline at its end). Any other line that ``keep`` cannot read is
    corrupt: a CheckpointError names the file and the line, and the log is left as it is."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            if keep(line):
                kept.append(line + "\n")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            if number == len(lines) and not text.endswith("\n"):
                continue  # cut off by a kill mid-write
            raise CheckpointError(f"--resume: {path}, line {number} is corrupt ({error_line(e)}); it is "
                                  "not a line this trainer writes: fix or remove it, then resume") from None
    write_text(path, "".join(kept))
