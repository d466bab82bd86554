"""The training loop: one run of a stochastic-depth ResNet from its ``Settings``, on one process or many.

Each step trains on one global batch, split evenly over the processes (and over ``accum_steps``
micro-batches), with one draw of the gates for the whole global batch: every rank skips the same blocks.
Evaluation (each epoch, or every ``eval_every_steps``) runs the full network in fp32. Every parameter decays,
BatchNorm's and biases too, and a skipped block's parameters see a zero gradient, so that weight decay and
momentum still move them, as in the authors' code. The settings and flags live in ``sdzoo.settings``, the
resume state in ``sdzoo.checkpoint``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._files import save_json
from .checkpoint import (
    CHECKPOINT_NAME, CONFIG_NAME, CURVES_NAME, METRICS_NAME, SUMMARY_NAME, WEIGHTS_NAME, CheckpointError,
    EpochTotals, RandomStreams, RunFolderBusy, TrainState, describe_load_error, lock_run_folder,
    remove_stale_temp_files, save_model_config, save_state, save_weights, truncate_lines)
from .data import TENSOR_DATASETS, DataError, load_data
from .gate import GateSampler
from .metrics_plot import epoch_records, evaluations, plot_curves, read_metrics
from .settings import Settings, TrainError, build_parser, resolve_settings
from .survival import drop_warmup_factor

__all__ = ["main", "train", "build_optimizer", "build_scheduler", "train_step", "Diverged"]

EXIT_USAGE, EXIT_DIVERGED = 2, 3


class Diverged(TrainError):
    """The loss became NaN or infinite."""


# -- processes and device ------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_processes(s: Settings) -> Tuple[Dist, torch.device]:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process; the device to train on."""
    if s.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available here; use --device cpu (or auto)")
    use_cuda = s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available())
    dist = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not s.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if s.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if s.threads:
        torch.set_num_threads(s.threads)
    if dist.enabled and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist, device


def _all_reduce(t: Tensor, dist: Dist, op=torch_dist.ReduceOp.SUM) -> Tensor:
    if dist.enabled:
        torch_dist.all_reduce(t, op=op)
    return t


def local_batch_size(s: Settings, dist: Dist) -> int:
    """The global batch is split over the processes, then over micro-batches."""
    if s.batch_size % (dist.world * s.accum_steps):
        raise TrainError(f"--batch-size {s.batch_size} must be divisible by processes x --accum-steps "
                         f"({dist.world} x {s.accum_steps})")
    return s.batch_size // dist.world


def load_data_everywhere(s: Settings, dist: Dist, device: torch.device):
    """Rank 0 loads first (it may download), then the others; an error on rank 0 stops every rank. CIFAR-sized
    data then sits on the GPU, so that a batch is an index and its augmentation a tensor op."""
    def load():
        return load_data(s.dataset, s.data_dir, download=s.download, val_size=s.val_size, split_seed=s.split_seed,
                         image_size=s.image_size, num_classes=s.num_classes, shift=s.shift, hflip=s.hflip,
                         workers=s.workers, color_jitter=s.color_jitter, lighting=s.lighting)
    data, error = None, None
    if dist.main:
        try:
            data = load()
        except DataError as e:
            error = str(e)
    if dist.enabled:
        message = [error]
        torch_dist.broadcast_object_list(message, 0)
        error = message[0]
    if error:
        raise DataError(error)
    data = data if dist.main else load()
    if device.type == "cuda" and s.dataset in TENSOR_DATASETS:
        data.to(device)
    if len(data) < s.batch_size:
        raise TrainError(f"--batch-size {s.batch_size} is larger than the {len(data)} training images")
    return data


# -- model and optimizer -------------------------------------------------------------------------------------
def create_model(s: Settings, num_classes: int) -> nn.Module:
    import timm
    # The gate generator is seeded from --seed on every rank, so every rank draws the same gates.
    return timm.create_model(s.model, num_classes=num_classes, survival_prob=s.survival_prob,
                             survival_rule=s.survival_rule, gate_mode=s.gate_mode, scaling=s.scaling,
                             gate_seed=s.seed)


def build_model(s: Settings, num_classes: int, dist: Dist, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(s.seed)
    model = create_model(s, num_classes)
    if use_sync_batchnorm(s, dist, device.type == "cuda", s.batch_size // (dist.world * s.accum_steps)):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def use_sync_batchnorm(s: Settings, dist: Dist, cuda: bool, micro_batch: int) -> bool:
    """Whether BatchNorm normalises over every process's images (SyncBatchNorm). Where the settings ask for it
    but it cannot run (gloo on CPUs), rank 0 says once what differs."""
    if not (s.sync_bn and dist.enabled):
        return False
    if cuda:
        return True
    if dist.main:
        print(f"warning: SyncBatchNorm runs on GPUs only, so on these {dist.world} CPU processes BatchNorm "
              f"normalises each process's own {micro_batch} images, not the {micro_batch * dist.world} of "
              f"the step across processes as the recipe's single-GPU BatchNorm did (a single process with "
              f"--accum-steps {dist.world} would match this run); pass --no-sync-bn to accept it silently",
              file=sys.stderr)
    return False


def sync_batchnorm_statistics(model: nn.Module, dist: Dist) -> None:
    """Rank 0's BatchNorm statistics on every rank (what DDP gives every rank at its next forward anyway)."""
    if dist.enabled and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        from timm.utils import distribute_bn
        distribute_bn(model, dist.world, reduce=False)


def build_optimizer(model: nn.Module, s: Settings) -> torch.optim.SGD:
    # One group: BN weights and biases decay too, as the authors' code flattens all parameters.
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, dampening=s.dampening,
                           nesterov=s.nesterov, weight_decay=s.weight_decay)


def lr_milestones(s: Settings) -> List[int]:
    """Epochs done when each lr drop takes effect (MultiStepLR's milestones), by ``lr_drop_rule``."""
    milestones = set()
    for fraction in s.lr_drops:
        at = round(fraction * s.epochs, 9)  # 0.6 x 50 is not exactly 30 in floating point
        # main.lua: lr 0.1 while epoch < f x E (epochs from 1); fb.resnet.torch: while epoch <= f x E.
        done = math.ceil(at) - 1 if s.lr_drop_rule == "main.lua" else math.floor(at)
        milestones.add(max(1, done))
    return sorted(milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, s: Settings):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_milestones(s), gamma=s.lr_gamma)


def resume_from(checkpoint: Dict[str, Any], s: Settings, model: nn.Module, optimizer, scheduler,
                streams: RandomStreams) -> Tuple[TrainState, Optional[Dict[str, Any]]]:
    """Load a checkpoint's states; a new ``--lr`` takes over from the saved one (drops already passed apply).
    Returns where the run is and the running sums of the epoch it stopped in."""
    path = Path(s.output) / CHECKPOINT_NAME
    try:
        model.load_state_dict(checkpoint["model"])
    except Exception as e:  # noqa: BLE001  a tampered or foreign state: any type, any error
        raise CheckpointError(f"--resume: the model state in {path} does not fit {s.model}: "
                              f"{describe_load_error(e) if isinstance(e, RuntimeError) else _first_line(e)}") from None
    for part, load in (("optimizer", lambda: _load_optimizer(optimizer, checkpoint["optimizer"])),
                       ("scheduler", lambda: scheduler.load_state_dict(checkpoint["scheduler"])),
                       ("random generator", lambda: streams.restore(checkpoint["rng"]))):
        try:
            load()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"--resume: the {part} state in {path} is damaged or of another run: "
                                  f"{_first_line(e)}") from None
    old_lr = checkpoint["settings"]["lr"]
    if old_lr != s.lr:
        for group in optimizer.param_groups:
            group["lr"] *= s.lr / old_lr
            group["initial_lr"] = s.lr
        scheduler.base_lrs = [s.lr] * len(scheduler.base_lrs)
    return TrainState.from_checkpoint(checkpoint), checkpoint["totals"]


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:300]


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """torch's load_state_dict checks the groups' sizes only: a buffer of another shape, or a hyperparameter that
    is no number, would fail in the first step, mid-run. Checked here."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for key, value in group.items():
            if key != "params" and value is not None and not isinstance(value, (bool, int, float, str)):
                raise ValueError(f"param group setting {key!r} is a {type(value).__name__}, not a number")
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{key} of a parameter is a {type(value).__name__}, not a tensor")
                if value.dim() and value.shape != p.shape:
                    raise ValueError(f"{key} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}")


def wrap_model(model: nn.Module, s: Settings, dist: Dist, device: torch.device):
    """(the model that trains, the one that evaluates, the no_sync context for all but a step's last
    micro-batch): compiled with ``compile``, and the training one in DDP on several processes."""
    if s.compile:
        model = torch.compile(model)
    if not dist.enabled:
        return model, model, nullcontext
    # A plain DDP: every rank skips the same blocks (shared gate seed), and a skipped block's parameters get
    # zero gradients, so every parameter has a gradient in every step.
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, model, ddp.no_sync


# -- one step and one evaluation -----------------------------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
               gate_sampler: GateSampler, accum_steps: int = 1, autocast=nullcontext, no_sync=nullcontext,
               grad_groups: Optional[Dict[str, List[nn.Parameter]]] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One optimizer step on this process's part of the global batch.

    Returns the summed loss, the number of correct predictions and, with ``grad_groups``, the summed
    |gradient| of each group (all on the device, no sync). Micro-batches of a step share one draw of the gates
    (``GateSampler.hold``): the whole mini-batch keeps or skips a block, as in the paper.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with gate_sampler.hold():
        for i, (xm, ym) in enumerate(zip(x.chunk(accum_steps), y.chunk(accum_steps))):
            with no_sync() if i < accum_steps - 1 else nullcontext():
                with autocast():
                    logits = model(xm)
                loss = F.cross_entropy(logits.float(), ym)
                (loss / accum_steps).backward()
            loss_sum += loss.detach().double() * len(ym)
            correct += (logits.detach().argmax(1) == ym).sum()
    grad_abs = grad_abs_sums(grad_groups) if grad_groups else None
    optimizer.step()
    optimizer.zero_grad()
    return loss_sum, correct, grad_abs


@torch.no_grad()
def evaluate(model: nn.Module, data, split: str, dist: Dist, batch_size: int, device: torch.device,
             channels_last: bool = False) -> Tuple[float, float]:
    """(mean loss, error %) of a split, each rank evaluating its part. No gates are drawn in eval mode.

    Always fp32, as the authors evaluated: no autocast here, even when training autocasts to bf16, since bf16
    logits can flip borderline predictions and so the reported error."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in data.eval_batches(split, dist.rank, dist.world, batch_size, device):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    model.train()
    loss_sum, correct, count = _all_reduce(totals, dist).tolist()
    return loss_sum / count, 100.0 * (1.0 - correct / count)


class Evaluator:
    """Validation and test of the weights now, with rank 0's BatchNorm statistics on every rank. The best
    weights, those of the lowest validation error so far (of the latest evaluation when there is no validation
    set), are saved to the run folder."""

    def __init__(self, model: nn.Module, raw_model: nn.Module, data, s: Settings, dist: Dist,
                 device: torch.device, channels_last: bool, out: Path, local_batch: int):
        self.model, self.raw_model, self.data, self.s, self.dist = model, raw_model, data, s, dist
        self.device, self.channels_last, self.out = device, channels_last, out
        self.batch_size = s.eval_batch_size or max(256, 2 * local_batch)

    def _loss_and_error(self, split: str) -> Tuple[float, float]:
        return evaluate(self.model, self.data, split, self.dist, self.batch_size, self.device, self.channels_last)

    def evaluate_and_keep_best(self, state: TrainState, epoch: int) -> Dict[str, Any]:
        started = time.perf_counter()
        sync_batchnorm_statistics(self.raw_model, self.dist)
        val_loss, val_error = self._loss_and_error("val") if self.data.val is not None else (None, None)
        test_loss, test_error = (val_loss, val_error) if self.data.test_is_val else self._loss_and_error("test")
        best = state.best
        if val_error is None or best["val_error"] is None or val_error < best["val_error"]:
            state.best = dict(epoch=epoch + 1, step=state.global_step, val_error=val_error, test_error=test_error)
            if self.dist.main:
                # config.json is rewritten with every model.safetensors, from the same model: they always agree.
                save_model_config(self.out / CONFIG_NAME, self.raw_model, self.data.data_config(),
                                  tag=self.s.dataset, label_names=self.data.classes)
                save_weights(self.out / WEIGHTS_NAME, self.raw_model)
        return dict(val_loss=val_loss, val_error=val_error, test_loss=test_loss, test_error=test_error,
                    eval_time_s=time.perf_counter() - started)


def check_finite(loss_sum: Tensor, model: Optional[nn.Module], dist: Dist, out: Path, s: Settings,
                 epoch: int, step: int, steps_per_epoch: int) -> None:
    """Stop with ``Diverged`` when something became NaN or infinite on any rank: the loss (a NaN or inf loss
    in any step leaves the epoch's sum non-finite, so no step escapes) and, with ``model`` (before anything is
    saved), the weights and statistics."""
    bad = torch.zeros(2, device=loss_sum.device)
    bad[0] = (~torch.isfinite(loss_sum)).float()
    if model is not None:
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        bad[1] = (~torch.stack([torch.isfinite(t).all() for t in tensors])).any().float()
    loss_bad, state_bad = _all_reduce(bad, dist, torch_dist.ReduceOp.MAX).tolist()
    if not (loss_bad or state_bad):
        return
    what = "the training loss" if loss_bad else "the weights or BatchNorm statistics"
    if (out / CHECKPOINT_NAME).exists():
        advice = (f"the last good checkpoint, {out / CHECKPOINT_NAME}, is kept. Continue from it with a lower "
                  f"learning rate: --resume {out} --lr {s.lr / 10:g}; or check the data")
    else:
        advice = "no checkpoint had been written yet. Start again with a lower --lr (into a new --output), or " \
                 "check the data"
    raise Diverged(f"{what} became NaN or infinite in epoch {epoch + 1} (by step {step} of {steps_per_epoch}); "
                   f"training stopped and {advice}")


# -- what the loop records -----------------------------------------------------------------------------------
def stage_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """Parameters by stage (stem, layer1.., head): the groups of the gradient-magnitude metric."""
    groups: Dict[str, List[nn.Parameter]] = {"stem": [], **{n: [] for n in model.stage_names}, "head": []}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        groups[top if top in model.stage_names else "head" if top in ("fc", "global_pool") else "stem"].append(p)
    return {k: v for k, v in groups.items() if v}


def grad_abs_sums(groups: Dict[str, List[nn.Parameter]]) -> Tensor:
    """Sum of |gradient| per group (the L1 norm of its gradients), on the device (no sync)."""
    return torch.stack([torch.nn.utils.get_total_norm([p.grad for p in ps], norm_type=1).double()
                        for ps in groups.values()])


class GateLog:
    """The gates of the last training step, as the model's gate sampler recorded its last draw."""

    def __init__(self, sampler: GateSampler):
        self.sampler = sampler

    @property
    def last(self) -> Optional[Tuple[list, int]]:
        return self.sampler.last_draw

    def depth(self) -> float:
        """Blocks that ran in the last step (per sample, averaged, in sample mode)."""
        if self.last is None:
            return float("nan")
        gates, batch = self.last
        # A batch gate is a bool, or a float holding the inverted scale (0: skipped) under drop-rate warmup.
        return sum(1.0 if g is None else float(g > 0) if g.dim() == 0 else g.numel() / batch for g in gates)

    def line(self) -> str:
        gates, _ = self.last
        return " ".join("1" if g is None else str(int(g > 0)) if g.dim() == 0 else ",".join(map(str, g.tolist()))
                        for g in gates)


class RunLog:
    """The run folder and its logs: the folder's lock (rank 0 is its one writer, until ``close``), metrics.jsonl,
    the gates files (``record_gates``), summary.json, and the progress lines."""

    def __init__(self, out: Path, s: Settings, dist: Dist, started: float):
        self.out, self.s, self.dist, self.started = out, s, dist, started
        self.metrics = out / METRICS_NAME
        self.speaks = dist.main and not s.quiet
        self.context: Dict[str, Any] = {}  # what summary.json says of the run beside its results
        self.lock = self.gates = None
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            self.lock = lock_run_folder(out)
            remove_stale_temp_files(out, self.own_files())

    def own_files(self) -> List[str]:
        """Every file the trainer writes into its run folder (the others are not its to clean up)."""
        return [CHECKPOINT_NAME, WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, CURVES_NAME,
                *(f"gates_rank{rank}.txt" for rank in range(self.dist.world))]

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start_at(self, global_step: int) -> None:
        """Open the logs at ``global_step``: a resumed run drops the lines that a killed process wrote after its
        last checkpoint."""
        if self.dist.main:
            truncate_lines(self.metrics, lambda line: json.loads(line)["step"] <= global_step)
        if self.s.record_gates:
            if self.dist.enabled:
                torch_dist.barrier()  # rank 0 made the folder
            gates_path = self.out / f"gates_rank{self.dist.rank}.txt"
            truncate_lines(gates_path, lambda line: int(line.split(" ", 1)[0]) <= global_step)
            self.gates = open(gates_path, "a")

    def say(self, message: str) -> None:
        if self.speaks:
            from tqdm import tqdm
            tqdm.write(message)
            sys.stdout.flush()  # seen at once when the output goes to a file

    def record(self, record: Dict[str, Any]) -> None:
        if self.dist.main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def record_gates(self, global_step: int, gate_log: GateLog) -> None:
        if self.gates is not None:
            self.gates.write(f"{global_step} {gate_log.line()}\n")

    def flush(self) -> None:
        if self.gates is not None:
            self.gates.flush()

    def close(self) -> None:
        for f in (self.gates, self.lock):
            if f is not None:
                f.close()
        self.gates = self.lock = None

    def seconds(self, state: TrainState) -> float:
        """Seconds the run has taken, over every process that worked on it."""
        return state.elapsed + time.perf_counter() - self.started

    def summary(self, state: TrainState, data, finished: bool) -> Dict[str, Any]:
        """summary.json: the paper's number (test error at the evaluation of best validation error), the run's
        time and ``context``."""
        records = read_metrics(self.metrics) if self.dist.main else []
        evals, best, every = evaluations(records), state.best, self.s.eval_every_steps
        points = f"evaluation (every {every} steps)" if every else "epoch"
        summary = dict(
            finished=finished, epochs_done=len(epoch_records(records)), evaluations=len(evals),
            best_epoch=best["epoch"], best_step=best.get("step"), best_val_error=best["val_error"],
            test_error=best["test_error"],
            test_accuracy=None if best["test_error"] is None else 100.0 - best["test_error"],
            selection=(f"{points} of lowest validation error" if best["val_error"] is not None
                       else f"last {points} (no validation set)"),
            test_set="the validation set (no separate test set)" if data.test_is_val else "test",
            last_epoch_test_error=evals[-1]["test_error"] if evals else None, total_time_s=self.seconds(state),
            **self.context,
            lr_changes=list(self.s.lr_changes), settings=self.s.to_dict())
        if self.dist.main:
            save_json(self.out / SUMMARY_NAME, summary)
        return summary


class Progress:
    """The epoch's progress bar (rank 0, unless quiet): loss, lr, images/s and depth over the last window."""

    def __init__(self, epoch: int, s: Settings, dist: Dist, steps: int, done: int, totals: EpochTotals,
                 num_blocks: int, expected_depth: float):
        from tqdm import tqdm

        self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{s.epochs}", leave=False,
                        disable=not dist.main or s.quiet, dynamic_ncols=True)
        self.world, self.num_blocks, self.expected_depth = dist.world, num_blocks, expected_depth
        self.window = (time.perf_counter(), totals.seen, totals.loss_sum.item())

    def update(self, totals: EpochTotals, lr: float, show: bool) -> None:
        self.bar.update(1)
        if not show:
            return
        now, loss_now = time.perf_counter(), totals.loss_sum.item()
        started, seen, loss = self.window
        images = totals.seen - seen
        self.bar.set_postfix(loss=f"{(loss_now - loss) / max(1, images):.4f}", lr=f"{lr:.3g}",
                             img_s=f"{images * self.world / max(now - started, 1e-9):.0f}",
                             depth=f"{totals.depth_sum / totals.steps:.1f}/{self.num_blocks} "
                                   f"(E {self.expected_depth:.1f})")
        self.window = (now, totals.seen, loss_now)

    def close(self) -> None:
        self.bar.close()


def epoch_record(epoch: int, state: TrainState, lr: float, totals: EpochTotals, result: Dict[str, Any],
                 dist: Dist, groups: Dict[str, List[nn.Parameter]], expected_depth: float) -> Dict[str, Any]:
    """The epoch's line of metrics.jsonl: training loss and error over every rank, the evaluation (if it ran at
    the epoch's end), time, throughput, depth, and the mean |gradient| of each stage."""
    loss_sum = _all_reduce(totals.loss_sum.clone(), dist).item()
    correct = _all_reduce(totals.correct.double(), dist).item()
    seen, steps = totals.seen * dist.world, max(1, totals.steps)
    sizes = torch.tensor([sum(p.numel() for p in ps) for ps in groups.values()], dtype=torch.float64)
    grad_mean_abs = (totals.grad_abs.cpu() / (sizes * steps)).tolist()  # the same on every rank: all-reduced grads
    return dict(
        kind="epoch", epoch=epoch + 1, step=state.global_step, lr=lr, train_loss=loss_sum / seen,
        train_error=100.0 * (1.0 - correct / seen), val_loss=result["val_loss"], val_error=result["val_error"],
        test_loss=result["test_loss"], test_error=result["test_error"],
        epoch_time_s=totals.train_time + result["eval_time_s"], train_time_s=totals.train_time,
        img_per_s=seen / max(totals.train_time, 1e-9), mean_depth=totals.depth_sum / steps,
        expected_depth=expected_depth, grad_mean_abs=dict(zip(groups, grad_mean_abs)))


def _error_text(error: Optional[float]) -> str:
    return "-" if error is None else f"{error:.2f}%"


# -- training ------------------------------------------------------------------------------------------------
def train(s: Settings, checkpoint: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run (or continue) a training run; returns the summary written to summary.json."""
    started = time.perf_counter()
    dist, device = setup_processes(s)
    with RunLog(Path(s.output), s, dist, started) as log:  # rank 0 holds the run folder's lock until the end
        return _train(s, checkpoint, dist, device, log)


def _train(s: Settings, checkpoint: Optional[Dict[str, Any]], dist: Dist, device: torch.device,
           log: RunLog) -> Dict[str, Any]:
    """The run itself: data, model, optimizer, the loop, and each epoch's end."""
    cuda, out = device.type == "cuda", log.out
    amp = cuda if s.amp is None else s.amp
    if amp and cuda and not torch.cuda.is_bf16_supported():
        raise TrainError("--amp needs a GPU with bfloat16 (Ampere or newer); pass --no-amp")
    channels_last = cuda if s.channels_last is None else s.channels_last

    # Data
    local_batch = local_batch_size(s, dist)
    data = load_data_everywhere(s, dist, device)
    steps_per_epoch = len(data) // s.batch_size
    eval_every = s.eval_every_steps

    # Model, optimizer, random streams
    raw_model = build_model(s, data.num_classes, dist, device, channels_last)
    gate_sampler = raw_model.gate_sampler
    optimizer = build_optimizer(raw_model, s)
    scheduler = build_scheduler(optimizer, s)
    streams = RandomStreams(s.seed, gate_sampler, device)
    state, totals_state = TrainState(), None
    if checkpoint is not None:
        state, totals_state = resume_from(checkpoint, s, raw_model, optimizer, scheduler, streams)
        _say_resumed(log, checkpoint, s, state)
    log.start_at(state.global_step)
    model, eval_model, no_sync = wrap_model(raw_model, s, dist, device)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if amp else nullcontext
    evaluator = Evaluator(eval_model, raw_model, data, s, dist, device, channels_last, out, local_batch)
    gate_log, groups = GateLog(gate_sampler), stage_groups(raw_model)
    num_blocks, expected_depth = len(raw_model.residual_blocks()), raw_model.expected_depth()
    log.context = dict(world_size=dist.world, device=device.type, num_blocks=num_blocks,
                       expected_depth=expected_depth)
    log.say(f"{s.model} on {s.dataset}: {len(data)} training images, {steps_per_epoch} steps of {s.batch_size} "
            f"per epoch, {dist.world} process(es) on {device}, expected depth {expected_depth:.2f} of "
            f"{num_blocks} blocks; run folder {out}")

    def stop_if_diverged(totals: EpochTotals, epoch: int, with_weights: bool) -> None:
        check_finite(totals.loss_sum, raw_model if with_weights else None, dist, out, s, epoch, state.step,
                     steps_per_epoch)

    def save_checkpoint(totals: EpochTotals) -> None:
        log.flush()
        if dist.main:
            save_state(out / CHECKPOINT_NAME, state.to_checkpoint(
                log.seconds(state), settings=s.to_dict(), world_size=dist.world, totals=totals.to_state(),
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                rng=streams.state()))

    def evaluate_and_record(epoch: int, lr: float) -> None:
        """An evaluation inside the epochs (--eval-every-steps): a line of metrics.jsonl of its own."""
        result = evaluator.evaluate_and_keep_best(state, epoch)
        log.record(dict(kind="eval", epoch=epoch + 1, step=state.global_step,
                        epochs_done=state.global_step / steps_per_epoch, lr=lr, **result))
        log.say(f"step {state.global_step} (epoch {epoch + 1})  val err {_error_text(result['val_error'])}  "
                f"test err {result['test_error']:.2f}%  lr {lr:.3g}  best val @ step {state.best['step']}")

    model.train()
    for epoch in range(state.epoch, s.epochs):
        plan = streams.plan_epoch(data)
        if totals_state:  # the first epoch of a resumed run goes on from the sums saved mid-epoch
            totals, totals_state = EpochTotals.from_state(totals_state, device), None
        else:
            totals = EpochTotals.zeros(len(groups), device)
        lr = optimizer.param_groups[0]["lr"]
        progress = Progress(epoch, s, dist, steps_per_epoch, state.step, totals, num_blocks, expected_depth)
        t0 = time.perf_counter()
        for x, y in data.train_batches(plan, state.step, steps_per_epoch, dist.rank, dist.world, local_batch,
                                       device):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if s.drop_warmup:
                gate_sampler.set_drop_rate_factor(
                    drop_warmup_factor(state.global_step, s.epochs * steps_per_epoch, s.drop_warmup))
            loss_sum, correct, grad_abs = train_step(
                model, optimizer, x, y, gate_sampler=gate_sampler, accum_steps=s.accum_steps, autocast=autocast,
                no_sync=no_sync, grad_groups=groups)
            state.step += 1
            state.global_step += 1
            totals.add_step(loss_sum, correct, grad_abs, len(y), gate_log.depth())
            log.record_gates(state.global_step, gate_log)
            last_step = state.step == steps_per_epoch
            show = state.step % s.log_every == 0 or last_step
            if show:
                stop_if_diverged(totals, epoch, with_weights=False)
            progress.update(totals, lr, show)
            evaluate_now = eval_every and state.global_step % eval_every == 0
            checkpoint_now = (s.checkpoint_every_steps and state.global_step % s.checkpoint_every_steps == 0
                              and not last_step)
            if evaluate_now or checkpoint_now:
                stop_if_diverged(totals, epoch, with_weights=True)  # before anything is saved
                totals.train_time += time.perf_counter() - t0
                if evaluate_now:
                    evaluate_and_record(epoch, lr)
                if checkpoint_now:
                    save_checkpoint(totals)
                t0 = time.perf_counter()
        progress.close()
        totals.train_time += time.perf_counter() - t0

        # Epoch end: the full network is evaluated (each branch scaled by its survival probability), unless the
        # evaluations come every N steps, when the run's last step gets one if it fell between two.
        scheduler.step()
        stop_if_diverged(totals, epoch, with_weights=True)
        result = dict(val_loss=None, val_error=None, test_loss=None, test_error=None, eval_time_s=0.0)
        if not eval_every:
            result = evaluator.evaluate_and_keep_best(state, epoch)
        elif epoch + 1 == s.epochs and state.global_step % eval_every:
            evaluate_and_record(epoch, lr)
        record = epoch_record(epoch, state, lr, totals, result, dist, groups, expected_depth)
        for change in s.lr_changes:  # a --lr given on resume took effect in this epoch
            if change["epoch"] == epoch:
                record["lr_change"] = change
        log.record(record)
        state.epoch, state.step = epoch + 1, 0
        streams.end_epoch()  # so that the checkpoint holds the generators' states for the next epoch's plan
        save_checkpoint(EpochTotals.zeros(len(groups), device))
        log.say(_epoch_line(epoch, s, record, result, state, num_blocks))
        log.summary(state, data, finished=False)

    summary = log.summary(state, data, finished=True)
    if dist.main:
        plot_curves(out / METRICS_NAME, out / CURVES_NAME,
                    title=f"{s.model} on {s.dataset} (p_L = {s.survival_prob}, {s.survival_rule})")
    return summary


def _epoch_line(epoch: int, s: Settings, record: Dict[str, Any], result: Dict[str, Any], state: TrainState,
                num_blocks: int) -> str:
    eval_every = s.eval_every_steps
    errors = "" if eval_every else f"val err {_error_text(result['val_error'])}  test err {result['test_error']:.2f}%  "
    best_at = f"step {state.best['step']}" if eval_every else state.best["epoch"]
    return (f"epoch {epoch + 1}/{s.epochs}  loss {record['train_loss']:.4f}  train err {record['train_error']:.2f}%  "
            f"{errors}lr {record['lr']:.3g}  {record['img_per_s']:.0f} img/s  depth {record['mean_depth']:.1f}/"
            f"{num_blocks}  best val @ {best_at}")


def _say_resumed(log: RunLog, checkpoint: Dict[str, Any], s: Settings, state: TrainState) -> None:
    old_lr = checkpoint["settings"]["lr"]
    if old_lr != s.lr:
        log.say(f"--lr changed from {old_lr} to {s.lr} (recorded in metrics.jsonl and summary.json)")
    log.say(f"resuming {log.out} at epoch {state.epoch + 1}, step {state.step} (global step {state.global_step})")
    if checkpoint["world_size"] != log.dist.world and log.dist.main:
        # Same global batches and gates, but BatchNorm sees other per-process batches: not bit-identical.
        print(f"warning: the run was checkpointed with {checkpoint['world_size']} process(es) and resumes "
              f"with {log.dist.world}; it continues correctly but not bit for bit", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    settings = None
    try:
        settings, checkpoint = resolve_settings(args)
        summary = train(settings, checkpoint)
    except Diverged as e:
        if rank0:
            print(f"{parser.prog}: stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (TrainError, DataError, CheckpointError, RunFolderBusy) as e:
        if rank0:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, a file limit, no permission: the files written before are intact
        if rank0:
            where = f" ({e.filename})" if e.filename else ""
            print(f"{parser.prog}: error: cannot write the run folder{where}: {e.strerror or e}; the files "
                  "written before are intact (continue with --resume once there is room)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if rank0:
            checkpoint_path = settings and Path(settings.output) / CHECKPOINT_NAME
            if checkpoint_path and checkpoint_path.exists():
                status = f"the last checkpoint, {checkpoint_path}, is kept (continue with --resume)"
            else:
                status = "stopped before the first checkpoint: there is nothing to resume"
            print(f"{parser.prog}: interrupted; {status}", file=sys.stderr)
        return 130
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    if rank0:
        test = "-" if summary["test_error"] is None else f"{summary['test_error']:.2f}%"
        at = f"step {summary['best_step']} (epoch {summary['best_epoch']})" if settings.eval_every_steps \
            else f"epoch {summary['best_epoch']}"
        print(f"done: best validation at {at}, test error there {test} "
              f"(accuracy {summary['test_accuracy']:.2f}%), {summary['total_time_s']:.1f} s; "
              f"run folder {settings.output}")
    return 0
