"""The resume checkpoint, ``checkpoint.pt``: how it is saved, loaded, checked against its run folder and taken
back by a resumed run (a new ``--lr`` included). Nothing else reads or writes it.

It holds plain types and tensors only (``torch.load(weights_only=True)``: loading it runs no code), and a resumed
run ends with the same weights, bit for bit, as one that was never stopped. Its keys: ``format``, ``settings``
(``Settings.to_dict()``), where the run is (``TrainState``), ``totals`` (``EpochTotals``), the ``model``,
``optimizer`` and ``scheduler`` states, ``rng`` (``RandomStreams``) and ``world_size`` (the processes that wrote it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from sdzoo.files.checks import error_line
from sdzoo.files.disk import PathLike
from sdzoo.files.run_folder import (
    CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, WEIGHTS_NAME, CheckpointError, check_run_folder_free,
    load_state, read_run_config, save_state)
from sdzoo.training.metrics_plot import epoch_records
from sdzoo.training.settings import DEFINING_SETTINGS, Settings, TrainError, given_flags, new_run_settings
from sdzoo.survival import TRAINED_FIELDS
from sdzoo.gate import derived_seed
from sdzoo.files.weights import WeightsError, as_json_value, read_header

__all__ = [
    "CHECKPOINT_FORMAT", "RESUME_KEYS", "TrainState", "EpochTotals", "RandomStreams", "save_checkpoint",
    "load_resume_state", "resume_settings", "check_checkpoint_of_folder", "restore", "say_resumed", "lr_change_in",
]

CHECKPOINT_FORMAT = 1
RESUME_KEYS = ("settings", "epoch", "step", "global_step", "elapsed", "best", "totals", "model", "optimizer",
               "scheduler", "rng", "world_size")
BEST_KEYS = ("epoch", "step", "val_error", "test_error")
MAX_INT = 2**63 - 1


# -- what it holds ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where a run is: epochs and steps done, seconds spent by earlier processes, and the best evaluation."""
    epoch: int = 0                  # epochs done
    step: int = 0                   # steps done in the epoch in progress
    global_step: int = 0
    elapsed: float = 0.0            # seconds of the processes before this one (the checkpoint's: all so far)
    best: Dict[str, Any] = field(default_factory=lambda: dict.fromkeys(BEST_KEYS))

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any]) -> "TrainState":
        return cls(**{f.name: checkpoint[f.name] for f in fields(cls)})


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
        return cls.from_state(dict(loss_sum=0.0, correct=0, grad_abs=[0.0] * num_groups), device)

    def add_step(self, loss_sum: Tensor, correct: Tensor, grad_abs: Tensor, images: int, depth: float) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.grad_abs += grad_abs
        self.seen += images
        self.steps += 1
        self.depth_sum += depth

    def to_state(self) -> Dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # the fields only, as from_state reads them
        return {k: v.tolist() if isinstance(v, Tensor) else v for k, v in values.items()}

    @classmethod
    def from_state(cls, state: Dict[str, Any], device: torch.device) -> "EpochTotals":
        return cls(**dict(state, loss_sum=torch.tensor(state["loss_sum"], dtype=torch.float64, device=device),
                          correct=torch.tensor(state["correct"], dtype=torch.int64, device=device),
                          grad_abs=torch.tensor(state["grad_abs"], dtype=torch.float64, device=device)))


class RandomStreams:
    """Every random state of a run: data order, augmentation, the gates' sampler and torch's generators. An
    epoch's data plan is drawn at its start, so a checkpoint inside an epoch keeps the order and augmentation
    generators' epoch-start states (the plan is redrawn on resume)."""

    def __init__(self, seed: int, gate_sampler, device: torch.device):
        self.order = torch.Generator().manual_seed(derived_seed(seed, 1))
        self.augment = torch.Generator().manual_seed(derived_seed(seed, 2))
        self.gate_sampler, self.device = gate_sampler, device
        self._epoch_start: Optional[tuple] = None

    def plan_epoch(self, data):
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
        if isinstance(state["gates"], int):  # older checkpoints held a generator state, restored with the model
            self.gate_sampler.step = state["gates"]
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)


# -- save and load ---------------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, state: TrainState, *, elapsed: float, settings: Settings, world_size: int,
                    totals: EpochTotals, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    streams: RandomStreams) -> None:
    """Write the run folder's checkpoint.pt (atomically: the previous one or this one, never half of one);
    ``elapsed``: the seconds so far, this process's included."""
    save_state(folder / CHECKPOINT_NAME, dict(
        format=CHECKPOINT_FORMAT, **dict(asdict(state), elapsed=elapsed), settings=settings.to_dict(),
        world_size=world_size, totals=totals.to_state(), model=model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), rng=streams.state()))


def load_resume_state(path: PathLike) -> Dict[str, Any]:
    """A trainer checkpoint (read on the CPU), its format, keys and every value it restores checked before any
    work."""
    checkpoint = load_state(path, map_location=torch.device("cpu"))
    if (not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT
            or any(k not in checkpoint for k in RESUME_KEYS) or not isinstance(checkpoint["settings"], dict)):
        raise CheckpointError(f"--resume: {path} is not a checkpoint of this trainer (it lacks the format "
                              f"marker or one of {', '.join(RESUME_KEYS)})")
    problem = check_restored_values(checkpoint)
    if problem:
        raise CheckpointError(f"--resume: {path} is damaged: {problem}. It was not resumed, and nothing in its "
                              "folder was changed")
    return checkpoint


# -- every restored value, by type and range: a wrong one would fail mid-run or be kept silently ---------------
def _is_int(value: Any, low: int = 0, high: int = MAX_INT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any, low: float = 0.0, high: float = math.inf) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        low <= value <= high


def _is_byte_state(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(v) for v in value)


def _same_kind(value: Any, template: Any, exact_ints: bool = True) -> bool:
    """``value`` is of ``template``'s kind, as the states of SGD and MultiStepLR hold them: an int >= -1 (with
    ``exact_ints``) or a finite number >= 0, a bool, None or a bool for a None flag, a list of finite numbers, a
    mapping of ints (MultiStepLR's milestones)."""
    if isinstance(template, bool) or template is None:
        return isinstance(value, bool) or (template is None and value is None)
    if isinstance(template, int) and exact_ints:
        return _is_int(value, low=-1)
    if isinstance(template, (int, float)):
        return _is_number(value)
    if isinstance(template, list):
        return _numbers(value)
    if isinstance(template, dict):
        return isinstance(value, dict) and all(_is_int(k) and _is_int(v) for k, v in value.items())
    return isinstance(value, type(template))


def _first_wrong(rows) -> Optional[str]:
    """The first of (name, value, ok, allowed) rows whose value is not ok, as a message."""
    return next((f"{name} must be {allowed}; got {value!r:.80}" for name, value, ok, allowed in rows if not ok), None)


def check_restored_values(checkpoint: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the values a resume restores (None: nothing)."""
    c, epochs = checkpoint, checkpoint["settings"].get("epochs")
    problem = _first_wrong((
        ("epoch", c["epoch"], _is_int(c["epoch"], 0, epochs if _is_int(epochs) else MAX_INT),
         f"an integer in [0, {epochs}]"),
        ("step", c["step"], _is_int(c["step"]), "an integer >= 0"),
        ("global_step", c["global_step"], _is_int(c["global_step"]), "an integer >= 0"),
        ("elapsed", c["elapsed"], _is_number(c["elapsed"]), "a finite number of seconds >= 0"),
        ("world_size", c["world_size"], _is_int(c["world_size"], 1), "an integer >= 1")))
    if problem:
        return problem
    best = c["best"]
    if not isinstance(best, dict) or set(best) != set(BEST_KEYS):
        return f"best must be a mapping of {', '.join(BEST_KEYS)}; got {best!r:.120}"
    error = "None or a % in [0, 100]"
    problem = _first_wrong((
        ("best['epoch']", best["epoch"], best["epoch"] is None or _is_int(best["epoch"], 1, c["epoch"] + 1),
         f"None or an integer in [1, {c['epoch'] + 1}]"),
        ("best['step']", best["step"], best["step"] is None or _is_int(best["step"], 0, c["global_step"]),
         f"None or an integer in [0, {c['global_step']}]"),
        ("best['val_error']", best["val_error"], best["val_error"] is None or _is_number(best["val_error"], 0, 100),
         error),
        ("best['test_error']", best["test_error"],
         best["test_error"] is None or _is_number(best["test_error"], 0, 100), error)))
    if problem:
        return problem
    totals = c["totals"]
    kinds = dict(loss_sum=_is_number, correct=_is_int, seen=_is_int, steps=_is_int, depth_sum=_is_number,
                 train_time=_is_number, grad_abs=_numbers)
    if not isinstance(totals, dict) or set(totals) != set(kinds):
        return f"totals must be a mapping of {', '.join(kinds)}; got {totals!r:.120}"
    problem = _first_wrong((f"totals[{k!r}]", totals[k], ok(totals[k]),
                            "a finite number >= 0 (a list of them for grad_abs)") for k, ok in kinds.items())
    return problem or _states_problem(c["model"], c["optimizer"], c["scheduler"]) or _rng_problem(c["rng"])


def _states_problem(model: Any, optimizer: Any, scheduler: Any) -> Optional[str]:
    """The model, optimizer and scheduler states against what this trainer's (SGD, MultiStepLR) hold."""
    if not isinstance(model, dict) or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        return "the model state must be a state dict (names to tensors)"
    template_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    scheduler_template = torch.optim.lr_scheduler.MultiStepLR(template_optimizer, milestones=[1]).state_dict()
    group_template = template_optimizer.state_dict()["param_groups"][0]  # after the scheduler: with initial_lr
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) or \
            not isinstance(optimizer.get("param_groups"), list) or not optimizer["param_groups"]:
        return "the optimizer state must hold state and param_groups"
    for group in optimizer["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) or \
                not all(_is_int(i) for i in group["params"]):
            return "the optimizer state's param_groups must be mappings with a list of parameter indices"
        for key, template in group_template.items():
            if key != "params" and key in group and not _same_kind(group[key], template, exact_ints=False):
                return f"the optimizer state's setting {key!r} must be like {template!r}; got {group[key]!r:.80}"
    for index, state in optimizer["state"].items():
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            return f"the optimizer state of parameter {index!r} must be a mapping of tensors"
    if not isinstance(scheduler, dict) or set(scheduler) != set(scheduler_template):
        return f"the scheduler state must be the MultiStepLR state this trainer saves ({', '.join(scheduler_template)})"
    for key, template in scheduler_template.items():
        if not _same_kind(scheduler[key], template):
            return f"the scheduler state's {key!r} must be like {template!r}; got {scheduler[key]!r:.80}"
    return None


def _rng_problem(rng: Any) -> Optional[str]:
    if not isinstance(rng, dict) or not {"order", "augment", "gates", "torch"} <= set(rng):
        return "rng must be a mapping of order, augment, gates, torch (and cuda)"
    bad = [k for k in ("order", "augment", "torch") if not _is_byte_state(rng[k])]
    if rng.get("cuda") is not None and not _is_byte_state(rng["cuda"]):
        bad.append("cuda")
    if bad:
        return f"rng[{bad[0]!r}] must be a generator state (a 1-d uint8 tensor)"
    if not _is_int(rng["gates"]) and not _is_byte_state(rng["gates"]):
        return f"rng['gates'] must be the gates' step, an integer in [0, 2**63 - 1]; got {rng['gates']!r:.80}"
    return None


# -- the settings of a run, resumed or new ---------------------------------------------------------------------
def resolve_settings(args: argparse.Namespace) -> Tuple[Settings, Optional[Dict[str, Any]]]:
    """The run's settings (recipe < flags, or the checkpoint's < run flags on resume) and the checkpoint."""
    given = given_flags(args)
    resume = given.pop("resume", None)
    return (new_run_settings(given), None) if resume is None else resume_settings(resume, given)


def resume_settings(resume: str, given: Dict[str, Any]) -> Tuple[Settings, Dict[str, Any]]:
    """``--resume RUN``: the checkpoint's settings, with the flags ``given`` of how it runs (and a new
    ``--lr``), and the checkpoint, checked against its folder before anything in it is touched."""
    path = Path(resume or given.get("output") or "")
    if str(path) == ".":
        raise TrainError("--resume needs the run folder: --resume RUN, or --output RUN --resume")
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if path.parent.is_dir():
        check_run_folder_free(path.parent)
    checkpoint = load_resume_state(path)
    if "output" in given and Path(given["output"]).resolve() != path.parent.resolve():
        raise TrainError(f"--output {given['output']} is not the folder of the run resumed ({path.parent})")
    settings = Settings.from_dict(checkpoint["settings"])
    check_checkpoint_of_folder(path, checkpoint)
    if given.get("lr", settings.lr) != settings.lr:  # the one defining setting a resume may change, recorded
        change = dict(epoch=checkpoint["epoch"], step=checkpoint["step"], global_step=checkpoint["global_step"],
                      old=settings.lr, new=given["lr"])
        settings = dataclasses.replace(settings, lr=given["lr"], lr_changes=(*settings.lr_changes, change))
    changed = [k for k in DEFINING_SETTINGS if k in given and given[k] != getattr(settings, k)]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {_as_typed(given[k])} (run: {_as_typed(getattr(settings, k))})"
                          for k in changed)
        raise TrainError(f"--resume continues a run with its own settings; these flags differ: {flags}. "
                         "Start a new run (another --output) to change them")
    how_it_runs = {k: v for k, v in given.items() if k not in DEFINING_SETTINGS}
    return dataclasses.replace(settings, **dict(how_it_runs, output=str(path.parent))), checkpoint


def _as_typed(value: Any) -> str:
    """A setting's value as it is given on the command line (``0.5 0.75`` for a tuple)."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


# -- does it belong to its folder ------------------------------------------------------------------------------
def _differing(theirs: Dict[str, Any], settings: Dict[str, Any]) -> List[str]:
    return [f"{k}: {v!r} there, {settings.get(k)!r} in the checkpoint" for k, v in theirs.items()
            if as_json_value(v) != as_json_value(settings.get(k))]


def check_checkpoint_of_folder(path: Path, checkpoint: Dict[str, Any]) -> None:
    """A checkpoint.pt must be the last state of the run whose files lie beside it: the settings of summary.json
    and config.json, the history of metrics.jsonl up to its step (its best evaluation among them), and the
    weights of model.safetensors. Raises CheckpointError, having read the files only."""
    folder, settings = path.parent, checkpoint["settings"]
    problems = []

    def read(name: str, reader: Callable[[Path], Any]) -> Any:
        try:
            return reader(folder / name) if (folder / name).is_file() else None
        except (OSError, ValueError):
            problems.append(f"{name} is unreadable")

    summary = read(SUMMARY_NAME, lambda path: json.loads(path.read_text(encoding="utf-8")))
    recorded = summary.get("settings") if isinstance(summary, dict) else None
    if isinstance(recorded, dict):
        differ = _differing({k: recorded[k] for k in DEFINING_SETTINGS if k != "lr" and k in recorded}, settings)
        if differ:
            problems.append(f"{SUMMARY_NAME} records other settings ({', '.join(differ[:4])})")
    config = read(CONFIG_NAME, read_run_config)
    if config is not None:
        theirs = dict(model=config["architecture"], **{k: config.get("model_args", {}).get(k) for k in TRAINED_FIELDS})
        differ = _differing({k: v for k, v in theirs.items() if k in settings and v is not None}, settings)
        if differ:
            problems.append(f"{CONFIG_NAME} describes another model ({', '.join(differ)})")
    problems += _history_problems(folder, checkpoint) + _weights_problems(folder, checkpoint)
    if problems:
        raise CheckpointError(f"--resume: {path} is not the last checkpoint of the run in {folder}: "
                              f"{'; '.join(problems)}. Nothing in the folder was changed; resume the run whose "
                              "checkpoint this is in its own folder")


def _history_problems(folder: Path, checkpoint: Dict[str, Any]) -> List[str]:
    """metrics.jsonl must hold the epochs the checkpoint has done, and its best evaluation."""
    best, step, epochs = checkpoint["best"], checkpoint["global_step"], checkpoint["epoch"]
    metrics = folder / METRICS_NAME
    if not metrics.is_file():
        return [f"it has done {epochs} epoch(s), and the folder has no {METRICS_NAME}"] \
            if epochs or best["step"] is not None else []
    records = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill: dropped on resume anyway
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            records.append(record)
    problems = []
    done = [r.get("epoch") for r in epoch_records(records)]
    if done != list(range(1, epochs + 1)):
        problems.append(f"it has done {epochs} epoch(s) by step {step}, and {METRICS_NAME} records epochs "
                        f"{done[:10]} by then")
    recorded = any(all(r.get(k) == best[k] for k in ("step", "val_error", "test_error")) for r in records)
    if best["step"] is not None and not recorded:
        problems.append(f"its best evaluation (step {best['step']}, validation error {best['val_error']}, "
                        f"test error {best['test_error']}) is not in {METRICS_NAME}")
    return problems


def _weights_problems(folder: Path, checkpoint: Dict[str, Any]) -> List[str]:
    """model.safetensors holds tensors of the checkpoint model's names and shapes, and its very tensors when the
    best evaluation is the checkpoint's own step."""
    weights, state, best = folder / WEIGHTS_NAME, checkpoint["model"], checkpoint["best"]
    if not weights.is_file():
        return [f"its best evaluation is step {best['step']}, and the folder has no {WEIGHTS_NAME}"] \
            if best["step"] is not None else []
    try:
        shapes = read_header(weights)[0]
        if {k: tuple(v.shape) for k, v in state.items()} != shapes:
            return [f"{WEIGHTS_NAME} holds tensors of other names or shapes than the checkpoint's model"]
        if best["step"] == checkpoint["global_step"]:
            with safe_open(str(weights), framework="pt") as f:
                changed = [k for k in shapes if not torch.equal(f.get_tensor(k), state[k])]
            if changed:
                return [f"its best weights are its own (step {best['step']}), and {WEIGHTS_NAME} holds other "
                        f"values ({', '.join(changed[:3])})"]
    except (SafetensorError, OSError, WeightsError) as e:
        return [f"{WEIGHTS_NAME} is unreadable ({e})"]
    return []


# -- taking it back ------------------------------------------------------------------------------------------
def restore(checkpoint: Dict[str, Any], s: Settings, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
            streams: RandomStreams) -> Tuple[TrainState, Optional[Dict[str, Any]]]:
    """Load a checkpoint's states into the run's parts, a new ``--lr`` taking over from the saved one. Returns
    where the run is and the running sums of the epoch it stopped in."""
    path = Path(s.output) / CHECKPOINT_NAME
    try:
        model.load_state_dict(checkpoint["model"])
    except Exception as e:  # noqa: BLE001  a tampered or foreign state: any type, any error
        why = error_line(e, 400, lines=4)
        raise CheckpointError(f"--resume: the model state in {path} does not fit {s.model}: {why}") from None
    for part, load in (("optimizer", lambda: _load_optimizer(optimizer, checkpoint["optimizer"])),
                       ("scheduler", lambda: scheduler.load_state_dict(checkpoint["scheduler"])),
                       ("random generator", lambda: streams.restore(checkpoint["rng"]))):
        try:
            load()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"--resume: the {part} state in {path} is damaged or of another run: "
                                  f"{error_line(e, 300)}") from None
    old_lr = checkpoint["settings"]["lr"]
    if old_lr != s.lr:  # the saved lr (its drops so far included) scaled to the new one; later drops start there
        for group in optimizer.param_groups:
            group["lr"] *= s.lr / old_lr
            group["initial_lr"] = s.lr
        scheduler.base_lrs = [s.lr] * len(scheduler.base_lrs)
    return TrainState.from_checkpoint(checkpoint), checkpoint["totals"]


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """torch checks the groups' sizes only: a buffer of another shape would fail in the first step, mid-run."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if value.dim() and value.shape != p.shape:
                    raise ValueError(f"{key} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}")


def say_resumed(log, checkpoint: Dict[str, Any], s: Settings, state: TrainState) -> None:
    """Where the run resumes (``log``: the run's ``RunLog``), a new ``--lr``, and a change of process count."""
    old_lr = checkpoint["settings"]["lr"]
    if old_lr != s.lr:
        log.say(f"--lr changed from {old_lr} to {s.lr} (recorded in metrics.jsonl and summary.json)")
    log.say(f"resuming {log.out} at epoch {state.epoch + 1}, step {state.step} (global step {state.global_step})")
    if checkpoint["world_size"] != log.dist.world and log.dist.main:
        # Same global batches and gates, but BatchNorm sees other per-process batches: not bit-identical.
        print(f"warning: the run was checkpointed with {checkpoint['world_size']} process(es) and resumes "
              f"with {log.dist.world}; it continues correctly but not bit for bit", file=sys.stderr)


def lr_change_in(s: Settings, epoch: int) -> Optional[Dict[str, Any]]:
    """The lr change that a resume made in ``epoch`` (counted from 0), if any."""
    changes = [change for change in s.lr_changes if change["epoch"] == epoch]
    return changes[-1] if changes else None
