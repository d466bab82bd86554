"""What one trained model buys at each depth: prune it to every depth, export and measure each.

    sdzoo depth-sweep --model runs/digits/stochastic_depth --twin runs/digits/constant_depth --output out/depth

A row per model, order and depth: the blocks kept, parameters, FLOPs per image, test accuracy in PyTorch and
onnxruntime (each depth exported and checked), onnxruntime latency at batch 1 and 32. --twin prunes a second
model (the same architecture trained at constant depth) the same way. The data are the run's (summary.json).
Writes OUTPUT/sweep.md, sweep.json and sweep.png; nothing when an argument is wrong (exit 2).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import timm

from sdzoo.cli.common import HUB_PREFIXES, check_output_path, fail, first_paragraph, parse_keeping_parser
from sdzoo.files.checks import check_seconds, error_line
from sdzoo.files.disk import save_json, write_text
from sdzoo.training.data import DataError
from sdzoo.export.depth import depth_sweep, format_sweep, plot_sweep, run_settings, run_splits
from sdzoo.prune import ORDERS, block_names, required_blocks

HELP = "prune one trained model to every depth, export and measure each (accuracy, latency)"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=first_paragraph(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="a run folder (PATH or local-dir:PATH) or hf-hub:ORG/NAME")
    parser.add_argument("--twin", default=None, help="a second run of the same architecture, pruned the same way")
    parser.add_argument("--output", required=True, help="folder for sweep.md, sweep.json and sweep.png")
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS, help="orders to sweep")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="blocks to keep (default: every depth)")
    parser.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                        help="re-estimate BatchNorm statistics on N training images after pruning")
    parser.add_argument("--dataset", default=None, help="data set of a model without a summary.json")
    parser.add_argument("--data-dir", default=None, help="folder of the data set (default: the run's)")
    parser.add_argument("--bench-seconds", type=float, default=0.3, help="seconds of timed runs per latency")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing every graph; the fastest is kept")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch and onnxruntime (default 1)")
    return parser


def load(args: argparse.Namespace, flag: str, source: str):
    name = source if source.startswith(HUB_PREFIXES) else f"local-dir:{source}"
    if name.startswith("local-dir:") and not os.path.isdir(name[len("local-dir:"):]):
        fail(args, f"{flag}: no such run folder {name[len('local-dir:'):]!r}")
    try:
        return timm.create_model(name, pretrained=True).eval(), run_settings(source)
    except Exception as err:  # noqa: BLE001  (sdzoo.files.weights's refusals, missing files, unreadable JSON)
        fail(args, f"{flag} {source}: cannot load it: {error_line(err, 300)}")


def _constant_depth(model) -> bool:
    return model.survival_settings.trained_dict()["gate_mode"] == "off"


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Exit status: 0 the sweep is written, 2 a wrong argument (nothing written)."""
    args = parse_keeping_parser(build_parser(prog), argv)
    for flag, value in (("--threads", args.threads), ("--rounds", args.rounds)):
        if value < 1:
            fail(args, f"{flag} must be a positive integer; got {value}")
    torch.set_num_threads(args.threads)
    try:
        check_seconds("--bench-seconds", args.bench_seconds)
    except ValueError as err:
        fail(args, str(err))
    if args.recalibrate_bn < 0:
        fail(args, f"--recalibrate-bn must be a number of training images >= 0; got {args.recalibrate_bn}")
    out = Path(args.output)
    check_output_path(args.parser, "--output", out, kind="folder")

    model, settings = load(args, "--model", args.model)
    models = {"constant depth" if _constant_depth(model) else "stochastic depth": model}
    if args.twin:
        twin, _ = load(args, "--twin", args.twin)
        if block_names(twin) != block_names(model) or twin.pretrained_cfg.get("architecture") != \
                model.pretrained_cfg.get("architecture"):
            fail(args, f"--twin {args.twin} is not the architecture of --model {args.model}: the twins of a "
                       "comparison are pruned the same way")
        label = "constant depth" if _constant_depth(twin) else "twin"
        models[label if label not in models else f"{label} (twin)"] = twin
    names, required = block_names(model), required_blocks(model)
    bad = [d for d in args.depths or () if not len(required) <= d <= len(names)]
    if bad:
        fail(args, f"--depths must be from {len(required)} (the first block of each stage) to {len(names)}; "
                   f"got {', '.join(map(str, bad))}")
    if settings is None and args.dataset is None:
        fail(args, f"--model {args.model} has no summary.json naming its data set: give --dataset")
    settings = dict(settings or {}, **({"dataset": args.dataset} if args.dataset else {}))
    cfg = model.pretrained_cfg
    try:
        splits = run_splits(settings, cfg["mean"], cfg["std"], data_dir=args.data_dir)
    except (DataError, ValueError) as err:
        fail(args, str(err))
    if "greedy" in args.orders and "val" not in splits:
        fail(args, f"--orders greedy ranks blocks on a validation split, and the run of {args.model} held none "
                   "out (--val-size 0): leave greedy out")
    if args.recalibrate_bn > len(splits["train"][1]):
        fail(args, f"--recalibrate-bn must be at most {len(splits['train'][1])}, the training split; "
                   f"got {args.recalibrate_bn}")

    start = time.perf_counter()
    print(f"depth sweep of {', '.join(models)} on {settings['dataset']} ({len(splits['test'][1])} test images), "
          f"orders {', '.join(args.orders)}, {torch.get_num_threads()} thread(s)", flush=True)
    rows = depth_sweep(models, splits, orders=args.orders, depths=args.depths, recalibrate_bn=args.recalibrate_bn,
                       bench_seconds=args.bench_seconds, rounds=args.rounds,
                       progress=lambda line: print(line, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    table = format_sweep(rows)
    title = f"{cfg.get('architecture')} on {settings['dataset']}" + \
        (f", BatchNorm recalibrated on {args.recalibrate_bn} images" if args.recalibrate_bn else "")
    save_json(out / "sweep.json", dict(model=args.model, twin=args.twin, dataset=settings["dataset"],
                                       recalibrate_bn=args.recalibrate_bn, threads=torch.get_num_threads(),
                                       bench_seconds=args.bench_seconds, rounds=args.rounds, rows=rows))
    write_text(out / "sweep.md", f"{title}\n\n{table}\n")
    plot_sweep(rows, out / "sweep.png", title=title)
    print(f"\n{table}\n\nwrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'sweep.png'} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0
