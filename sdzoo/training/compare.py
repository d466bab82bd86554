"""Train the same network with stochastic depth and at constant depth (--gate-mode off) for each seed, so each
pair starts from the same weights and sees the same data, and compare them. Each run is a run folder
SETTING-seedN in OUTPUT, trained in a process of its own (log: SETTING-seedN.log); started again with the same
command, it continues where it stopped. Flags it does not know go to every training run (see sdzoo train
--help). It writes results.json (per run and per setting: test error at the best validation epoch, that epoch,
times, images/s), results.md (a table beside the paper's CIFAR-10 figures) and compare.png (test error against
epoch, the paper's figure 3, and the first stage's mean |gradient|, its figure 7).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from sdzoo.files.checks import check_output_path
from sdzoo.files.disk import atomic_write, save_json, write_text
from sdzoo.files.run_folder import CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME
from sdzoo.training.metrics_plot import epoch_axis, epoch_records, evaluations, read_metrics
from sdzoo.training.recipes import PAPER_RESULTS
from sdzoo.training.settings import DEFINING_SETTINGS, build_parser, given_flags

__all__ = ["SETTINGS", "PAPER_CIFAR10", "Job", "plan_jobs", "run_jobs", "collect", "write_results", "main"]

RESULTS_NAME, TABLE_NAME, FIGURE_NAME = "results.json", "results.md", "compare.png"

# The two settings compared: the trainer's flags that make each, and their names in the table.
SETTINGS: Dict[str, List[str]] = {"constant_depth": ["--gate-mode", "off"], "stochastic_depth": []}
LABELS = {"constant_depth": "constant depth", "stochastic_depth": "stochastic depth"}

# Huang et al. (2016), ResNet-110 on CIFAR-10+ (500 epochs): test error (%) and training time (table 1).
_PAPER_ROW = PAPER_RESULTS[("sd_resnet110_cifar", "cifar10")][0]
PAPER_CIFAR10 = dict(setting=_PAPER_ROW[0], constant_depth=dict(test_error=_PAPER_ROW[1], train_time="20h42m"),
                     stochastic_depth=dict(test_error=_PAPER_ROW[2], train_time="15h7m"),
                     time_ratio=(15 * 60 + 7) / (20 * 60 + 42))

# Flags the comparison sets itself; the others pass through to every run.
OWN_FLAGS = ("--output", "--resume", "--seed", "--gate-mode", "--threads", "--device", "--quiet")
POLL_S = 5.0  # how often the runs' progress is read


class CompareError(Exception):
    """A user error (a bad flag, a folder holding another run): reported without a traceback."""


@dataclass(eq=False)  # a job is itself, a key of the running processes
class Job:
    """One training run of the comparison: its trainer arguments, and its state, "new", "resume" or "done"."""
    setting: str
    seed: int
    folder: Path
    argv: List[str]
    state: str

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def log(self) -> Path:
        return self.folder.with_name(self.folder.name + ".log")


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CompareError(f"{path}: not valid JSON ({e})") from None


def _given_defining(train_args: Sequence[str]) -> Dict[str, Any]:
    """The defining settings that ``train_args`` set, as summary.json holds them (the recipe's are its name's)."""
    given = given_flags(build_parser().parse_args(list(train_args)))
    return json.loads(json.dumps({k: v for k, v in given.items() if k in DEFINING_SETTINGS}))


def plan_jobs(output: Path, seeds: Sequence[int], train_args: Sequence[str], device: str,
              threads: Optional[int]) -> List[Job]:
    """A job per setting and seed; a folder holding a run of other settings is refused."""
    how = ["--device", device, "--quiet"] + (["--threads", str(threads)] if threads else [])
    jobs = []
    for seed in seeds:
        for setting, flags in SETTINGS.items():
            folder = output / f"{setting}-seed{seed}"
            argv = [*train_args, *flags, "--seed", str(seed)]
            summary = _read_json(folder / SUMMARY_NAME)
            if summary is not None:
                saved = summary.get("settings") or {}
                differ = [f"{k} {saved.get(k)!r} (asked {v!r})" for k, v in _given_defining(argv).items()
                          if saved.get(k) != v]
                if differ:
                    raise CompareError(f"{folder} holds a run of other settings: {', '.join(differ)}; "
                                       "choose another --output")
            if summary is not None and summary.get("finished"):
                jobs.append(Job(setting, seed, folder, [], "done"))
            elif (folder / CHECKPOINT_NAME).exists():
                jobs.append(Job(setting, seed, folder, ["--resume", str(folder), *how], "resume"))
            else:
                jobs.append(Job(setting, seed, folder, [*argv, "--output", str(folder), *how], "new"))
    return jobs


def _epochs_done(job: Job) -> int:
    try:
        return len(epoch_records(read_metrics(job.folder / METRICS_NAME)))
    except ValueError:  # a line being written
        return -1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_on_sigint() -> None:
    """In a trainer before it starts: SIGINT stops it (keeping its checkpoint) even where the comparison runs
    as a background job, whose children inherit an ignored SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_jobs(jobs: Sequence[Job], parallel: int, threads: Optional[int], say=print) -> List[Job]:
    """Train the jobs not done, ``parallel`` at a time; returns those that failed. On Ctrl-C or SIGTERM the
    trainers are stopped (each keeps its last checkpoint) and KeyboardInterrupt is raised."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    waiting = [job for job in jobs if job.state != "done"]
    running: Dict[Job, subprocess.Popen] = {}
    shown: Dict[Job, int] = {}
    failed: List[Job] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                job = waiting.pop(0)
                job.folder.parent.mkdir(parents=True, exist_ok=True)
                with open(job.log, "a") as log:  # `sdzoo train` by module, so that it is this interpreter's
                    running[job] = subprocess.Popen([sys.executable, "-m", "sdzoo", "train", *job.argv], stdout=log,
                                                    stderr=subprocess.STDOUT, env=env, preexec_fn=_stop_on_sigint)
                say(f"{job.name}: {'continued' if job.state == 'resume' else 'started'} (log {job.log})")
            time.sleep(POLL_S)
            for job in list(running):
                done = _epochs_done(job)
                if done > shown.get(job, 0):
                    shown[job] = done
                    say(f"{job.name}: {done} epochs done")
                code = running[job].poll()
                if code is not None:
                    del running[job]
                    if code:
                        failed.append(job)
                        say(f"{job.name}: the trainer stopped with exit status {code}; see {job.log}")
                    else:
                        say(f"{job.name}: finished")
    except KeyboardInterrupt:
        for process in running.values():
            process.send_signal(signal.SIGINT)  # the trainer keeps its last checkpoint
        for process in running.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed


def _run_result(job: Job) -> Dict[str, Any]:
    summary = _read_json(job.folder / SUMMARY_NAME) or {}
    records = read_metrics(job.folder / METRICS_NAME)
    epochs = epoch_records(records)
    train_time = sum(r["train_time_s"] for r in epochs)
    seen = sum(r["img_per_s"] * r["train_time_s"] for r in epochs)
    # the first stage of residual blocks: the gradient groups run stem, layer1, ..., head
    stages = [[g for name, g in r["grad_mean_abs"].items() if name not in ("stem", "head")] for r in epochs]
    return dict(
        setting=job.setting, seed=job.seed, folder=str(job.folder), finished=bool(summary.get("finished")),
        test_error=summary.get("test_error"), best_epoch=summary.get("best_epoch"),
        best_val_error=summary.get("best_val_error"), epochs=len(epochs), wall_time_s=summary.get("total_time_s"),
        train_time_s=train_time, time_per_epoch_s=train_time / len(epochs) if epochs else None,
        img_per_s=seen / train_time if train_time else None,
        mean_depth=statistics.fmean(r["mean_depth"] for r in epochs) if epochs else None,
        expected_depth=epochs[-1]["expected_depth"] if epochs else None,
        # [epochs done, value]: evaluations fall at epoch ends, or every N steps (--eval-every-steps)
        test_error_curve=[[epoch_axis(r), r["test_error"]] for r in evaluations(records)],
        first_stage_grad_curve=[[r["epoch"], s[0] if s else None] for r, s in zip(epochs, stages)])


def _mean_std(values: List[Optional[float]]) -> Dict[str, Optional[float]]:
    values = [v for v in values if v is not None]
    return dict(mean=statistics.fmean(values) if values else None,
                std=statistics.stdev(values) if len(values) > 1 else None, n=len(values))


def collect(jobs: Sequence[Job], command: str) -> Dict[str, Any]:
    """results.json's content: the runs, and per setting the mean and std of their numbers."""
    runs = [_run_result(job) for job in jobs]
    settings = {setting: {key: _mean_std([r[key] for r in runs if r["setting"] == setting])
                          for key in ("test_error", "best_epoch", "wall_time_s", "time_per_epoch_s", "img_per_s")}
                for setting in SETTINGS}
    sd, cd = (settings[s]["time_per_epoch_s"]["mean"] for s in ("stochastic_depth", "constant_depth"))
    return dict(command=command, runs=runs, settings=settings,
                time_ratio=sd / cd if sd and cd else None, paper=PAPER_CIFAR10)


def _cell(stats: Dict[str, Optional[float]], fmt: str, unit: str = "") -> str:
    if stats["mean"] is None:
        return "-"
    spread = f" ± {stats['std']:{fmt}}" if stats["std"] is not None else ""
    return f"{stats['mean']:{fmt}}{spread}{unit}"


def table(results: Dict[str, Any]) -> str:
    """results.md: mean ± std over the seeds, the paper's beside; then the test error at each evaluation."""
    paper, runs = results["paper"], results["runs"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"| setting | test error (%) | best epoch | training time per epoch | images/s "
             f"| paper: {paper['setting']}, test error (%) | paper: training time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for setting in SETTINGS:
        stats = results["settings"][setting]
        lines.append(f"| {LABELS[setting]} | {_cell(stats['test_error'], '.2f')} | {_cell(stats['best_epoch'], '.1f')} "
                     f"| {_cell(stats['time_per_epoch_s'], '.0f', ' s')} | {_cell(stats['img_per_s'], '.0f')} "
                     f"| {paper[setting]['test_error']:.2f} | {paper[setting]['train_time']} |")
    ratio = results["time_ratio"]
    lines += [f"| time ratio (stochastic / constant) | | | {'-' if ratio is None else f'{ratio:.3f}'} | "
              f"| | {paper['time_ratio']:.3f} |", "",
              "| epoch | " + " | ".join(f"{LABELS[setting]}: test error (%)" for setting in SETTINGS) + " |",
              "| ---: |" + " ---: |" * len(SETTINGS)]
    by_epoch = {setting: {} for setting in SETTINGS}
    for run in runs:
        for epochs_done, error in run["test_error_curve"]:
            by_epoch[run["setting"]].setdefault(epochs_done, []).append(error)
    for point in sorted({p for errors in by_epoch.values() for p in errors}):
        cells = [f"{statistics.fmean(by_epoch[s][point]):.2f}" if point in by_epoch[s] else "-" for s in SETTINGS]
        lines.append(f"| {point:g} | " + " | ".join(cells) + " |")
    unfinished = [r["folder"] for r in runs if not r["finished"]]
    notes = [f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)} per setting; ± is the standard deviation over "
             "them). Test error at the epoch of best validation error; training time without evaluation."]
    if unfinished:
        notes.append(f"Not finished: {', '.join(unfinished)}.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def figure(results: Dict[str, Any], path: Path) -> None:
    """compare.png: test error against epoch for both settings, and the first stage's mean |gradient|."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_grad) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    colours = {"constant_depth": "tab:blue", "stochastic_depth": "tab:red"}
    for run in results["runs"]:
        for ax, curve in ((ax_err, run["test_error_curve"]), (ax_grad, run["first_stage_grad_curve"])):
            if curve:
                ax.plot(*zip(*curve), label=f"{LABELS[run['setting']]}, seed {run['seed']}",
                        color=colours[run["setting"]], alpha=0.8, linewidth=1.2, marker=".")
    ax_err.set(xlabel="epoch", ylabel="test error (%)", title="test error (the paper's figure 3)")
    ax_grad.set(xlabel="epoch", ylabel="mean |gradient|", yscale="log",
                title="first stage's mean gradient magnitude (figure 7)")
    for ax in (ax_err, ax_grad):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no curve yet: no legend
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda temp: fig.savefig(temp, format="png"))
    plt.close(fig)


def write_results(output: Path, jobs: Sequence[Job], command: str) -> Dict[str, Any]:
    results = collect(jobs, command)
    save_json(output / RESULTS_NAME, results)
    write_text(output / TABLE_NAME, table(results))
    figure(results, output / FIGURE_NAME)
    return results


# -- command line --------------------------------------------------------------------------------------------
def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdzoo compare", description=__doc__,
        epilog="example (the CPU recipe, about an hour per pair of runs on 2 cores):\n"
               "  sdzoo compare --output runs/fmnist-compare --seeds 1 --dataset fashion_mnist\n"
               "exit status: 0 done, 1 a run failed, 2 bad usage, 130 interrupted (rerun to continue).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # --seed is the trainer's flag, not short for --seeds
    parser.add_argument("--output", required=True, type=Path,
                        help="folder of the comparison: a run folder per setting and seed, results.json, "
                             "results.md, compare.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], metavar="SEED",
                        help="seeds; each trains both settings (default: 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when there is a GPU (default)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at once (default: one per CPU core on a CPU, each on one thread; one on a GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each run (default: 1 on a CPU)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_compare_parser()
    args, train_args = parser.parse_known_args(argv)
    for flag in OWN_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            parser.error(f"{flag} is set by the comparison for each run; leave it out")
    if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct non-negative integers; got {args.seeds}")
    try:
        check_output_path("--output", args.output, kind="folder")
    except ValueError as err:
        parser.error(str(err))
    for flag, value in (("--jobs", args.jobs), ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive integer; got {value}")
    try:
        build_parser().parse_args(train_args)  # the trainer's own check of the flags passed through
    except SystemExit as e:
        return 2 if e.code else 0

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    threads = args.threads or (None if cuda else 1)
    parallel = args.jobs or (1 if cuda else max(1, min(os.cpu_count() or 1, 2 * len(args.seeds))))
    command = " ".join(["sdzoo compare", *map(str, argv if argv is not None else sys.argv[1:])])
    try:
        jobs = plan_jobs(args.output, args.seeds, train_args, "cuda" if cuda else "cpu", threads)
        todo = [job for job in jobs if job.state != "done"]
        print(f"compare: {len(jobs)} runs in {args.output} ({len(jobs) - len(todo)} done), {parallel} at once"
              + (f", {threads} thread each" if threads else ""))
        failed = run_jobs(jobs, parallel, threads)
    except CompareError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; each run keeps its last checkpoint: run the same command again to "
              "continue", file=sys.stderr)
        return 130
    results = write_results(args.output, jobs, command)
    print(table(results))
    print(f"wrote {args.output / RESULTS_NAME}, {args.output / TABLE_NAME}, {args.output / FIGURE_NAME}")
    if failed:
        print(f"{parser.prog}: error: {len(failed)} run(s) failed: "
              f"{', '.join(str(job.log) for job in failed)}", file=sys.stderr)
        return 1
    return 0
