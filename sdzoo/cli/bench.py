"""Side-by-side benchmark: does stochastic depth save the time it promises?

One architecture, one batch size, one run. Training variants are timed round-robin, one step of each in
turn, so that a noisy shared machine slows them all alike; we report the median step time and its ratio to
constant depth, with the executed FLOPs per image (torch.utils.flop_counter) beside it:

  constant depth          every block runs
  sdzoo batch             the paper's gate: a dropped block is not computed, its parameters get zero gradients
  sdzoo batch, no grads   the same, the skipped parameters' gradients left missing (None): what zero gradients cost
  sdzoo sample            per-sample drop computed on the kept samples only
  timm DropPath           the same per-block rates, as a mask (computes every block)
  torchvision SD batch    torchvision.ops.StochasticDepth(mode="batch"), a mask
  torchvision SD row      torchvision.ops.StochasticDepth(mode="row"), a mask

On a GPU each variant also runs in bf16 with channels_last, with and without torch.compile, and reports its
peak memory. Then inference: PyTorch eager against onnxruntime fp32 and int8 at batch 1 and 32.

    sdzoo bench --model sd_resnet110_cifar --batch-size 128 --json out/benchmark.json
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import onnx
import onnxruntime
import timm

from sdzoo.cli.common import check_output_path
from sdzoo.export import onnx_export
from sdzoo.export.benchmark_variants import (
    CONVERT_VARIANTS, VARIANTS, build_timm_variant, build_variant, flops_per_image)
from sdzoo.export.calibration import digits_images
from sdzoo.files.checks import check_survival_prob
from sdzoo.files.disk import save_json
from sdzoo.fold import fold_survival

NOT_RUN = "not run"
HELP = "time the training step of each stochastic-depth variant, and eager against onnxruntime inference"


# -- measurements ------------------------------------------------------------------------------------
def interleaved_medians(fns: Dict[str, Callable[[], object]], iters: int, warmup: int = 3,
                        sync: Callable[[], None] = lambda: None,
                        progress: Callable[[int], None] = lambda i: None) -> Dict[str, float]:
    """Median ms of each callable, timed round-robin so that machine noise hits them all alike."""
    # Not torch.utils.benchmark.Timer: it times one statement after another, so a burst of load on a shared
    # machine lands on one variant; interleaving spreads it over all and keeps the ratios.
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate: no callable always goes first
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(1000 * (time.perf_counter() - start))
        progress(i)
    return {name: statistics.median(t) for name, t in times.items()}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()  # PyTorch's default: gradients set to None, as in most training loops
    return step


def time_training(models: Dict[str, nn.Module], flops: Dict[str, float], x, y, args, amp: bool = False,
                  **common) -> List[Dict]:
    """One row per model, each ratio against the first model: the median training step, the executed FLOPs per
    image (``flops``, where counted) and, on a GPU, the peak memory."""
    steppers = {name: make_step(m, x, y, amp) for name, m in models.items()}
    cuda = x.device.type == "cuda"
    peak = {}
    if cuda:  # one variant at a time, since the peak is per process
        for name, step in steppers.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(x.device)
            for _ in range(max(2, args.warmup)):
                step()
            torch.cuda.synchronize(x.device)
            peak[name] = torch.cuda.max_memory_allocated(x.device) / 2**30

    def sync():
        if cuda:
            torch.cuda.synchronize(x.device)

    def progress(i):
        print(f"  step {i + 1}/{args.steps}", end="\r", file=sys.stderr, flush=True)

    ms = interleaved_medians(steppers, args.steps, args.warmup, sync, progress)
    print(file=sys.stderr)
    base = next(iter(models))

    def ratio(values, variant):
        return values[variant] / values[base] if variant in values else None
    return [dict(common, variant=v, step_ms=ms[v], img_per_s=x.shape[0] / (ms[v] / 1000), time_ratio=ratio(ms, v),
                 gflops_per_img=flops[v] / 1e9 if v in flops else None, flop_ratio=ratio(flops, v),
                 peak_mem_gib=peak.get(v), mem_ratio=ratio(peak, v)) for v in models]


def training_benchmark(args, device: torch.device, amp: bool, channels_last: bool, compile_model: bool):
    label = f"{device.type}{' bf16' if amp else ''}{' channels_last' if channels_last else ''}" \
            f"{' compile' if compile_model else ''}"
    print(f"training: {label}", file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, *timm.create_model(args.model).pretrained_cfg["input_size"], generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    x = x.to(device).contiguous(memory_format=memory_format)
    models, flops = {}, {}
    flop_batch = min(32, args.batch_size)  # per-image FLOPs do not depend on it; the CPU time does
    for variant in args.variants:
        model = build_variant(args.model, variant, args.survival_prob, args.seed).train()
        if not compile_model:  # FLOPs are the same compiled or not; count them once, eagerly
            flops[variant] = flops_per_image(model, x[:flop_batch], y[:flop_batch], args.flop_steps)
        model = model.to(device, memory_format=memory_format)
        models[variant] = torch.compile(model) if compile_model else model
    return time_training(models, flops, x, y, args, amp, setting=label)


def convert_benchmark(args) -> List[Dict]:
    """Training step time and executed FLOPs of timm's mask against sdzoo sample and batch, per model and rate,
    all variants of a model and rate timed round-robin in one run."""
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch_size,))
    rows = []
    for name in args.convert:
        for rate in args.drop_path_rate:
            print(f"{name}, drop_path_rate {rate}", file=sys.stderr)
            build = partial(build_timm_variant, name, rate=rate, img_size=args.img_size, seed=args.seed,
                            uniform=args.uniform_rate)
            # counted from shapes on the meta device: no compute
            flops = {v: flops_per_image(build(v, device="meta"), x.to("meta"), y.to("meta"), args.flop_steps)
                     for v in CONVERT_VARIANTS}
            rows += time_training({v: build(v) for v in CONVERT_VARIANTS}, flops, x, y, args, model=name, rate=rate)
    return rows


def inference_benchmark(args) -> List[Dict]:
    """Folded model: PyTorch eager vs onnxruntime fp32 vs int8 (CPU), batch 1 and 32, and the folded ONNX
    against the same architecture built without stochastic depth (deployment should cost nothing extra)."""
    print("inference: eager vs onnxruntime", file=sys.stderr)
    torch.manual_seed(args.seed)
    model = fold_survival(timm.create_model(args.model, survival_prob=args.survival_prob)).eval()
    plain = timm.create_model(args.model, gate_mode="off").eval()
    plain.load_state_dict(model.state_dict())  # same weights: only the architecture's build differs
    cfg = model.pretrained_cfg
    images, _ = digits_images(cfg["input_size"], cfg["mean"], cfg["std"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("ort_fp32", "ort_int8", "ort_plain_fp32")}
        # Untrained deep ResNets have huge logits (the residual stream grows block by block): check relatively.
        onnx_export.export_onnx(model, paths["ort_fp32"], rtol=1e-5)
        onnx_export.export_onnx(plain, paths["ort_plain_fp32"], rtol=1e-5)
        onnx_export.quantize_int8(paths["ort_fp32"], paths["ort_int8"], images[:256], images[256:512])
        identical = onnx.load(str(paths["ort_fp32"])).graph == onnx.load(str(paths["ort_plain_fp32"])).graph
        print(f"  folded graph identical to the plain ResNet's (same weights): {identical}", file=sys.stderr)
        # The same threads as PyTorch (a fair comparison), and no spinning: timings are interleaved.
        sessions = {name: onnx_export.ort_session(str(path), spinning=False) for name, path in paths.items()}
        for batch in (1, 32):
            x = torch.randn(batch, *cfg["input_size"])
            feed = {onnx_export.INPUT_NAME: x.numpy()}
            fns = {name: partial(session.run, None, feed) for name, session in sessions.items()}
            with torch.inference_mode():
                fns["torch_eager"] = partial(model, x)
                ms = interleaved_medians(fns, args.infer_iters)
            rows.append(dict(batch=batch, **{f"{name}_ms": t for name, t in ms.items()},
                             fp32_speedup=ms["torch_eager"] / ms["ort_fp32"],
                             int8_speedup=ms["torch_eager"] / ms["ort_int8"],
                             folded_vs_plain=ms["ort_fp32"] / ms["ort_plain_fp32"], graph_identical=identical))
    return rows


# -- report --------------------------------------------------------------------------------------------
# Each table's columns: header, row key, format ("{}": a left-aligned text column).
TRAINING_COLUMNS = [
    ("setting", "setting", "{}"), ("variant", "variant", "{}"), ("step ms", "step_ms", "{:.1f}"),
    ("img/s", "img_per_s", "{:.0f}"), ("time vs constant", "time_ratio", "{:.3f}"),
    ("GFLOP/img", "gflops_per_img", "{:.3f}"), ("FLOPs vs constant", "flop_ratio", "{:.3f}"),
    ("peak GiB", "peak_mem_gib", "{:.2f}"), ("memory vs constant", "mem_ratio", "{:.3f}")]
INFERENCE_COLUMNS = [
    ("batch", "batch", "{:d}"), ("PyTorch eager ms", "torch_eager_ms", "{:.2f}"),
    ("onnxruntime fp32 ms", "ort_fp32_ms", "{:.2f}"), ("onnxruntime int8 ms", "ort_int8_ms", "{:.2f}"),
    ("fp32 speed-up", "fp32_speedup", "{:.2f}x"), ("int8 speed-up", "int8_speedup", "{:.2f}x"),
    ("plain ResNet fp32 ms", "ort_plain_fp32_ms", "{:.2f}"), ("folded vs plain", "folded_vs_plain", "{:.3f}")]
CONVERT_COLUMNS = [
    ("model", "model", "{}"), ("drop_path_rate", "rate", "{:g}"), ("variant", "variant", "{}"),
    ("step ms", "step_ms", "{:.1f}"), ("time vs mask", "time_ratio", "{:.3f}"),
    ("GFLOP/img", "gflops_per_img", "{:.3f}"), ("FLOPs vs mask", "flop_ratio", "{:.3f}")]


def markdown_table(columns, rows: List[Dict]) -> str:
    """A value of None was not measured ("not run"); a key the row lacks is an empty cell."""
    def cell(row, key, spec):
        if key not in row:
            return ""
        return NOT_RUN if row[key] is None else spec.format(row[key])
    lines = [[header for header, _, _ in columns], ["---" if spec == "{}" else "---:" for _, _, spec in columns]]
    lines += [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def machine() -> Dict[str, str]:
    info = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                sdzoo=importlib.metadata.version("sdzoo"), cpu=platform.processor() or platform.machine(),
                cpu_count=str(os.cpu_count()), torch_threads=str(torch.get_num_threads()))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd_resnet110_cifar", help="registered sdzoo model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default: %(default)s)")
    p.add_argument("--flop-steps", type=int, default=20,
                   help="steps averaged for executed FLOPs per image (default: %(default)s)")
    p.add_argument("--survival-prob", type=float, default=0.5, help="p_L for every variant (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, metavar="VARIANT",
                   help=f"training variants to run (default: all of {VARIANTS})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the CPU, and the GPU too when one is present (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows on GPU")
    p.add_argument("--channels-last", action="store_true",
                   help="also time the CPU rows with channels_last inputs and weights (the GPU rows always are)")
    p.add_argument("--skip-inference", action="store_true", help="skip the eager vs onnxruntime table")
    p.add_argument("--skip-training", action="store_true", help="skip the training table")
    p.add_argument("--infer-iters", type=int, default=30, help="timed iterations per latency (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    g = p.add_argument_group("a real skip for timm's drop-path models")
    g.add_argument("--convert", metavar="MODEL", nargs="+", default=None,
                   help="timm models built with drop_path_rate: timm's DropPath mask against "
                        "sdzoo.convert_drop_path sample and batch (uses --batch-size, --steps, --warmup, --flop-steps)")
    g.add_argument("--drop-path-rate", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4], metavar="R",
                   help="timm's drop_path_rate values to compare (default: %(default)s)")
    g.add_argument("--img-size", type=int, default=32, help="image size for --convert (default: %(default)s)")
    g.add_argument("--uniform-rate", action="store_true",
                   help="every branch at the rate R instead of timm's 0-to-R decay (the per-branch break-even)")
    return p


def parse_args(argv=None, prog: Optional[str] = None):
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.convert is not None:
        unknown = [name for name in args.convert if name not in timm.list_models()]
        if unknown:
            p.error(f"--convert takes timm model names (resnet26, convnext_atto, vit_tiny_patch16_224, ...); "
                    f"got {', '.join(map(repr, unknown))}")
        if any(not 0.0 < r < 1.0 for r in args.drop_path_rate):
            p.error(f"--drop-path-rate values must be in (0, 1); got {args.drop_path_rate}")
        if args.img_size < 8:
            p.error(f"--img-size must be at least 8; got {args.img_size}")
    for flag in ("batch_size", "steps", "flop_steps", "infer_iters"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer; got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0; got {args.warmup}")
    try:
        check_survival_prob("--survival-prob", args.survival_prob)
    except ValueError as err:
        p.error(str(err))
    if args.model not in timm.list_models("sd_*"):
        p.error(f"--model must be one of {', '.join(timm.list_models('sd_*'))}; got {args.model!r}")
    # constant depth first: the baseline every ratio is against
    args.variants = ["constant depth", *(v for v in args.variants if v != "constant depth")]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.json is not None:  # before the benchmark runs, not after
        check_output_path(p, "--json", args.json)
    return args


def main(argv=None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    if args.convert is not None:
        rows = convert_benchmark(args)
        rates = "every branch at the rate" if args.uniform_rate else "timm's per-block rates, 0 to the rate"
        print(f"\n## {args.img_size} px, batch {args.batch_size}, CPU, {rates}; median of {args.steps} steps after "
              f"{args.warmup} warm-up, FLOPs averaged over {args.flop_steps} steps\n")
        print(markdown_table(CONVERT_COLUMNS, rows))
        payload = dict(convert=args.convert, img_size=args.img_size, batch_size=args.batch_size,
                       uniform_rate=args.uniform_rate, rows=rows)
    else:
        payload = dict(model=args.model, batch_size=args.batch_size, survival_prob=args.survival_prob,
                       steps=args.steps, warmup=args.warmup, training=[], inference=[])
        use_gpu = args.device in ("auto", "cuda") and torch.cuda.is_available() and not args.skip_training
        if args.device in ("auto", "cpu") and not args.skip_training:
            for channels_last in (False, True) if args.channels_last else (False,):
                payload["training"] += training_benchmark(args, torch.device("cpu"), amp=False,
                                                          channels_last=channels_last, compile_model=False)
        if use_gpu:
            torch.backends.cudnn.benchmark = True
            for compile_model in (False,) if args.no_compile else (False, True):
                payload["training"] += training_benchmark(args, torch.device("cuda"), amp=True, channels_last=True,
                                                          compile_model=compile_model)
        elif not args.skip_training:
            payload["training"] += [dict(setting=setting, variant="every variant", step_ms=None)
                                    for setting in ("cuda bf16 channels_last", "cuda bf16 channels_last compile")]
        if not args.skip_inference:
            payload["inference"] = inference_benchmark(args)
        if payload["training"]:
            print(f"\n## Training step: {args.model}, batch {args.batch_size}, p_L = {args.survival_prob}, "
                  f"median of {args.steps} steps after {args.warmup} warm-up\n")
            print(markdown_table(TRAINING_COLUMNS, payload["training"]))
            if not use_gpu:
                print("\nNo GPU on this machine: the GPU rows were not run.")
        if payload["inference"]:
            identical = "yes" if payload["inference"][0]["graph_identical"] else "NO"
            print(f"\n## Inference (folded {args.model}, CPU, onnxruntime {onnxruntime.__version__})\n\n"
                  f"Folded ONNX graph identical to the same architecture built without stochastic depth: {identical}\n")
            print(markdown_table(INFERENCE_COLUMNS, payload["inference"]))
    payload["machine"] = machine()
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in payload["machine"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        save_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
