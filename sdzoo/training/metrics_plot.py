"""Training curves of a run, drawn from its ``metrics.jsonl`` (the layout of the paper's figure 3:
error on the left axis, training loss on the right, against epochs).

``metrics.jsonl`` holds two kinds of records, in the order they happened, each with its global ``step``:
``"kind": "epoch"`` at the end of each epoch (training loss and error, time, depth, gradients; with
``--eval-every-steps 0`` also the epoch's validation and test error), and, with ``--eval-every-steps N``,
``"kind": "eval"`` every N steps (validation and test error at that step; ``epochs_done`` places it on the
epoch axis) while the epoch records carry no evaluation. Records written before kinds existed are epochs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional
from sdzoo.files.disk import atomic_write

__all__ = ["read_metrics", "epoch_records", "evaluations", "epoch_axis", "plot_curves"]


def read_metrics(path) -> List[Dict]:
    """The records of a run, in order. A line that is no JSON object is a ValueError naming the file and the
    line (never skipped: a corrupt log is reported)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: a record must be a JSON object")
            records.append(record)
    return records


def epoch_records(records: List[Dict]) -> List[Dict]:
    """The end-of-epoch records."""
    return [r for r in records if r.get("kind", "epoch") == "epoch"]


def evaluations(records: List[Dict]) -> List[Dict]:
    """The records that hold an evaluation (a test error), whichever their kind."""
    return [r for r in records if r.get("test_error") is not None]


def epoch_axis(record: Dict) -> float:
    """Where a record lies on the epoch axis: an evaluation inside epochs at its ``epochs_done``."""
    return record.get("epochs_done", record["epoch"])


def plot_curves(metrics_path, out_path, title: Optional[str] = None) -> bool:
    """Write ``curves.png``: train/val/test error (%) and train loss against epochs. False if no data."""
    records = read_metrics(metrics_path)
    epochs, evals = epoch_records(records), evaluations(records)
    if not epochs and not evals:
        return False
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax_err = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, label, style, rows in (("train_error", "train error", "--", epochs),
                                    ("val_error", "val error", "-", evals), ("test_error", "test error", "-", evals)):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax_err.plot([epoch_axis(r) for r in rows], [float("nan") if v is None else v for v in values], style,
                        label=label)
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error (%)")
    ax_err.grid(alpha=0.3)
    ax_loss = ax_err.twinx()
    ax_loss.plot([epoch_axis(r) for r in epochs], [r["train_loss"] for r in epochs], ":", color="grey",
                 label="train loss")
    ax_loss.set_ylabel("training loss")
    lines = ax_err.get_legend_handles_labels()[0] + ax_loss.get_legend_handles_labels()[0]
    ax_err.legend(lines, [line.get_label() for line in lines], loc="upper right")
    if title:
        ax_err.set_title(title)
    fig.tight_layout()
    atomic_write(out_path, lambda temp: fig.savefig(temp, format="png"))
    plt.close(fig)
    return True
