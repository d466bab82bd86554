"""The training loop: one run of a stochastic-depth ResNet from its ``Settings``, on one process or many.

A step draws the gates once for its whole global batch, so every rank and micro-batch skips the same blocks.
Evaluation runs the full network in fp32. Every parameter decays, BatchNorm's and biases too, and a skipped block
gets a zero gradient, so that weight decay and momentum still move it, as in the authors' code.
Read top to bottom: ``start_run`` builds a ``TrainingRun``; each epoch is ``train_epoch`` then ``end_epoch``.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from sdzoo.files.run_folder import CHECKPOINT_NAME, CURVES_NAME, METRICS_NAME, CheckpointError, RunFolderBusy
from sdzoo.training.data import DataError
from sdzoo.gate import GateSampler
from sdzoo.training.metrics_plot import plot_curves
from sdzoo.training.optimizer import build_optimizer, build_scheduler
from sdzoo.training.processes import (
    Dist, all_reduce, load_data_everywhere, local_batch_size, setup_processes, sync_batchnorm_statistics,
    use_sync_batchnorm, wrap_model)
from sdzoo.training.resume import (
    EpochTotals, RandomStreams, TrainState, lr_change_in, resolve_settings, restore, save_checkpoint, say_resumed)
from sdzoo.training.run_record import (
    GateLog, Progress, RunLog, done_line, epoch_line, epoch_record, error_text, grad_abs_sums, stage_groups)
from sdzoo.training.settings import Settings, TrainError, build_parser
from sdzoo.survival import SurvivalSettings, drop_warmup_factor

__all__ = ["main", "train", "build_optimizer", "build_scheduler", "train_step", "Diverged",
           "Dist", "GateLog", "use_sync_batchnorm"]  # the last three: re-exported from their modules

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class Diverged(TrainError):
    """The loss became NaN or infinite."""


# -- the run's parts -----------------------------------------------------------------------------------------
def create_model(s: Settings, num_classes: int, in_chans: int = 3) -> nn.Module:
    import timm
    # The gate generator is seeded from --seed on every rank, so every rank draws the same gates.
    survival = SurvivalSettings.from_args(dict(vars(s), gate_seed=s.seed))
    return timm.create_model(s.model, num_classes=num_classes, in_chans=in_chans, **survival.as_model_args())


@dataclass
class TrainingRun:
    """Everything a training run holds while it trains; the steps below read it and move it on."""
    s: Settings
    dist: Dist
    device: torch.device
    log: RunLog
    data: Any
    raw_model: nn.Module            # its states are evaluated, saved and restored
    model: nn.Module                # the one that trains: compiled with --compile, in DDP on several processes
    eval_model: nn.Module           # compiled with --compile
    no_sync: Callable               # DDP's no_sync, for all but a step's last micro-batch
    autocast: Callable
    channels_last: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    streams: RandomStreams
    state: TrainState
    gate_log: GateLog
    groups: Dict[str, List[nn.Parameter]]   # parameters by stage, for the gradient metric
    local_batch: int
    steps_per_epoch: int
    num_blocks: int
    expected_depth: float


def start_run(s: Settings, checkpoint: Optional[Dict[str, Any]], dist: Dist, device: torch.device,
              log: RunLog) -> Tuple[TrainingRun, Optional[Dict[str, Any]]]:
    """The run's parts, restored from ``checkpoint`` on resume, and the sums of the epoch it stopped in."""
    cuda = device.type == "cuda"
    amp = cuda if s.amp is None else s.amp
    if amp and cuda and not torch.cuda.is_bf16_supported():
        raise TrainError("--amp needs a GPU with bfloat16 (Ampere or newer); pass --no-amp")
    channels_last = cuda if s.channels_last is None else s.channels_last
    local_batch = local_batch_size(s, dist)
    data = load_data_everywhere(s, dist, device)
    torch.manual_seed(s.seed)
    raw_model = create_model(s, data.num_classes, data.in_chans)
    if use_sync_batchnorm(s, dist, cuda, local_batch // s.accum_steps):
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    raw_model.to(device)
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    optimizer, streams = build_optimizer(raw_model, s), RandomStreams(s.seed, raw_model.gate_sampler, device)
    scheduler = build_scheduler(optimizer, s)
    state, totals_state = TrainState(), None
    if checkpoint is not None:
        state, totals_state = restore(checkpoint, s, raw_model, optimizer, scheduler, streams)
        say_resumed(log, checkpoint, s, state)
    log.start_at(state.global_step)
    model, eval_model, no_sync = wrap_model(raw_model, s, dist, device)
    run = TrainingRun(
        s=s, dist=dist, device=device, log=log, data=data, raw_model=raw_model, model=model, eval_model=eval_model,
        no_sync=no_sync, autocast=partial(torch.autocast, device.type, dtype=torch.bfloat16) if amp else nullcontext,
        channels_last=channels_last, optimizer=optimizer, scheduler=scheduler, streams=streams, state=state,
        gate_log=GateLog(raw_model.gate_sampler), groups=stage_groups(raw_model), local_batch=local_batch,
        steps_per_epoch=len(data) // s.batch_size, num_blocks=len(raw_model.residual_blocks()),
        expected_depth=raw_model.expected_depth())
    log.describe_run(len(data), run.steps_per_epoch, device, run.num_blocks, run.expected_depth)
    return run, totals_state


# -- one step and one evaluation -----------------------------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
               gate_sampler: GateSampler, accum_steps: int = 1, autocast=nullcontext, no_sync=nullcontext,
               grad_groups: Optional[Dict[str, List[nn.Parameter]]] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One optimizer step on this process's part of the global batch: the summed loss, the correct predictions
    and, with ``grad_groups``, each group's summed |gradient| (on the device, no sync). The micro-batches share
    one draw of the gates: the whole mini-batch keeps or skips a block, as in the paper."""
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
    """(mean loss, error %) of a split, each rank evaluating its part. Always fp32, as the authors evaluated:
    bf16 logits can flip borderline predictions and so the reported error."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in data.eval_batches(split, dist.rank, dist.world, batch_size, device):
        logits = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float()
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    model.train()
    loss_sum, correct, count = all_reduce(totals, dist).tolist()
    return loss_sum / count, 100.0 * (1.0 - correct / count)


def evaluate_and_keep_best(run: TrainingRun, epoch: int) -> Dict[str, Any]:
    """Validation and test of the weights now, with rank 0's BatchNorm statistics. The weights of the lowest
    validation error so far (the latest, without a validation set) go to the run folder."""
    started, state, data = time.perf_counter(), run.state, run.data
    sync_batchnorm_statistics(run.raw_model, run.dist)
    how = (run.dist, run.s.eval_batch_size or max(256, 2 * run.local_batch), run.device, run.channels_last)
    val_loss, val_error = evaluate(run.eval_model, data, "val", *how) if data.val is not None else (None, None)
    test_loss, test_error = (val_loss, val_error) if data.test_is_val else evaluate(run.eval_model, data, "test", *how)
    best = state.best["val_error"]
    if val_error is None or best is None or val_error < best:
        state.best = dict(epoch=epoch + 1, step=state.global_step, val_error=val_error, test_error=test_error)
        run.log.save_best(run.raw_model, data)
    return dict(val_loss=val_loss, val_error=val_error, test_loss=test_loss, test_error=test_error,
                eval_time_s=time.perf_counter() - started)


def stop_if_diverged(run: TrainingRun, totals: EpochTotals, epoch: int, with_weights: bool) -> None:
    """``Diverged`` when the epoch's loss sum (so any step's loss) or, ``with_weights`` (before anything is
    saved), a weight or statistic became NaN or infinite on any rank."""
    bad = torch.zeros(2, device=totals.loss_sum.device)
    bad[0] = (~torch.isfinite(totals.loss_sum)).float()
    if with_weights:
        tensors = [t for t in run.raw_model.state_dict().values() if t.is_floating_point()]
        bad[1] = (~torch.stack([torch.isfinite(t).all() for t in tensors])).any().float()
    loss_bad, state_bad = all_reduce(bad, run.dist, torch_dist.ReduceOp.MAX).tolist()
    if not (loss_bad or state_bad):
        return
    out, what = run.log.out, "the training loss" if loss_bad else "the weights or BatchNorm statistics"
    if (out / CHECKPOINT_NAME).exists():
        advice = (f"the last good checkpoint, {out / CHECKPOINT_NAME}, is kept. Continue from it with a lower "
                  f"learning rate: --resume {out} --lr {run.s.lr / 10:g}; or check the data")
    else:
        advice = "no checkpoint had been written yet. Start again with a lower --lr (into a new --output), or " \
                 "check the data"
    raise Diverged(f"{what} became NaN or infinite in epoch {epoch + 1} (by step {run.state.step} of "
                   f"{run.steps_per_epoch}); training stopped and {advice}")


def save_run_checkpoint(run: TrainingRun, totals: EpochTotals) -> None:
    """checkpoint.pt at this step (rank 0 writes it), the gates recorded so far flushed first."""
    run.log.flush()
    if run.dist.main:
        save_checkpoint(run.log.out, run.state, elapsed=run.log.seconds(run.state), settings=run.s,
                        world_size=run.dist.world, totals=totals, model=run.raw_model, optimizer=run.optimizer,
                        scheduler=run.scheduler, streams=run.streams)


def evaluate_and_record(run: TrainingRun, epoch: int, lr: float) -> None:
    """An evaluation inside the epochs (--eval-every-steps): a line of metrics.jsonl of its own."""
    state = run.state
    result = evaluate_and_keep_best(run, epoch)
    run.log.record(dict(kind="eval", epoch=epoch + 1, step=state.global_step,
                        epochs_done=state.global_step / run.steps_per_epoch, lr=lr, **result))
    run.log.say(f"step {state.global_step} (epoch {epoch + 1})  val err {error_text(result['val_error'])}  "
                f"test err {result['test_error']:.2f}%  lr {lr:.3g}  best val @ step {state.best['step']}")


def train_one_step(run: TrainingRun, x: Tensor, y: Tensor, totals: EpochTotals) -> None:
    """One optimizer step on this batch, added to the epoch's sums (and the gates file)."""
    s, state = run.s, run.state
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if s.drop_warmup:
        run.raw_model.gate_sampler.set_drop_rate_factor(
            drop_warmup_factor(state.global_step, s.epochs * run.steps_per_epoch, s.drop_warmup))
    loss_sum, correct, grad_abs = train_step(
        run.model, run.optimizer, x, y, gate_sampler=run.raw_model.gate_sampler, accum_steps=s.accum_steps,
        autocast=run.autocast, no_sync=run.no_sync, grad_groups=run.groups)
    state.step += 1
    state.global_step += 1
    totals.add_step(loss_sum, correct, grad_abs, len(y), run.gate_log.depth())
    run.log.record_gates(state.global_step, run.gate_log)


def train_epoch(run: TrainingRun, epoch: int, plan, totals: EpochTotals) -> float:
    """The epoch's steps from where it stands, with the evaluations and checkpoints that fall inside it.
    Returns the epoch's lr."""
    s, state, steps = run.s, run.state, run.steps_per_epoch
    lr = run.optimizer.param_groups[0]["lr"]
    progress = Progress(epoch, s, run.dist, steps, state.step, totals, run.num_blocks, run.expected_depth)
    t0 = time.perf_counter()
    for x, y in run.data.train_batches(plan, state.step, steps, run.dist.rank, run.dist.world, run.local_batch,
                                       run.device):
        train_one_step(run, x, y, totals)
        last_step = state.step == steps
        show = state.step % s.log_every == 0 or last_step
        if show:
            stop_if_diverged(run, totals, epoch, with_weights=False)
        progress.update(totals, lr, show)
        evaluate_now = s.eval_every_steps and state.global_step % s.eval_every_steps == 0
        checkpoint_now = (s.checkpoint_every_steps and state.global_step % s.checkpoint_every_steps == 0
                          and not last_step)
        if evaluate_now or checkpoint_now:
            stop_if_diverged(run, totals, epoch, with_weights=True)  # before anything is saved
            totals.train_time += time.perf_counter() - t0  # the epoch's training time leaves these out
            if evaluate_now:
                evaluate_and_record(run, epoch, lr)
            if checkpoint_now:
                save_run_checkpoint(run, totals)
            t0 = time.perf_counter()
    progress.close()
    totals.train_time += time.perf_counter() - t0
    return lr


def end_epoch(run: TrainingRun, epoch: int, totals: EpochTotals, lr: float) -> None:
    """The lr schedule's step; the epoch's evaluation (or, with evaluations every N steps, one after the run's
    last step if it fell between two); the epoch's record, the checkpoint and summary.json."""
    s, state, eval_every = run.s, run.state, run.s.eval_every_steps
    run.scheduler.step()
    stop_if_diverged(run, totals, epoch, with_weights=True)
    result = dict(val_loss=None, val_error=None, test_loss=None, test_error=None, eval_time_s=0.0)
    if not eval_every:
        result = evaluate_and_keep_best(run, epoch)
    elif epoch + 1 == s.epochs and state.global_step % eval_every:
        evaluate_and_record(run, epoch, lr)
    record = epoch_record(epoch, state, lr, totals, result, run.dist, run.groups, run.expected_depth)
    change = lr_change_in(s, epoch)  # a --lr given on resume took effect in this epoch
    if change is not None:
        record["lr_change"] = change
    run.log.record(record)
    state.epoch, state.step = epoch + 1, 0
    run.streams.end_epoch()  # so that the checkpoint holds the generators' states for the next epoch's plan
    save_run_checkpoint(run, EpochTotals.zeros(len(run.groups), run.device))
    run.log.say(epoch_line(epoch, s, record, result, state, run.num_blocks))
    run.log.summary(state, run.data, finished=False)


# -- training ------------------------------------------------------------------------------------------------
def train(s: Settings, checkpoint: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run (or continue) a training run; returns the summary written to summary.json."""
    started = time.perf_counter()
    dist, device = setup_processes(s)
    with RunLog(Path(s.output), s, dist, started) as log:  # rank 0 holds the run folder's lock until the end
        run, totals_state = start_run(s, checkpoint, dist, device, log)
        run.model.train()
        for epoch in range(run.state.epoch, s.epochs):
            plan = run.streams.plan_epoch(run.data)
            if totals_state:  # the first epoch of a resumed run goes on from the sums saved mid-epoch
                totals, totals_state = EpochTotals.from_state(totals_state, device), None
            else:
                totals = EpochTotals.zeros(len(run.groups), device)
            lr = train_epoch(run, epoch, plan, totals)
            end_epoch(run, epoch, totals, lr)
        summary = log.summary(run.state, run.data, finished=True)
        if dist.main:
            plot_curves(log.out / METRICS_NAME, log.out / CURVES_NAME,
                        title=f"{s.model} on {s.dataset} (p_L = {s.survival_prob}, {s.survival_rule})")
        return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings, code = None, 0
    try:  # the message before the process group goes: destroying it can hang
        try:
            settings, checkpoint = resolve_settings(args)
            message = done_line(train(settings, checkpoint), settings)
        except Diverged as e:
            code, message = EXIT_DIVERGED, f"{parser.prog}: stopped: {e}"
        except (TrainError, DataError, CheckpointError, RunFolderBusy) as e:
            code, message = EXIT_USAGE, f"{parser.prog}: error: {e}"
        except OSError as e:  # disk full, a file limit, no permission: the files written before are intact
            where = f" ({e.filename})" if e.filename else ""
            code, message = EXIT_USAGE, (
                f"{parser.prog}: error: cannot write the run folder{where}: {e.strerror or e}; the files written "
                "before are intact (continue with --resume once there is room)")
        except KeyboardInterrupt:
            checkpoint_path = settings and Path(settings.output) / CHECKPOINT_NAME
            if checkpoint_path and checkpoint_path.exists():
                status = f"the last checkpoint, {checkpoint_path}, is kept (continue with --resume)"
            else:
                status = "stopped before the first checkpoint: there is nothing to resume"
            code, message = EXIT_INTERRUPTED, f"{parser.prog}: interrupted; {status}"
        if os.environ.get("RANK", "0") == "0":
            print(message, file=sys.stderr if code else sys.stdout)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return code
