"""Run-folder files and the resume state, written so that nothing is ever half-written.

Every file goes through ``sdzoo._files`` (a temporary file, then renamed over the old one), so a run killed
at any moment leaves the previous version or the new one. The run folder is a timm local-dir (``config.json``
+ ``model.safetensors``); beside them, ``checkpoint.pt`` holds plain types and tensors only, read with
``torch.load(weights_only=True)``: the run's position (``TrainState``), its random streams
(``RandomStreams``) and the running sums of the epoch in progress (``EpochTotals``), so that a resumed run
ends with the same weights, bit for bit, as one that was never stopped.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from filelock import FileLock, Timeout
from torch import Tensor, nn

from ._files import PathLike, atomic_write, remove_stale_temps

__all__ = [
    "CHECKPOINT_NAME", "WEIGHTS_NAME", "CONFIG_NAME", "METRICS_NAME", "SUMMARY_NAME", "CURVES_NAME", "CheckpointError",
    "save_state", "load_state", "save_weights", "save_model_config", "remove_stale_temp_files",
    "describe_load_error", "SURVIVAL_SETTINGS", "weights_metadata", "read_weights_settings", "read_run_config",
    "RunFolderBusy", "lock_run_folder", "check_run_folder_free", "LOCK_NAME",
    "CHECKPOINT_FORMAT", "load_resume_state", "TrainState", "EpochTotals", "RandomStreams", "truncate_lines",
]

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
CURVES_NAME = "curves.png"
LOCK_NAME = ".lock"
CHECKPOINT_FORMAT = 1
# safetensors metadata key of the settings the weights were trained with (the values must be strings: JSON).
SETTINGS_KEY = "sdzoo"
# The model arguments that folding p_l into the weights depends on.
SURVIVAL_SETTINGS = ("survival_prob", "survival_rule", "scaling", "gate_mode")


class CheckpointError(Exception):
    """A resume state that is missing or unreadable: a user error, reported without a traceback."""


def remove_stale_temp_files(folder: PathLike, names) -> None:
    """Temporary files of the files ``names``, left by a process that was killed mid-write (not those of other
    files: an export may be writing into the folder now)."""
    remove_stale_temps(folder, names)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def save_state(path: PathLike, state: Dict[str, Any]) -> None:
    # Serialised in memory, then written by Python: a full disk is then an OSError that names the file
    # (torch's own file writer reports it as an unexplained RuntimeError).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda temp: _write_bytes(temp, buffer.getbuffer()))


def load_state(path: PathLike, map_location: Optional[torch.device] = None) -> Dict[str, Any]:
    """The resume state, read with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run code from the file: not an option here.
        raise CheckpointError(f"--resume: {path} holds objects other than tensors and plain types; it is not "
                              "a checkpoint of this trainer and was not loaded (nothing in it was run)") from None
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"--resume: cannot read {path} as a torch file ({type(e).__name__}: "
                              f"{first_line})") from None


def _weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    # safetensors needs contiguous tensors; channels_last weights are not.
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def weights_metadata(model: nn.Module) -> Dict[str, str]:
    """The metadata of a weights file: the architecture, its classes and the survival settings, so that a bare
    ``model.safetensors`` brings what loading and folding it need (as a run folder's config.json does)."""
    # One key: safetensors writes its metadata map in hash order, so with two keys the same weights would give
    # files that differ in bytes from one process to the next.
    if not hasattr(model, "stochastic_depth_args"):
        return {"format": "pt"}
    args = model.stochastic_depth_args()
    settings = {k: args.get(k) for k in SURVIVAL_SETTINGS}
    if args.get("folded_from"):
        settings["folded_from"] = dict(args["folded_from"])
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return {SETTINGS_KEY: json.dumps(dict(architecture=architecture, num_classes=model.num_classes,
                                          model_args=settings))}


def save_weights(path: PathLike, model: nn.Module) -> None:
    """The model's weights as safetensors, with ``weights_metadata`` (the one writer of weights files)."""
    from safetensors.torch import save

    tensors = {k: v.cpu() for k, v in _weights(model).items()}
    data = save(tensors, metadata=weights_metadata(model))
    atomic_write(path, lambda temp: _write_bytes(temp, data))  # as in save_state: errors name the file


def read_weights_settings(path: PathLike) -> Optional[Dict[str, Any]]:
    """What ``weights_metadata`` stored in a safetensors file (architecture, num_classes, model_args), or None
    for a file written elsewhere. Raises ValueError naming the file when the metadata is malformed."""
    from safetensors import safe_open

    from .integrity import recorded_settings  # imports this module: imported when called

    with safe_open(os.fspath(path), framework="pt") as f:
        return recorded_settings(f.metadata() or {}, os.fspath(path))


def read_run_config(path: PathLike) -> Dict[str, Any]:
    """A run folder's config.json, checked: a JSON object whose model_args (if any) is a mapping.
    Raises ValueError naming the file."""
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
    from .hf_config import normalize_config

    normalize_config(config, source=str(path))  # raises when model_args and the top level disagree
    return config


# -- one writer per run folder ----------------------------------------------------------------------------
class RunFolderBusy(Exception):
    """Another process is writing to the run folder."""


def lock_run_folder(folder: PathLike):
    """Hold the run folder's lock file (``filelock``: an OS lock, which the OS drops when the process ends,
    however it ends) until ``close()`` is called on the returned lock, or it is garbage-collected. Raises
    ``RunFolderBusy`` when another process holds it."""
    path = Path(folder) / LOCK_NAME
    lock = _RunFolderLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderBusy(f"another process is writing to {folder} (it holds {path}); wait for it to "
                            "finish, or choose another --output") from None
    return lock


class _RunFolderLock(FileLock):
    """The run folder's lock; ``close()`` lets go of it (as closing the lock file did)."""

    def close(self) -> None:
        self.release(force=True)


def check_run_folder_free(folder: PathLike) -> None:
    """Raise ``RunFolderBusy`` when another process holds the folder's lock (the lock is not kept)."""
    if (Path(folder) / LOCK_NAME).exists():
        lock_run_folder(folder).close()


def save_model_config(path: PathLike, model: nn.Module, data_config: Dict[str, Any], tag: Optional[str] = None,
                      label_names: Optional[List[str]] = None) -> None:
    """The run folder's ``config.json`` (``sdzoo.hf_config``: loads in timm and in transformers): the
    architecture, the model arguments (survival settings included), the preprocessing the weights were
    trained with, and the class names."""
    from .hf_config import write_config

    write_config(path, model, data_config=data_config, tag=tag, label_names=label_names)


def describe_load_error(error: RuntimeError, lines: int = 4, width: int = 400) -> str:
    """torch's strict-load error (missing, unexpected and mis-shaped tensors), cut to its first lines: for a
    deep model it can list hundreds of keys."""
    text = [line.strip() for line in str(error).strip().splitlines()]
    head = [line if len(line) <= width else line[:width] + " ..." for line in text[:lines]]
    more = f" ... ({len(text) - lines} more lines)" if len(text) > lines else ""
    return " ".join(head) + more


# -- the resume state -----------------------------------------------------------------------------------------
_RESUME_KEYS = ("settings", "epoch", "step", "global_step", "elapsed", "best", "totals", "model", "optimizer",
                "scheduler", "rng", "world_size")


def load_resume_state(path: PathLike) -> Dict[str, Any]:
    """A trainer checkpoint, checked for its format marker and keys (read on the CPU)."""
    checkpoint = load_state(path, map_location=torch.device("cpu"))
    if (not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT
            or any(k not in checkpoint for k in _RESUME_KEYS) or not isinstance(checkpoint["settings"], dict)):
        raise CheckpointError(f"--resume: {path} is not a checkpoint of this trainer (it lacks the format "
                              f"marker or one of {', '.join(_RESUME_KEYS)})")
    return checkpoint


def _no_evaluation_yet() -> Dict[str, Any]:
    return dict(epoch=None, step=None, val_error=None, test_error=None)


@dataclass
class TrainState:
    """Where a run is: epochs and steps done, seconds spent by earlier processes, and the best evaluation."""
    epoch: int = 0                  # epochs done
    step: int = 0                   # steps done in the epoch in progress
    global_step: int = 0
    elapsed: float = 0.0            # seconds of the processes before this one (the checkpoint's: all so far)
    best: Dict[str, Any] = field(default_factory=_no_evaluation_yet)  # epoch, step, val_error, test_error

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any]) -> "TrainState":
        return cls(epoch=checkpoint["epoch"], step=checkpoint["step"], global_step=checkpoint["global_step"],
                   elapsed=checkpoint["elapsed"], best=checkpoint["best"])

    def to_checkpoint(self, elapsed: float, **parts: Any) -> Dict[str, Any]:
        """The checkpoint's dict: this position, ``elapsed`` (the seconds so far, this process's included) and
        ``parts`` (settings, model, optimizer, ... states)."""
        return dict(format=CHECKPOINT_FORMAT, **dict(asdict(self), elapsed=elapsed), **parts)


@dataclass
class EpochTotals:
    """Running sums of one epoch, saved in mid-epoch checkpoints so a resumed epoch reports the same."""
    loss_sum: Tensor
    correct: Tensor
    grad_abs: Tensor
    seen: int = 0
    steps: int = 0
    depth_sum: float = 0.0
    train_time: float = 0.0

    @classmethod
    def zeros(cls, num_groups: int, device: torch.device) -> "EpochTotals":
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros(num_groups, dtype=torch.float64, device=device))

    def add_step(self, loss_sum: Tensor, correct: Tensor, grad_abs: Tensor, images: int, depth: float) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.grad_abs += grad_abs
        self.seen += images
        self.steps += 1
        self.depth_sum += depth

    def to_state(self) -> Dict[str, Any]:
        return dict(loss_sum=self.loss_sum.item(), correct=self.correct.item(), seen=self.seen, steps=self.steps,
                    depth_sum=self.depth_sum, train_time=self.train_time, grad_abs=self.grad_abs.tolist())

    @classmethod
    def from_state(cls, state: Dict[str, Any], device: torch.device) -> "EpochTotals":
        return cls(torch.tensor(state["loss_sum"], dtype=torch.float64, device=device),
                   torch.tensor(state["correct"], dtype=torch.int64, device=device),
                   torch.tensor(state["grad_abs"], dtype=torch.float64, device=device),
                   state["seen"], state["steps"], state["depth_sum"], state["train_time"])


def _stream_seed(seed: int, stream: int) -> int:
    """Independent seeds for the data order and the augmentation, derived from the run's seed."""
    from ._seeds import derived_seed
    return derived_seed(seed, stream)


class RandomStreams:
    """Every random state of a run: the data order and augmentation generators, the gates' sampler and
    torch's global generators. An epoch's data plan is drawn at its start, so a checkpoint inside an epoch
    keeps the generators' epoch-start states (the plan is redrawn on resume) and the others' current ones."""

    def __init__(self, seed: int, gate_sampler, device: torch.device):
        self.order = torch.Generator().manual_seed(_stream_seed(seed, 1))
        self.augment = torch.Generator().manual_seed(_stream_seed(seed, 2))
        self.gate_sampler, self.device = gate_sampler, device
        self._epoch_start: Optional[tuple] = None

    def plan_epoch(self, data):
        """The epoch's data plan (order and augmentation), drawn from the order and augmentation streams."""
        self._epoch_start = (self.order.get_state(), self.augment.get_state())
        return data.plan_epoch(self.order, self.augment)

    def end_epoch(self) -> None:
        self._epoch_start = None

    def state(self) -> Dict[str, Any]:
        order, augment = self._epoch_start or (self.order.get_state(), self.augment.get_state())
        cuda = self.device.type == "cuda"
        return dict(order=order, augment=augment, gates=self.gate_sampler.step,
                    torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(self.device) if cuda else None)

    def restore(self, state: Dict[str, Any]) -> None:
        self.order.set_state(state["order"])
        self.augment.set_state(state["augment"])
        if isinstance(state["gates"], int):  # the gates' key; checkpoints before it held a generator state,
            self.gate_sampler.step = state["gates"]  # and then the model's state dict has restored the key
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)


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
            raise CheckpointError(f"--resume: {path}, line {number} is corrupt ({type(e).__name__}: {e}); it is "
                                  "not a line this trainer writes: fix or remove it, then resume") from None
    atomic_write(path, lambda temp: Path(temp).write_text("".join(kept)))
