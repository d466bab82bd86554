"""The whole job on the embedded default: scikit-learn's handwritten digits, offline, CPU (or GPU).

Trains a stochastic-depth ResNet-20 and the same network at constant depth, reports their test accuracy, folds
p_l into the weights, exports ONNX checked against PyTorch, and writes the model card and a Hub-ready folder.

    sdzoo demo                                 # into runs/digits (runs/digits-2, ... if taken)
    sdzoo demo --output runs/mine --epochs 10  # scripts/run_digits.py takes the same flags
"""
from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path
from typing import Optional

import timm
import torch

from sdzoo.cli.common import check_output_path
from sdzoo.export import onnx_export
from sdzoo.export.calibration import digits_images
from sdzoo.files.run_folder import ONNX_NAME
from sdzoo.fold import fold_survival
from sdzoo.hub import upload as hub
from sdzoo.training.train import main as train_main

HELP = "the whole job on scikit-learn's digits: train, compare, fold, export, check, write the Hub folder"


def fresh_folder(path: Path) -> Path:
    """A new folder ``path``, or ``path-2``, ...: ``mkdir`` fails on an existing folder, so no earlier run is
    overwritten and two jobs started together never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def train_run(output: Path, extra) -> None:
    code = train_main(["--dataset", "digits", "--output", str(output), *extra])
    if code != 0:
        raise SystemExit(f"sdzoo demo: training into {output} failed (exit {code}); see the message above")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("runs/digits"),
                   help="folder for everything (default: %(default)s; a new -N folder if it exists)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of both runs (default: the digits recipe's)")
    p.add_argument("--seed", type=int, default=1, help="seed of both runs (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when there is a GPU (default)")
    p.add_argument("--repo-id", default="ORG/sd_resnet20_cifar.digits",
                   help="repo id written into the model card of the Hub-ready folder (default: %(default)s)")
    return p


def main(argv=None, prog: Optional[str] = None) -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be a positive integer; got {args.epochs}")
    check_output_path(p, "--output", args.output, kind="folder")
    try:
        hub.check_repo_id(args.repo_id)
    except ValueError as e:
        p.error(f"--repo-id: {e}")
    start = time.perf_counter()
    root = fresh_folder(args.output)
    sd_dir, constant_dir, hub_dir = root / "stochastic_depth", root / "constant_depth", root / "hub"
    common = ["--seed", str(args.seed), "--device", args.device] + \
        (["--epochs", str(args.epochs)] if args.epochs is not None else [])

    print(f"[1/4] training sd_resnet20_cifar with stochastic depth (p_L = 0.5, linear) -> {sd_dir}")
    train_run(sd_dir, common)
    print(f"[1/4] training the same network at constant depth -> {constant_dir}")
    train_run(constant_dir, [*common, "--gate-mode", "off"])

    print("[2/4] folding p_l into the weights and exporting ONNX")
    model, constant = (timm.create_model(f"local-dir:{d}", pretrained=True).eval() for d in (sd_dir, constant_dir))
    cfg = model.pretrained_cfg
    images, labels = digits_images(cfg["input_size"], cfg["mean"], cfg["std"], split="test")
    with torch.no_grad():  # the networks' logits on the test digits, by their row in the table
        logits = {"constant depth (PyTorch)": constant(torch.from_numpy(images)).numpy(),
                  "stochastic depth, p_L = 0.5 (PyTorch)": model(torch.from_numpy(images)).numpy()}
        logits["stochastic depth, folded (PyTorch)"] = fold_survival(model)(torch.from_numpy(images)).numpy()
    onnx_path = sd_dir / ONNX_NAME
    report = onnx_export.export_onnx(model, onnx_path)
    logits["stochastic depth, folded (onnxruntime)"] = onnx_export.predict_onnx(onnx_path, images)
    diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in report.max_abs_diff.items())
    print(f"      onnxruntime vs PyTorch, max abs difference: {diffs}")

    print("[3/4] writing the model card and the Hub-ready folder")
    hub.publish(sd_dir, args.repo_id, local_dir=hub_dir, onnx=onnx_path, curves=sd_dir / "curves.png")

    elapsed = time.perf_counter() - start
    print(f"\n[4/4] done in {elapsed:.0f} s (sdzoo {importlib.metadata.version('sdzoo')}, torch {torch.__version__})\n")
    print(f"Test accuracy on the {len(labels)} held-out digits (sd_resnet20_cifar, "
          f"{cfg['input_size'][1]}x{cfg['input_size'][2]} input):\n| network | test accuracy |\n| --- | ---: |")
    for network, out in logits.items():
        print(f"| {network} | {100.0 * float((out.argmax(1) == labels).mean()):.2f}% |")
    print("\nFiles:")
    for label, path in [
            ("stochastic-depth run (timm local-dir)", sd_dir),
            ("  weights of the best validation epoch", sd_dir / "model.safetensors"),
            ("  per-epoch metrics", sd_dir / "metrics.jsonl"),
            ("  summary", sd_dir / "summary.json"),
            ("  curves", sd_dir / "curves.png"),
            ("  ONNX (folded, verified)", onnx_path),
            ("constant-depth run", constant_dir),
            ("Hub-ready folder", hub_dir),
            ("  model card", hub_dir / "README.md")]:
        print(f"  {label:<40} {path}")
    print(f"\nLoad it back: timm.create_model('local-dir:{sd_dir}', pretrained=True)")
    print(f"Publish it:   sdzoo push --model local-dir:{sd_dir} --repo-id ORG/NAME")
    return 0
