"""The record of a training run: what it writes into its run folder besides checkpoint.pt (rank 0 is the one
writer, under the folder's lock), and what it prints."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm import tqdm

from sdzoo.files.disk import remove_stale_temps, save_json
from sdzoo.files.run_folder import (
    CHECKPOINT_NAME, CONFIG_NAME, CURVES_NAME, LOCK_NAME, METRICS_NAME, SUMMARY_NAME, WEIGHTS_NAME, gates_name,
    lock_run_folder, save_model_config, truncate_lines)
from sdzoo.files.weights import save_weights
from sdzoo.gate import GateSampler
from sdzoo.training.metrics_plot import epoch_records, evaluations, read_metrics
from sdzoo.training.processes import Dist, all_reduce
from sdzoo.training.resume import EpochTotals, TrainState
from sdzoo.training.settings import Settings

__all__ = ["RunLog", "Progress", "GateLog", "epoch_record", "epoch_line", "done_line", "error_text", "stage_groups",
           "grad_abs_sums"]


# -- the gradient metric ---------------------------------------------------------------------------------------
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


# -- the gates -----------------------------------------------------------------------------------------------
class GateLog:
    """The gates of the last training step, as the model's gate sampler recorded its last draw."""

    def __init__(self, sampler: GateSampler):
        self.sampler = sampler

    @property
    def last(self) -> Optional[Tuple[list, int]]:
        """The gates of the last step and its batch size; at constant depth (nothing drawn), every block open."""
        if self.sampler.last_draw is None and self.sampler.mode == "off":
            return [None] * len(self.sampler.survival_probs), 1
        return self.sampler.last_draw

    def depth(self) -> float:
        """Blocks that ran in the last step (per sample, averaged, in sample mode); nan before the first draw."""
        if self.last is None:
            return float("nan")
        gates, batch = self.last
        # A batch gate is a bool, or a float holding the inverted scale (0: skipped) under drop-rate warmup.
        return sum(1.0 if g is None else float(g > 0) if g.dim() == 0 else g.numel() / batch for g in gates)

    def line(self) -> str:
        return " ".join("1" if g is None else str(int(g > 0)) if g.dim() == 0 else ",".join(map(str, g.tolist()))
                        for g in self.last[0])


# -- the run folder's logs -------------------------------------------------------------------------------------
class RunLog:
    """The run folder and its logs: the folder's lock (until ``close``), the best weights, metrics.jsonl, the
    gates files (``--record-gates``), summary.json, and the progress lines."""

    def __init__(self, out: Path, s: Settings, dist: Dist, started: float):
        self.out, self.s, self.dist, self.started = out, s, dist, started
        self.metrics = out / METRICS_NAME
        self.speaks = dist.main and not s.quiet
        self.context: Dict[str, Any] = {}  # what summary.json says of the run beside its results
        self.lock = self.gates = None
        # summary.json's counts, kept as records are written: metrics.jsonl is read once, when the run starts
        self.epochs_done, self.evaluations, self.last_test_error = 0, 0, None
        # What this run made: a run refused before it wrote a file takes them away again (``close``).
        self.made_folder = self.made_lock = False
        if dist.main:
            self.made_folder, self.made_lock = not out.exists(), not (out / LOCK_NAME).exists()
            out.mkdir(parents=True, exist_ok=True)
            self.lock = lock_run_folder(out)
            remove_stale_temps(out, [CHECKPOINT_NAME, WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, SUMMARY_NAME,
                                     CURVES_NAME, *(gates_name(rank) for rank in range(dist.world))])

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start_at(self, global_step: int) -> None:
        """Open the logs at ``global_step``: a resumed run drops the lines a killed process wrote after its last
        checkpoint."""
        if self.dist.main:
            truncate_lines(self.metrics, lambda line: json.loads(line)["step"] <= global_step)
            self._count(read_metrics(self.metrics))
        if self.s.record_gates:
            if self.dist.enabled:
                torch_dist.barrier()  # rank 0 made the folder
            gates_path = self.out / gates_name(self.dist.rank)
            truncate_lines(gates_path, lambda line: int(line.split(" ", 1)[0]) <= global_step)
            self.gates = open(gates_path, "a")

    def describe_run(self, images: int, steps_per_epoch: int, device: torch.device, num_blocks: int,
                     expected_depth: float) -> None:
        """The run's opening line, and what summary.json says of the run beside its results."""
        s, world = self.s, self.dist.world
        self.context = dict(world_size=world, device=device.type, num_blocks=num_blocks,
                            expected_depth=expected_depth)
        self.say(f"{s.model} on {s.dataset}: {images} training images, {steps_per_epoch} steps of {s.batch_size} "
                 f"per epoch, {world} process(es) on {device}, expected depth {expected_depth:.2f} of "
                 f"{num_blocks} blocks; run folder {self.out}")

    def _count(self, records: List[Dict[str, Any]]) -> None:
        evals = evaluations(records)
        self.epochs_done += len(epoch_records(records))
        self.evaluations += len(evals)
        if evals:
            self.last_test_error = evals[-1]["test_error"]

    def say(self, message: str) -> None:
        if self.speaks:
            tqdm.write(message)
            sys.stdout.flush()  # seen at once when the output goes to a file

    def record(self, record: Dict[str, Any]) -> None:
        if self.dist.main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            self._count([record])

    def save_best(self, model: nn.Module, data) -> None:
        """The best weights so far, and config.json from the same model, so that they always agree."""
        if self.dist.main:
            save_model_config(self.out / CONFIG_NAME, model, data.data_config(), tag=self.s.dataset,
                              label_names=data.classes)
            save_weights(self.out / WEIGHTS_NAME, model)

    def record_gates(self, global_step: int, gate_log: GateLog) -> None:
        if self.gates is not None:
            self.gates.write(f"{global_step} {gate_log.line()}\n")

    def flush(self) -> None:
        if self.gates is not None:
            self.gates.flush()

    def close(self) -> None:
        # A lock file (and folder) this run made and wrote nothing beside goes: the lock file is unlinked while
        # still held, and the folder removed only if no other process has put a file there since.
        empty = self.lock is not None and self.made_lock and [p.name for p in self.out.iterdir()] == [LOCK_NAME]
        if empty:
            (self.out / LOCK_NAME).unlink()
        for f in (self.gates, self.lock):
            if f is not None:
                f.close()
        self.gates = self.lock = None
        if empty and self.made_folder:
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def seconds(self, state: TrainState) -> float:
        """Seconds the run has taken, over every process that worked on it."""
        return state.elapsed + time.perf_counter() - self.started

    def summary(self, state: TrainState, data, finished: bool) -> Dict[str, Any]:
        """summary.json (rank 0's counts of metrics.jsonl): the paper's number (test error at the evaluation of
        best validation error), the run's time and ``context``."""
        best, every = state.best, self.s.eval_every_steps
        points = f"evaluation (every {every} steps)" if every else "epoch"
        summary = dict(
            finished=finished, epochs_done=self.epochs_done, evaluations=self.evaluations,
            best_epoch=best["epoch"], best_step=best.get("step"), best_val_error=best["val_error"],
            test_error=best["test_error"],
            test_accuracy=None if best["test_error"] is None else 100.0 - best["test_error"],
            selection=(f"{points} of lowest validation error" if best["val_error"] is not None
                       else f"last {points} (no validation set)"),
            test_set="the validation set (no separate test set)" if data.test_is_val else "test",
            last_epoch_test_error=self.last_test_error, total_time_s=self.seconds(state),
            **self.context, lr_changes=list(self.s.lr_changes), settings=self.s.to_dict())
        if self.dist.main:
            save_json(self.out / SUMMARY_NAME, summary)
        return summary


class Progress:
    """The epoch's progress bar (rank 0, unless quiet): loss, lr, images/s and depth over the last window."""

    def __init__(self, epoch: int, s: Settings, dist: Dist, steps: int, done: int, totals: EpochTotals,
                 num_blocks: int, expected_depth: float):
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


# -- an epoch's record -----------------------------------------------------------------------------------------
# Every key of a metrics.jsonl line this trainer writes (epochs, their lr_change, and kind "eval" evaluations):
# publishing keeps only these.
METRICS_KEYS = frozenset((
    "kind", "epoch", "step", "lr", "lr_change", "train_loss", "train_error", "val_loss", "val_error", "test_loss",
    "test_error", "epoch_time_s", "train_time_s", "img_per_s", "mean_depth", "expected_depth", "grad_mean_abs",
    "epochs_done", "eval_time_s"))


def epoch_record(epoch: int, state: TrainState, lr: float, totals: EpochTotals, result: Dict[str, Any],
                 dist: Dist, groups: Dict[str, List[nn.Parameter]], expected_depth: float) -> Dict[str, Any]:
    """The epoch's line of metrics.jsonl: training loss and error over every rank, the evaluation (if it ran at
    the epoch's end), time, throughput, depth, and the mean |gradient| of each stage."""
    loss_sum = all_reduce(totals.loss_sum.clone(), dist).item()
    correct = all_reduce(totals.correct.double(), dist).item()
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


def error_text(error: Optional[float]) -> str:
    return "-" if error is None else f"{error:.2f}%"


def epoch_line(epoch: int, s: Settings, record: Dict[str, Any], result: Dict[str, Any], state: TrainState,
               num_blocks: int) -> str:
    """The line printed at an epoch's end."""
    eval_every = s.eval_every_steps
    errors = "" if eval_every else f"val err {error_text(result['val_error'])}  test err {result['test_error']:.2f}%  "
    best_at = f"step {state.best['step']}" if eval_every else state.best["epoch"]
    return (f"epoch {epoch + 1}/{s.epochs}  loss {record['train_loss']:.4f}  train err {record['train_error']:.2f}%  "
            f"{errors}lr {record['lr']:.3g}  {record['img_per_s']:.0f} img/s  depth {record['mean_depth']:.1f}/"
            f"{num_blocks}  best val @ {best_at}")


def done_line(summary: Dict[str, Any], s: Settings) -> str:
    """The line printed when the run is done: the paper's number, where it was measured, the run's time."""
    at = f"step {summary['best_step']} (epoch {summary['best_epoch']})" if s.eval_every_steps \
        else f"epoch {summary['best_epoch']}"
    return (f"done: best validation at {at}, test error there {error_text(summary['test_error'])} (accuracy "
            f"{summary['test_accuracy']:.2f}%), {summary['total_time_s']:.1f} s; run folder {s.output}")
