"""What one trained model buys at each depth: ``depth_sweep`` prunes it (and its twin) to every depth and order,
exports each and measures it as it deploys, on the run's own data (``run_splits``)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sdzoo.files.disk import PathLike, atomic_write
from sdzoo.files.run_folder import SUMMARY_NAME
from sdzoo.training.data import TENSOR_DATASETS, DataError, load_data, normalize
from sdzoo.files.checks import and_list
from sdzoo.export.latency import onnx_latency
from sdzoo.export.onnx_export import eval_mode, export_onnx, ort_session, predict_onnx
from sdzoo.prune import block_names, greedy_removals, prune_blocks, required_blocks

__all__ = ["run_settings", "run_splits", "accuracy", "describe", "latencies", "depth_sweep", "format_sweep",
           "plot_sweep", "SWEEP_COLUMNS", "PRUNING_NAME"]

ProgressCallback = Optional[Callable[[str], None]]
# A pruned model's own measurements, beside its weights (--pruned-dir): its card reports them, not the full model's.
PRUNING_NAME = "pruning.json"


def run_settings(model_source: str) -> Optional[Dict[str, Any]]:
    """The training settings in the summary.json of ``local-dir:PATH`` (or PATH) or ``hf-hub:ORG/NAME``, or None."""
    if model_source.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(model_source[len("hf-hub:"):], SUMMARY_NAME))
        except EntryNotFoundError:
            return None
    else:
        path = Path(model_source.removeprefix("local-dir:")) / SUMMARY_NAME
        if not path.is_file():
            return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8")).get("settings")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a run's summary.json: {e}") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("dataset"), str):
        raise ValueError(f"{path} does not name its data set (settings.dataset)")
    return settings


def run_splits(settings: Mapping[str, Any], mean: Sequence[float], std: Sequence[float],
               data_dir: Optional[str] = None) -> Dict[str, Tuple[Tensor, Tensor]]:
    """``{"train", "val" (where the run held one out), "test"}`` -> (normalised images, labels) of the data set of
    ``settings`` (``run_settings``'s or ``{"dataset": NAME}``), from ``data_dir`` or the run's. Nothing is
    downloaded."""
    name = settings.get("dataset")
    if name not in TENSOR_DATASETS:
        raise DataError(f"--dataset must be one of {and_list(TENSOR_DATASETS)} (data sets held in memory) to "
                        f"rank, recalibrate and measure pruned models; got {name!r}")
    kwargs = {k: settings[k] for k in ("val_size", "split_seed", "image_size", "num_classes")
              if settings.get(k) is not None}
    data = load_data(name, data_dir or settings.get("data_dir"), download=False, **kwargs)
    parts = {split: getattr(data, split, None) for split in ("train", "val", "test")}
    return {split: (normalize(part.images, mean, std), part.labels) for split, part in parts.items()
            if part is not None and not (split == "val" and part is data.test)}


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of the model in eval mode."""
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum())
                      for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return 100.0 * correct / len(images)


def _timed(ms_b1_b32: Tuple[float, float]) -> Dict[str, Any]:
    return dict(zip(("ms_b1", "ms_b32"), ms_b1_b32), threads=torch.get_num_threads())


def describe(model: nn.Module, onnx_path: PathLike, test: Tuple[Tensor, Tensor], input_size: Sequence[int],
             bench_seconds: Optional[float] = 0.3) -> Dict[str, Any]:
    """A model and its checked ONNX file measured: blocks, parameters, FLOPs per image, test accuracy in PyTorch
    and onnxruntime, and unless ``bench_seconds`` is None onnxruntime's latency at batch 1 and 32."""
    images, labels = test
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    ort_logits = predict_onnx(onnx_path, images.numpy())
    row = dict(
        blocks=len(block_names(model)), layers=[len(getattr(model, name)) for name in model.stage_names],
        params=sum(p.numel() for p in model.parameters()), mflops=counter.get_total_flops() / 1e6,
        acc_torch=accuracy(model, images, labels),
        acc_ort=100.0 * float((ort_logits.argmax(1) == labels.numpy()).mean()))
    if bench_seconds is not None:
        row.update(_timed(latencies({0: onnx_path}, input_size, bench_seconds, rounds=1)[0]))
    return row


def latencies(files: Mapping[Any, PathLike], input_size: Sequence[int], bench_seconds: float = 0.3,
              rounds: int = 3, progress: ProgressCallback = None) -> Dict[Any, Tuple[float, float]]:
    """onnxruntime's latency (ms) at batch 1 and 32 of each file (key -> path), the fastest of ``rounds`` rounds
    that each time every file in turn: load on a shared machine comes and goes, and so falls on all alike."""
    best = {key: (math.inf, math.inf) for key in files}
    for round_index in range(rounds):
        if progress is not None:
            progress(f"timing {len(files)} graphs, round {round_index + 1} of {rounds}")
        for key, path in files.items():
            session = ort_session(os.fspath(path), spinning=False)
            ms = [onnx_latency(session, batch, input_size=input_size, min_run_time=bench_seconds) for batch in (1, 32)]
            best[key] = tuple(map(min, best[key], ms))
    return best


def depth_sweep(models: Mapping[str, nn.Module], splits: Mapping[str, Tuple[Tensor, Tensor]],
                orders: Sequence[str] = ("survival", "evenly", "greedy"), depths: Optional[Sequence[int]] = None,
                recalibrate_bn: int = 0, bench_seconds: float = 0.3, rounds: int = 3,
                input_size: Optional[Sequence[int]] = None, progress: ProgressCallback = None) -> List[Dict[str, Any]]:
    """A row for each model (label -> model), order and depth: the pruned model exported, checked and measured,
    with the blocks it kept. Latency is timed last, once per ``layers``: one timing of graphs that do the same
    work keeps load noise out of the comparison of twins."""
    say = progress or (lambda line: None)
    rows: List[Dict[str, Any]] = []
    graphs: Dict[Tuple[int, ...], str] = {}  # layers -> the first ONNX file of that shape
    with tempfile.TemporaryDirectory(prefix="sdzoo-depth-") as tmp:
        for label, model in models.items():
            names = block_names(model)
            model_depths = sorted(set(depths or range(len(required_blocks(model)), len(names) + 1)), reverse=True)
            size = tuple(input_size or model.pretrained_cfg["input_size"])
            if "greedy" in orders:  # nested: searched once for every depth
                say(f"{label}: greedy search on the validation split "
                    f"({len(splits['val'][1]) if 'val' in splits else 0} images)")
                greedy, evaluations = greedy_removals(model, splits, down_to=min(model_depths), progress=say)
                say(f"{label}: greedy order {', '.join(greedy)} ({evaluations} evaluations)")
            measured: Dict[Tuple[str, ...], Dict[str, Any]] = {}
            for order in orders:
                for keep in model_depths:
                    if order == "greedy":  # the blocks the greedy search removed first go
                        removed = greedy[:len(names) - keep]
                        pruned = prune_blocks(model, None, [n for n in names if n not in removed], splits,
                                              recalibrate_bn)
                    else:
                        pruned = prune_blocks(model, keep, order, splits, recalibrate_bn)
                    kept = tuple(pruned.pruned_from["kept"])
                    if kept not in measured:  # the same blocks kept by another order: measured once
                        say(f"{label}: {order}, {keep} of {len(names)} blocks: exporting and measuring")
                        path = os.path.join(tmp, f"pruned-{len(os.listdir(tmp))}.onnx")
                        report = export_onnx(pruned, path, input_size=size)
                        measured[kept] = dict(describe(pruned, path, splits["test"], size, bench_seconds=None),
                                              max_abs_diff=max(report.max_abs_diff.values()))
                        graphs.setdefault(tuple(measured[kept]["layers"]), path)
                    rows.append(dict(model=label, order=order, kept=list(kept), **measured[kept]))
                    say(f"  {label}, {order}, {keep} blocks: test accuracy {rows[-1]['acc_torch']:.2f}% "
                        f"(onnxruntime {rows[-1]['acc_ort']:.2f}%), {rows[-1]['mflops']:.2f} MFLOPs per image")
        timed = latencies(graphs, size, bench_seconds, rounds, progress=say)
    for row in rows:
        row.update(_timed(timed[tuple(row["layers"])]))
    return rows


# (key, title, format of a cell) of each column of the table
SWEEP_COLUMNS = (("model", "model", ""), ("order", "order", ""), ("blocks", "blocks kept", ""),
                 ("params", "parameters", ","), ("mflops", "MFLOPs / image", ".2f"),
                 ("acc_torch", "test acc. PyTorch (%)", ".2f"), ("acc_ort", "test acc. onnxruntime (%)", ".2f"),
                 ("ms_b1", "ort ms, batch 1", ".2f"), ("ms_b32", "ort ms, batch 32", ".2f"))


def _table_line(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def format_sweep(rows: Sequence[Mapping[str, Any]]) -> str:
    """The sweep as a Markdown table, the blocks each row kept as its last column."""
    lines = [_table_line([title for _, title, _ in SWEEP_COLUMNS] + ["the blocks kept"]),
             _table_line(["---" if key in ("model", "order") else "---:" for key, _, _ in SWEEP_COLUMNS]
                         + ["---"])]
    lines += [_table_line([format(row[key], fmt) for key, _, fmt in SWEEP_COLUMNS] + [", ".join(row["kept"])])
              for row in rows]
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Mapping[str, Any]], out_path: PathLike, title: Optional[str] = None) -> None:
    """A PNG of accuracy against latency at batch 32 and against blocks kept, a line per model and order."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(r["model"] for r in rows))}
    styles = {"survival": "o-", "evenly": "s--", "greedy": "^:"}
    for label, order in dict.fromkeys((r["model"], r["order"]) for r in rows):
        part = sorted((r for r in rows if (r["model"], r["order"]) == (label, order)), key=lambda r: r["blocks"])
        for ax, x in zip(axes, ("ms_b32", "blocks")):
            ax.plot([r[x] for r in part], [r["acc_ort"] for r in part], styles.get(order, "o-"),
                    color=colours[label], label=f"{label}, {order}")
    for ax, xlabel in zip(axes, ("onnxruntime latency, batch 32 (ms)", "residual blocks kept")):
        ax.set(xlabel=xlabel, ylabel="test accuracy, onnxruntime (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out_path, lambda temp: fig.savefig(temp, format="png"))
    plt.close(fig)
