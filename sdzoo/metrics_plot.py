"""Training curves of a run, drawn from its ``metrics.jsonl`` (the layout of the paper's figure 3:
error on the left axis, training loss on the right, against epochs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["read_metrics", "plot_curves"]


def read_metrics(path) -> List[Dict]:
    """The per-epoch records of a run, in order."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path, out_path, title: Optional[str] = None) -> bool:
    """Write ``curves.png``: train/val/test error (%) and train loss against epochs. False if no data."""
    records = read_metrics(metrics_path)
    if not records:
        return False
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write

    epochs = [r["epoch"] for r in records]
    fig, ax_err = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, label, style in (("train_error", "train error", "--"), ("val_error", "val error", "-"),
                              ("test_error", "test error", "-")):
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax_err.plot(epochs, [float("nan") if v is None else v for v in values], style, label=label)
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error (%)")
    ax_err.grid(alpha=0.3)
    ax_loss = ax_err.twinx()
    ax_loss.plot(epochs, [r["train_loss"] for r in records], ":", color="grey", label="train loss")
    ax_loss.set_ylabel("training loss")
    lines = ax_err.get_legend_handles_labels()[0] + ax_loss.get_legend_handles_labels()[0]
    ax_err.legend(lines, [line.get_label() for line in lines], loc="upper right")
    if title:
        ax_err.set_title(title)
    fig.tight_layout()
    atomic_write(out_path, lambda temp: fig.savefig(temp, format="png"))
    plt.close(fig)
    return True
