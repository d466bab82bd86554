"""How much of timm ``sdzoo.convert_drop_path`` reaches: every registered model, built on the meta device with
``drop_path_rate``, converted in each mode, and (with --forward) run for two training steps on fake data: one
with a random draw, one that skips every branch (batch mode) or keeps one sample (sample mode).

    sdzoo coverage --forward --every 5 --time-limit 3600   # every 5th name, at most an hour
    sdzoo coverage --compile --backend aot_eager               # the compile table

Prints, by family (timm's model module), how many models hold a DropPath and how many convert in each mode, each
reason a model was refused (its count and an example) and the conversion times. With --forward a model counts as
converted only when each training forward asks every gate for its draw (a block on timm's masks asks none).
"""
from __future__ import annotations

import argparse
import fnmatch
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.layers import DropPath
from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg
from timm.models.maxxvit import MaxxVit, MaxxVitCfg

from sdzoo.cli.common import check_output_path, first_paragraph
from sdzoo.internals.torch_private import compile_counter, dynamo_counters
from sdzoo.convert import convert_drop_path, inspect_drop_paths, model_input_size
from sdzoo.files.checks import error_line
from sdzoo.files.disk import save_json

MODES = ("batch", "sample")
HELP = "how much of timm sdzoo.convert_drop_path reaches: every model, each mode (and under torch.compile)"


def build(name: str, rate: float):
    """The model on the meta device with drop_path_rate, or None when it takes no drop_path_rate."""
    try:
        return timm.create_model(name, drop_path_rate=rate, device="meta")
    except TypeError:  # a model without drop_path_rate holds no DropPath
        return None


def training_step(model) -> int:
    """One training forward and backward at the model's input size, batch 2, on the meta device; the gates
    it asked for its draw (a converted block that runs timm's masks asks none)."""
    sampler = model.drop_path_sampler
    asked = set()
    gate = type(sampler).gate

    def counting_gate(index, *args, **kwargs):
        asked.add(index)
        return gate(sampler, index, *args, **kwargs)

    sampler.gate = counting_gate  # only the survey's copy of the model: it counts, then draws as before
    try:
        out = model.train()(torch.empty(2, *(model_input_size(model) or (3, 224, 224)), device="meta"))
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().sum().backward()
    finally:
        del sampler.gate
    return len(asked)


def skip_every_branch(model) -> None:
    """From now on each training forward skips every branch (batch mode) or runs each on one sample (sample
    mode): a random draw at a low rate may never reach the skip side, where a conversion can fail (one did,
    for a branch that read a buffer of its block: Swin's shifted windows)."""
    sampler = model.drop_path_sampler

    def draw(batch_size, device=None, step=None):  # in GateSampler.draw's format
        if sampler.mode == "batch":
            return [torch.tensor(0.0 if sampler.scale_in_gate else False)] * len(sampler.survival_probs)
        return [torch.zeros(1, dtype=torch.long, device=device)] * len(sampler.survival_probs)

    sampler.draw = draw  # only the survey's copy of the model: a draw the sampler has no setting for


def never_applied(model) -> bool:
    """Whether timm's own forward calls none of the model's DropPaths (MobileNet-V1 and LCNet blocks have no
    skip): such a model drops nothing in timm either."""
    reports = inspect_drop_paths(model)
    return bool(reports) and all(not r.refused and not r.masks and not any(r.sites.values()) for r in reports)


def survey(names, rate: float, forward: bool, progress, deadline: float = float("inf")) -> dict:
    results = {}
    for i, name in enumerate(names, 1):
        if time.perf_counter() > deadline:
            break
        model = build(name, rate)
        if model is None or not any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules()):
            continue
        record = dict(family=type(model).__module__.replace("timm.models.", ""), seconds={})
        for mode in MODES:
            record[mode] = convert_and_train(model if mode == MODES[0] else build(name, rate), mode, forward,
                                             record["seconds"])
        results[name] = record
        progress(i, len(names), name, record)
    return results


def convert_and_train(model, mode: str, forward: bool, seconds: dict) -> str:
    """'ok', or why the model does not convert in ``mode`` (or, with ``forward``, train); records its seconds."""
    started = time.perf_counter()
    try:
        convert_drop_path(model, mode=mode, min_drop_rate=0.0)
    except ValueError as e:
        if never_applied(model):
            return "never applied: timm's forward calls none of its DropPaths (no residual to skip)"
        return error_line(e, 300)
    except Exception as e:  # noqa: BLE001  (a crash is a bug of the conversion: reported as such)
        return f"crash: {error_line(e, 300)}"
    seconds[mode] = time.perf_counter() - started
    if not forward:
        return "ok"
    gates = len(model.drop_path_sampler.survival_probs)
    try:
        asked = [training_step(model)]
        skip_every_branch(model)
        asked.append(training_step(model))
    except Exception as e:  # noqa: BLE001  (a converted model that fails to train)
        return f"converted, but a training step failed: {error_line(e, 300)}"
    if min(asked) < gates:
        return (f"converted, but a training forward asked {min(asked)} of its {gates} gates (the others ran timm's "
                f"masks)")
    return "ok"


def table(results: dict) -> str:
    families = defaultdict(Counter)
    for record in results.values():
        families[record["family"]].update(models=1, **{mode: record[mode] == "ok" for mode in MODES})
    total = sum(families.values(), Counter())
    idle = sum(r["batch"].startswith("never applied") for r in results.values())
    lines = ["| family | DropPath models | batch | sample |", "| --- | ---: | ---: | ---: |"]
    for family, counts in sorted(families.items(), key=lambda kv: (-kv[1]["models"], kv[0])):
        lines.append(f"| {family} | {counts['models']} | {counts['batch']} | {counts['sample']} |")
    n = total["models"] or 1
    lines.append(f"| **all {len(families)} families** | **{total['models']}** | **{total['batch']} "
                 f"({100 * total['batch'] / n:.1f}%)** | **{total['sample']} ({100 * total['sample'] / n:.1f}%)** |")
    if idle:
        applied = max(total["models"] - idle, 1)
        lines.append(f"| models whose DropPaths timm applies | {total['models'] - idle} | "
                     f"{100 * total['batch'] / applied:.1f}% | {100 * total['sample'] / applied:.1f}% |")
    return "\n".join(lines)


def reasons(results: dict) -> str:
    found = defaultdict(list)
    for name, record in results.items():
        for mode in MODES:
            if record[mode] != "ok":
                found[(mode, record[mode])].append(name)
    lines = [f"- {mode}, {len(names)} model(s), e.g. {names[0]}: {reason}"
             for (mode, reason), names in sorted(found.items(), key=lambda kv: -len(kv[1]))]
    return "\n".join(lines) or "every model converts in both modes"


# -- under torch.compile ---------------------------------------------------------------------------------------------
def tiny_mobilevit():
    """MobileViT's kinds of block, few and narrow, from timm's public ByobNet configuration."""
    # the inverted residual block, as timm's mobilevit.py builds it
    inverted = dict(type="bottle", gs=1, br=2.0, block_kwargs=dict(bottle_in=True, linear_out=True))
    mobilevit = ByoBlockCfg(type="mobilevit", d=1, c=24, s=1,
                            block_kwargs=dict(transformer_dim=32, transformer_depth=2, patch_size=2))
    cfg = ByoModelCfg(blocks=(ByoBlockCfg(d=2, c=16, s=1, **inverted),
                              (ByoBlockCfg(d=1, c=24, s=2, **inverted), mobilevit)),
                      stem_chs=8, stem_type="3x3", stem_pool="", downsample="", act_layer="silu", num_features=32)
    return ByobNet(cfg, num_classes=10, drop_path_rate=0.3)


def tiny_coatnet():
    cfg = MaxxVitCfg(embed_dim=(16, 32, 64, 64), depths=(1, 1, 2, 1), stem_width=16)
    return MaxxVit(cfg, img_size=32, num_classes=10, drop_path_rate=0.3)


# The smallest configurations that keep each family's kinds of block (and its calls: EVA02's rope, PVT-v2's
# feat_size, MobileViT's patches x batch), at a small input: (how it is built, input side).
COMPILE_FAMILIES = {
    "ViT": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, drop_path_rate=0.3), 32),
    "ConvNeXt": (lambda: timm.create_model("convnext_atto", depths=(1, 1, 2, 1), drop_path_rate=0.3), 32),
    "Swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(2, 1),
                                       num_heads=(3, 6), drop_path_rate=0.3), 32),
    "EVA02": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, drop_path_rate=0.3), 28),
    "PVT-v2": (lambda: timm.create_model("pvt_v2_b0", depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2),
                                         drop_path_rate=0.3), 32),
    "MobileViT": (tiny_mobilevit, 16),
    "EfficientNet (tinynet_e)": (lambda: timm.create_model("tinynet_e", drop_path_rate=0.3), 32),
    "CoAtNet": (tiny_coatnet, 32),
}


def compile_row(family: str, mode: str, backend: str, steps: int) -> str:
    """Graphs, breaks and recompiles of ``steps`` compiled training steps, and the seconds to the first one."""
    build_model, side = COMPILE_FAMILIES[family]
    torch.compiler.reset()
    dynamo_counters.clear()
    torch.manual_seed(0)
    model = convert_drop_path(build_model(), mode=mode, min_drop_rate=0.0, input_size=(3, side, side)).train()
    counter = compile_counter(backend)
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(4, 3, side, side)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        compiled(x).sum().backward()
        times.append(time.perf_counter() - started)
    breaks = sum(dynamo_counters["graph_break"].values())
    graphs = counter.frame_count
    recompiles = max(graphs - 1 - breaks, 0)  # a break starts a graph of its own; the rest are recompiles
    gates = len(model.drop_path_sampler.survival_probs)
    # fullgraph=True fails exactly where dynamo breaks the graph
    return (f"| {family} | {mode} | {gates} | {graphs} | {breaks} | {recompiles} | {'yes' if breaks == 0 else 'no'} "
            f"| {times[0]:.1f} | {statistics.median(times[1:]) * 1000:.0f} |")


def compile_table(backend: str, steps: int, deadline: float, pattern: str = "*") -> str:
    lines = [f"| family | mode | gates | graphs | graph breaks | recompiles | fullgraph=True | first step s "
             f"({backend}) | later step ms |", "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for family in [f for f in COMPILE_FAMILIES if fnmatch.fnmatch(f, pattern)]:
        for mode in ("sample", "batch"):
            if time.perf_counter() > deadline:
                lines.append(f"| {family} | {mode} | not measured (--time-limit) | | | | | | |")
                continue
            try:
                lines.append(compile_row(family, mode, backend, steps))
            except Exception as e:  # noqa: BLE001  (a family that fails to compile is a row of the table)
                lines.append(f"| {family} | {mode} | failed: {error_line(e, 300)} | | | | | | |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def conversion_times(results: dict) -> str:
    """Seconds ``convert_drop_path`` took per model, median and worst, in each mode (meta device)."""
    lines = ["| mode | models converted | median s | worst s | worst model |", "| --- | ---: | ---: | ---: | --- |"]
    for mode in MODES:
        times = {name: r["seconds"][mode] for name, r in results.items() if mode in r.get("seconds", {})}
        if times:
            worst = max(times, key=times.get)
            lines.append(f"| {mode} | {len(times)} | {statistics.median(times.values()):.2f} | {times[worst]:.2f} "
                         f"| {worst} |")
    return "Conversion time per model:\n" + "\n".join(lines)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=first_paragraph(__doc__))
    parser.add_argument("--filter", default="*",
                        help="fnmatch pattern of model names (with --compile: of family names; default: all)")
    parser.add_argument("--drop-path-rate", type=float, default=0.1, help="the rate the models are built with")
    parser.add_argument("--forward", action="store_true",
                        help="also run two training steps of each converted model: a random draw, then every branch "
                             "skipped")
    parser.add_argument("--json", type=Path, help="write every model's result to this file")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="a sample: every K-th of the matching names, in timm's order (default 1: all)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no model after this many seconds; the tables cover the models done")
    parser.add_argument("--compile", action="store_true",
                        help="instead: the compile table, 8 families in both modes (graphs, breaks, recompiles, "
                             "time to the first step)")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend of --compile")
    parser.add_argument("--steps", type=int, default=5, help="training steps of each model with --compile")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 0.0 < args.drop_path_rate < 1.0:
        parser.error(f"--drop-path-rate must be in (0, 1); got {args.drop_path_rate}")
    if args.every < 1:
        parser.error(f"--every must be a positive integer; got {args.every}")
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error(f"--time-limit must be a positive number of seconds; got {args.time_limit}")
    if args.compile and args.steps < 2:
        parser.error(f"--steps must be at least 2; got {args.steps}")
    if args.json is not None:  # before the survey, which may take an hour
        check_output_path(parser, "--json", args.json)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    deadline = started + args.time_limit if args.time_limit else float("inf")
    if args.compile:
        print(f"timm {timm.__version__}, torch {torch.__version__}, backend {args.backend}, {args.steps} steps, "
              f"batch 4\n")
        print(compile_table(args.backend, args.steps, deadline, args.filter))
        return 0
    matching = [n for n in timm.list_models() if fnmatch.fnmatch(n, args.filter)]
    if not matching:
        parser.error(f"--filter {args.filter!r} matches no timm model")
    names = matching[::args.every]

    def progress(i, count, name, record):
        if not args.quiet:
            marks = " ".join(f"{m}={'ok' if record[m] == 'ok' else 'no'}" for m in MODES)
            print(f"[{i}/{count}] {name}: {marks}", file=sys.stderr, flush=True)

    results = survey(names, args.drop_path_rate, args.forward, progress, deadline)
    done = names.index(list(results)[-1]) + 1 if results else 0
    sampled = f"every {args.every}th of {len(matching)} names, " if args.every > 1 else ""
    cut = f"; stopped at --time-limit after {done} of {len(names)} names" if done < len(names) and results else ""
    print(f"timm {timm.__version__}, torch {torch.__version__}: {sampled}{len(names)} models{cut}, {len(results)} "
          f"hold a DropPath at drop_path_rate={args.drop_path_rate} ({time.perf_counter() - started:.0f} s"
          f"{', with two training steps each' if args.forward else ''})\n")
    print(table(results))
    print("\nNot converted:\n" + reasons(results))
    print("\n" + conversion_times(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)  # checked writable before the survey
        save_json(args.json, results)
    return 0
