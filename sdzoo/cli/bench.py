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
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import onnx
import onnxruntime
import timm

# The variants live in sdzoo.export, where the tests build them.
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


# -- training measurements ---------------------------------------------------------------------------
def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()  # PyTorch's default: gradients set to None, as in most training loops
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(models: Dict[str, nn.Module], x, y, steps: int, warmup: int, amp: bool,
                  measure_memory: bool) -> Dict[str, Dict[str, float]]:
    device = x.device
    stepper = {name: make_step(m, x, y, amp) for name, m in models.items()}
    results: Dict[str, Dict[str, float]] = {name: {} for name in models}
    if measure_memory:  # one variant at a time, since the peak is per process
        for name, step in stepper.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(max(2, warmup)):
                step()
            sync(device)
            results[name]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in range(warmup):
        for step in stepper.values():
            step()
    times: Dict[str, List[float]] = {name: [] for name in models}
    for i in range(steps):
        for name, step in stepper.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
        print(f"  step {i + 1}/{steps}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for name in models:
        results[name]["step_ms"] = 1000 * statistics.median(times[name])
        results[name]["img_per_s"] = x.shape[0] / (results[name]["step_ms"] / 1000)
    return results


def training_benchmark(args, device: torch.device, amp: bool, channels_last: bool, compile_model: bool):
    label = f"{device.type}{' bf16' if amp else ''}{' channels_last' if channels_last else ''}" \
            f"{' compile' if compile_model else ''}"
    print(f"training: {label}", file=sys.stderr)
    in_chans, height, width = timm.create_model(args.model).pretrained_cfg["input_size"]
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, in_chans, height, width, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    models, flops = {}, {}
    flop_batch = min(32, args.batch_size)  # per-image FLOPs do not depend on it; the CPU time does
    for variant in args.variants:
        model = build_variant(args.model, variant, args.survival_prob, args.seed).train()
        if not compile_model:  # FLOPs are the same compiled or not; count them once, eagerly
            flops[variant] = flops_per_image(model, x[:flop_batch], y[:flop_batch],
                                             args.flop_steps)
        model = model.to(device, memory_format=memory_format)
        models[variant] = torch.compile(model) if compile_model else model
    results = time_training(models, x, y, args.steps, args.warmup, amp, device.type == "cuda")
    base = results["constant depth"]
    rows = []
    for variant in args.variants:
        r = results[variant]
        rows.append(dict(setting=label, variant=variant, step_ms=r["step_ms"], img_per_s=r["img_per_s"],
                         time_ratio=r["step_ms"] / base["step_ms"],
                         gflops_per_img=flops[variant] / 1e9 if variant in flops else None,
                         peak_mem_gib=r.get("peak_mem_gib"),
                         mem_ratio=(r["peak_mem_gib"] / base["peak_mem_gib"]) if "peak_mem_gib" in r else None))
    if flops:
        for row in rows:
            row["flop_ratio"] = flops[row["variant"]] / flops["constant depth"]
    return rows


# -- inference measurements --------------------------------------------------------------------------
def interleaved_medians(fns: Dict[str, Callable[[], object]], iters: int, warmup: int = 3) -> Dict[str, float]:
    """Median ms of each callable, timed round-robin so that machine noise hits them all alike."""
    # Hand-written, not torch.utils.benchmark.Timer: a Timer measures one statement after another, so a burst
    # of load on a shared machine lands on one variant; interleaving spreads it over all and keeps the ratios.
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate: no callable always goes first
            start = time.perf_counter()
            fns[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


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
        fp32, int8, plain_path = (Path(tmp) / n for n in ("model.onnx", "model.int8.onnx", "plain.onnx"))
        # Untrained deep ResNets have huge logits (the residual stream grows block by block): check relatively.
        onnx_export.export_onnx(model, fp32, rtol=1e-5)
        onnx_export.export_onnx(plain, plain_path, rtol=1e-5)
        onnx_export.quantize_int8(fp32, int8, images[:256], images[256:512])
        identical = onnx.load(str(fp32)).graph == onnx.load(str(plain_path)).graph
        print(f"  folded graph identical to the plain ResNet's (same weights): {identical}", file=sys.stderr)
        # The same threads as PyTorch (a fair comparison), and no spinning: timings are interleaved.
        sessions = {name: onnx_export.ort_session(str(path), spinning=False)
                    for name, path in
                    (("ort_fp32", fp32), ("ort_int8", int8), ("ort_plain_fp32", plain_path))}
        for batch in (1, 32):
            x = torch.randn(batch, *cfg["input_size"])
            feed = {onnx_export.INPUT_NAME: x.numpy()}
            fns = {name: (lambda s=session, f=feed: s.run(None, f)) for name, session in sessions.items()}
            with torch.inference_mode():
                fns["torch_eager"] = lambda x=x: model(x)
                ms = interleaved_medians(fns, args.infer_iters)
            rows.append(dict(batch=batch, torch_eager_ms=ms["torch_eager"], ort_fp32_ms=ms["ort_fp32"],
                             ort_int8_ms=ms["ort_int8"], ort_plain_fp32_ms=ms["ort_plain_fp32"],
                             fp32_speedup=ms["torch_eager"] / ms["ort_fp32"],
                             int8_speedup=ms["torch_eager"] / ms["ort_int8"],
                             folded_vs_plain=ms["ort_fp32"] / ms["ort_plain_fp32"], graph_identical=identical))
    return rows


# -- report --------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return NOT_RUN if value is None else format(value, spec)


def format_training(rows: List[Dict]) -> str:
    lines = ["| setting | variant | step ms | img/s | time vs constant | GFLOP/img | FLOPs vs constant "
             "| peak GiB | memory vs constant |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("step_ms") is None:
            lines.append(f"| {r['setting']} | {r['variant']} | {NOT_RUN} |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {r['setting']} | {r['variant']} | {r['step_ms']:.1f} | {r['img_per_s']:.0f} "
            f"| {r['time_ratio']:.3f} | {_fmt(r.get('gflops_per_img'), '.3f')} | {_fmt(r.get('flop_ratio'), '.3f')} "
            f"| {_fmt(r.get('peak_mem_gib'), '.2f')} | {_fmt(r.get('mem_ratio'), '.3f')} |")
    return "\n".join(lines)


def format_inference(rows: List[Dict]) -> str:
    lines = ["| batch | PyTorch eager ms | onnxruntime fp32 ms | onnxruntime int8 ms | fp32 speed-up "
             "| int8 speed-up | plain ResNet fp32 ms | folded vs plain |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if rows:
        lines.insert(0, f"Folded ONNX graph identical to the same architecture built without stochastic depth: "
                        f"{'yes' if rows[0]['graph_identical'] else 'NO'}\n")
    for r in rows:
        lines.append(f"| {r['batch']} | {r['torch_eager_ms']:.2f} | {r['ort_fp32_ms']:.2f} | {r['ort_int8_ms']:.2f} "
                     f"| {r['fp32_speedup']:.2f}x | {r['int8_speedup']:.2f}x | {r['ort_plain_fp32_ms']:.2f} "
                     f"| {r['folded_vs_plain']:.3f} |")
    return "\n".join(lines)


def machine() -> Dict[str, str]:
    info = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                sdzoo=importlib.metadata.version("sdzoo"), cpu=platform.processor() or platform.machine(),
                cpu_count=str(os.cpu_count()), torch_threads=str(torch.get_num_threads()))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- a real skip for timm's drop-path models (--convert) -----------------------------------------------
def convert_benchmark(args) -> int:
    """Training step time and executed FLOPs of timm's mask against sdzoo sample and batch, per model and rate,
    all variants of a model and rate timed round-robin in one run."""
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch_size,))
    rows = []
    for name in args.convert:
        for rate in args.drop_path_rate:
            print(f"{name}, drop_path_rate {rate}", file=sys.stderr)
            flops = {}
            for variant in CONVERT_VARIANTS:  # counted from shapes on the meta device: no compute
                model = build_timm_variant(name, variant, rate, args.img_size, args.seed, args.uniform_rate,
                                           device="meta")
                flops[variant] = flops_per_image(model, x.to("meta"), y.to("meta"), args.flop_steps)
            models = {v: build_timm_variant(name, v, rate, args.img_size, args.seed, args.uniform_rate)
                      for v in CONVERT_VARIANTS}
            timed = time_training(models, x, y, args.steps, args.warmup, amp=False, measure_memory=False)
            base = CONVERT_VARIANTS[0]
            for v in CONVERT_VARIANTS:
                rows.append(dict(model=name, rate=rate, variant=v, step_ms=timed[v]["step_ms"],
                                 time_ratio=timed[v]["step_ms"] / timed[base]["step_ms"],
                                 gflops_per_img=flops[v] / 1e9, flop_ratio=flops[v] / flops[base]))
    rates = "every branch at the rate" if args.uniform_rate else "timm's per-block rates, 0 to the rate"
    print(f"\n## {args.img_size} px, batch {args.batch_size}, CPU, {rates}; median of {args.steps} steps after "
          f"{args.warmup} warm-up, FLOPs averaged over {args.flop_steps} steps\n")
    print("| model | drop_path_rate | variant | step ms | time vs mask | GFLOP/img | FLOPs vs mask |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['rate']} | {r['variant']} | {r['step_ms']:.1f} | {r['time_ratio']:.3f} "
              f"| {r['gflops_per_img']:.3f} | {r['flop_ratio']:.3f} |")
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in machine().items()))
    if args.json:
        save_json(args.json, dict(convert=args.convert, img_size=args.img_size, batch_size=args.batch_size,
                                  uniform_rate=args.uniform_rate, machine=machine(), rows=rows))
        print(f"wrote {args.json}")
    return 0


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
    if "constant depth" not in args.variants:
        args.variants = ["constant depth", *args.variants]  # the baseline every ratio is against
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.json is not None:  # before the benchmark runs, not after
        check_output_path(p, "--json", args.json)
    return args


def main(argv=None, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog)
    if args.convert is not None:
        return convert_benchmark(args)
    use_cpu = args.device in ("auto", "cpu")
    use_gpu = args.device in ("auto", "cuda") and torch.cuda.is_available()
    train_rows = []
    if args.skip_training:
        use_cpu = use_gpu = False
    if use_cpu:
        for channels_last in (False, True) if args.channels_last else (False,):
            train_rows += training_benchmark(args, torch.device("cpu"), amp=False, channels_last=channels_last,
                                             compile_model=False)
    if use_gpu:
        cuda = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        train_rows += training_benchmark(args, cuda, amp=True, channels_last=True, compile_model=False)
        if not args.no_compile:
            train_rows += training_benchmark(args, cuda, amp=True, channels_last=True, compile_model=True)
    elif not args.skip_training:
        for setting in ("cuda bf16 channels_last", "cuda bf16 channels_last compile"):
            train_rows.append(dict(setting=setting, variant="every variant", step_ms=None))
    infer_rows = [] if args.skip_inference else inference_benchmark(args)

    info = machine()
    if train_rows:
        print(f"\n## Training step: {args.model}, batch {args.batch_size}, p_L = {args.survival_prob}, "
              f"median of {args.steps} steps after {args.warmup} warm-up\n")
        print(format_training(train_rows))
        if not use_gpu:
            print("\nNo GPU on this machine: the GPU rows were not run.")
    if infer_rows:
        print(f"\n## Inference (folded {args.model}, CPU, onnxruntime {onnxruntime.__version__})\n")
        print(format_inference(infer_rows))
    print("\nMachine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(model=args.model, batch_size=args.batch_size, survival_prob=args.survival_prob,
                       steps=args.steps, warmup=args.warmup, machine=info, training=train_rows,
                       inference=infer_rows)
        save_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0
