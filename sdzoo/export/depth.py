"""What one trained model buys at each depth: the data a prune ranks and recalibrates on, and the depth sweep.

``sdzoo.prune`` makes a shallower model; this module measures it as it deploys: parameters and FLOPs per
image, test accuracy in PyTorch and in onnxruntime (each depth exported and checked as every export is), and
onnxruntime's latency at batch 1 and 32. ``depth_sweep`` does that for every depth and order of one or more
models (a stochastic-depth model and its constant-depth twin, pruned the same way), ``format_sweep`` prints the
table and ``plot_sweep`` draws accuracy against latency. The data come from the run's own data set and splits
(``run_splits``): the validation split ranks blocks for ``greedy``, the training split recalibrates
BatchNorm, the test split measures.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from sdzoo.files.disk import PathLike, atomic_write
from sdzoo.files.run_folder import SUMMARY_NAME
from sdzoo.training.data import TENSOR_DATASETS, DataError, load_data, normalize
from sdzoo.files.checks import and_list
from sdzoo.export.latency import onnx_latency
from sdzoo.export.onnx_export import eval_mode, export_onnx, ort_session, predict_onnx
from sdzoo.prune import block_names, greedy_removals, prune_blocks, required_blocks

__all__ = ["run_settings", "run_splits", "model_stats", "accuracy", "measure", "describe", "latencies",
           "depth_sweep", "format_sweep", "plot_sweep", "SWEEP_COLUMNS", "PRUNING_NAME"]

ProgressCallback = Optional[Callable[[str], None]]
# The measurements of a pruned model, beside its weights in the folder the export writes (--pruned-dir): its
# model card reports them, never the full model's results.
PRUNING_NAME = "pruning.json"


# -- data ---------------------------------------------------------------------------------------------------
def run_settings(model_source: str) -> Optional[Dict[str, Any]]:
    """The training settings of ``local-dir:PATH`` (or PATH) or ``hf-hub:ORG/NAME`` from its summary.json (the
    data set, its folder and splits), or None where there is none."""
    if model_source.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(model_source[len("hf-hub:"):], SUMMARY_NAME)
        except EntryNotFoundError:
            return None
    else:
        path = Path(model_source[len("local-dir:"):] if model_source.startswith("local-dir:") else model_source)
        path = path / SUMMARY_NAME
        if not path.is_file():
            return None
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8")).get("settings")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a run's summary.json: {e}") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("dataset"), str):
        raise ValueError(f"{path} does not name its data set (settings.dataset)")
    return settings


def run_splits(settings: Mapping[str, Any], mean: Sequence[float], std: Sequence[float],
               data_dir: Optional[str] = None) -> Dict[str, Tuple[Tensor, Tensor]]:
    """The splits of a run's data set as the model's inputs: ``{"train", "val" (where the run held one out),
    "test"}`` -> (images normalised with ``mean`` / ``std``, labels). ``settings`` is a run's (``run_settings``)
    or ``{"dataset": NAME}``; ``data_dir`` overrides the folder the run read. Nothing is downloaded."""
    name = settings.get("dataset")
    if name not in TENSOR_DATASETS:
        raise DataError(f"--dataset must be one of {and_list(TENSOR_DATASETS)} (data sets held in memory) to "
                        f"rank, recalibrate and measure pruned models; got {name!r}")
    kwargs = {k: settings[k] for k in ("val_size", "split_seed", "image_size", "num_classes")
              if settings.get(k) is not None}
    data = load_data(name, data_dir or settings.get("data_dir"), download=False, **kwargs)
    splits = {}
    for split in ("train", "val", "test"):
        part = getattr(data, split, None)
        if part is not None and not (split == "val" and part is data.test):
            splits[split] = (normalize(part.images, mean, std), part.labels)
    return splits


# -- measurements -------------------------------------------------------------------------------------------
def model_stats(model: nn.Module, input_size: Sequence[int]) -> Tuple[int, float]:
    """(parameters, FLOPs per image as torch.utils.flop_counter counts them: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    return sum(p.numel() for p in model.parameters()), float(counter.get_total_flops())


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of the model in eval mode."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            correct += int((model(images[start:start + batch_size]).argmax(1) == labels[start:start + batch_size])
                           .sum())
    return 100.0 * correct / len(images)


def measure(model: nn.Module, test: Tuple[Tensor, Tensor], input_size: Sequence[int], onnx_path: PathLike
            ) -> Dict[str, Any]:
    """``model`` exported to ``onnx_path`` (checked: the full checker, onnxruntime against PyTorch at batch 1,
    3 and 16), then measured (``describe``, without latency)."""
    report = export_onnx(model, onnx_path, input_size=input_size)
    return dict(describe(model, onnx_path, test, input_size, bench_seconds=None),
                max_abs_diff=max(report.max_abs_diff.values()))


def describe(model: nn.Module, onnx_path: PathLike, test: Tuple[Tensor, Tensor], input_size: Sequence[int],
             bench_seconds: Optional[float] = 0.3) -> Dict[str, Any]:
    """The measurements of a model and its checked ONNX file: blocks, parameters, FLOPs per image, test
    accuracy in PyTorch and onnxruntime, and (unless ``bench_seconds`` is None) onnxruntime's latency at batch
    1 and 32."""
    images, labels = test
    params, flops = model_stats(model, input_size)
    ort_logits = predict_onnx(onnx_path, images.numpy())
    row = dict(
        blocks=len(block_names(model)), layers=[len(getattr(model, name)) for name in model.stage_names],
        params=params, mflops=flops / 1e6, acc_torch=accuracy(model, images, labels),
        acc_ort=100.0 * float((ort_logits.argmax(1) == labels.numpy()).mean()))
    if bench_seconds is not None:
        row.update(zip(("ms_b1", "ms_b32"), latencies({0: onnx_path}, input_size, bench_seconds, rounds=1)[0]),
                   threads=torch.get_num_threads())
    return row


def latencies(files: Mapping[Any, PathLike], input_size: Sequence[int], bench_seconds: float = 0.3,
              rounds: int = 3, progress: ProgressCallback = None) -> Dict[Any, Tuple[float, float]]:
    """onnxruntime's latency (ms) at batch 1 and 32 of each file (key -> path): each file timed once per round,
    the files in turn, and the fastest round kept. On a shared machine the load comes and goes; round-robin
    spreads it over every file alike, and the fastest round is the one least disturbed."""
    best: Dict[Any, List[float]] = {key: [math.inf, math.inf] for key in files}
    for round_index in range(rounds):
        if progress is not None:
            progress(f"timing {len(files)} graphs, round {round_index + 1} of {rounds}")
        for key, path in files.items():
            session = ort_session(os.fspath(path), spinning=False)
            for i, batch in enumerate((1, 32)):
                ms = onnx_latency(session, batch, input_size=input_size, min_run_time=bench_seconds)
                best[key][i] = min(best[key][i], ms)
    return {key: (b1, b32) for key, (b1, b32) in best.items()}


def depth_sweep(models: Mapping[str, nn.Module], splits: Mapping[str, Tuple[Tensor, Tensor]],
                orders: Sequence[str] = ("survival", "evenly", "greedy"), depths: Optional[Sequence[int]] = None,
                recalibrate_bn: int = 0, bench_seconds: float = 0.3, rounds: int = 3,
                input_size: Optional[Sequence[int]] = None, progress: ProgressCallback = None) -> List[Dict[str, Any]]:
    """A row for each model (label -> model), order and depth: ``measure`` of the pruned model, with the blocks
    it kept. ``depths`` default to every depth from the first block of each stage to all blocks. The greedy
    order is searched once per model (it is nested: each depth removes one block more). Latency is timed at the
    end (``latencies``), once per ``layers``: two graphs with the same blocks per stage do the same work, and one
    timing keeps load noise out of the comparison of twins."""
    say = progress or (lambda line: None)
    rows: List[Dict[str, Any]] = []
    graphs: Dict[Tuple[int, ...], str] = {}  # layers -> the first ONNX file of that shape
    with tempfile.TemporaryDirectory(prefix="sdzoo-depth-") as tmp:
        for label, model in models.items():
            names = block_names(model)
            model_depths = sorted(set(depths or range(len(required_blocks(model)), len(names) + 1)), reverse=True)
            size = tuple(input_size or model.pretrained_cfg["input_size"])
            greedy = None
            if "greedy" in orders:
                val_images = len(splits['val'][1]) if 'val' in splits else 0
                say(f"{label}: greedy search on the validation split ({val_images} images)")
                greedy, evaluations = greedy_removals(model, splits, down_to=min(model_depths), progress=say)
                say(f"{label}: greedy order {', '.join(greedy)} ({evaluations} evaluations)")
            measured: Dict[Tuple[str, ...], Dict[str, Any]] = {}
            for order in orders:
                for keep in model_depths:
                    if order == "greedy":
                        kept = [n for n in names if n not in greedy[:len(names) - keep]]
                        pruned = prune_blocks(model, None, kept, splits, recalibrate_bn)
                    else:
                        pruned = prune_blocks(model, keep, order, splits, recalibrate_bn)
                    kept = tuple(pruned.pruned_from["kept"])
                    if kept not in measured:  # the same blocks kept by another order: measured once
                        say(f"{label}: {order}, {keep} of {len(names)} blocks: exporting and measuring")
                        path = os.path.join(tmp, f"pruned-{len(os.listdir(tmp))}.onnx")
                        measured[kept] = measure(pruned, splits["test"], size, path)
                        graphs.setdefault(tuple(measured[kept]["layers"]), path)
                    rows.append(dict(model=label, order=order, kept=list(kept), **measured[kept]))
                    say(_row_line(rows[-1]))
        timed = latencies(graphs, size, bench_seconds, rounds, progress=say)
    for row in rows:
        row.update(zip(("ms_b1", "ms_b32"), timed[tuple(row["layers"])]), threads=torch.get_num_threads())
    return rows


SWEEP_COLUMNS = (("model", "model"), ("order", "order"), ("blocks", "blocks kept"), ("params", "parameters"),
                 ("mflops", "MFLOPs / image"), ("acc_torch", "test acc. PyTorch (%)"),
                 ("acc_ort", "test acc. onnxruntime (%)"), ("ms_b1", "ort ms, batch 1"),
                 ("ms_b32", "ort ms, batch 32"))


def _cell(key: str, value: Any) -> str:
    if key == "params":
        return f"{value:,}"
    return f"{value:.2f}" if key in ("acc_torch", "acc_ort", "mflops", "ms_b1", "ms_b32") else str(value)


def _row_line(row: Mapping[str, Any]) -> str:
    return (f"  {row['model']}, {row['order']}, {row['blocks']} blocks: test accuracy {row['acc_torch']:.2f}% "
            f"(onnxruntime {row['acc_ort']:.2f}%), {row['mflops']:.2f} MFLOPs per image")


def format_sweep(rows: Sequence[Mapping[str, Any]], with_kept: bool = True) -> str:
    """The sweep as a Markdown table (with the blocks each row kept, as a last column)."""
    columns = list(SWEEP_COLUMNS) + ([("kept", "the blocks kept")] if with_kept else [])
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "| " + " | ".join("---" if k in ("model", "order", "kept") else "---:" for k, _ in columns) + " |"]
    for row in rows:
        cells = [", ".join(row[k]) if k == "kept" else _cell(k, row[k]) for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Mapping[str, Any]], out_path: PathLike, title: Optional[str] = None) -> None:
    """Accuracy against onnxruntime latency (batch 32 on the left, blocks kept on the right), one line per model
    and order, written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_blocks) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    styles = {"survival": "o-", "evenly": "s--", "greedy": "^:", "names": "x-"}
    for (label, order) in dict.fromkeys((r["model"], r["order"]) for r in rows):
        part = sorted((r for r in rows if r["model"] == label and r["order"] == order), key=lambda r: r["blocks"])
        colour = "C0" if label == next(iter(dict.fromkeys(r["model"] for r in rows))) else "C1"
        style = styles.get(order, "o-")
        ax_ms.plot([r["ms_b32"] for r in part], [r["acc_ort"] for r in part], style, color=colour,
                   label=f"{label}, {order}")
        ax_blocks.plot([r["blocks"] for r in part], [r["acc_ort"] for r in part], style, color=colour,
                       label=f"{label}, {order}")
    ax_ms.set_xlabel("onnxruntime latency, batch 32 (ms)")
    ax_blocks.set_xlabel("residual blocks kept")
    for ax in (ax_ms, ax_blocks):
        ax.set_ylabel("test accuracy, onnxruntime (%)")
        ax.grid(alpha=0.3)
    ax_blocks.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out_path, lambda temp: fig.savefig(temp, format="png"))
    plt.close(fig)
