"""A run's ``metrics.jsonl`` and its training curves (the paper's figure 3: error and training loss against epochs).

Records, in order, each with its global ``step``: ``"kind": "epoch"`` at the end of each epoch (with
``--eval-every-steps 0`` holding the epoch's evaluation too), and with ``--eval-every-steps N`` ``"kind": "eval"``
every N steps, placed on the epoch axis by ``epochs_done``. Records written before kinds existed are epochs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from sdzoo.files.disk import atomic_write

__all__ = ["read_metrics", "epoch_records", "evaluations", "epoch_axis", "plot_curves"]


def read_metrics(path) -> List[Dict]:
    """The records of a run, in order ([] without the file); a line that is no JSON object is a ValueError naming
    the file and the line: a corrupt log is reported, never skipped."""
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
    for key, style, rows in (("train_error", "--", epochs), ("val_error", "-", evals), ("test_error", "-", evals)):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax_err.plot([epoch_axis(r) for r in rows], [float("nan") if v is None else v for v in values], style,
                        label=key.replace("_", " "))
    ax_err.set(xlabel="epoch", ylabel="error (%)", title=title or "")
    ax_err.grid(alpha=0.3)
    ax_loss = ax_err.twinx()
    ax_loss.plot([epoch_axis(r) for r in epochs], [r["train_loss"] for r in epochs], ":", color="grey",
                 label="train loss")
    ax_loss.set_ylabel("training loss")
    lines = ax_err.get_legend_handles_labels()[0] + ax_loss.get_legend_handles_labels()[0]
    ax_err.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    atomic_write(out_path, lambda temp: fig.savefig(temp, format="png"))
    plt.close(fig)
    return True
