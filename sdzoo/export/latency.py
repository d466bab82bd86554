"""CPU latency of a model under PyTorch eager and of its ONNX file under onnxruntime (``torch.utils.benchmark``),
for ``sdzoo export --benchmark`` and the depth sweep."""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.benchmark import Timer

from sdzoo.files.checks import check_seconds
from sdzoo.files.disk import PathLike
from sdzoo.export.onnx_export import INPUT_NAME, eval_mode, ort_session


def median_ms(fn: Callable[[], object], min_run_time: float = 0.5) -> float:
    """Median ms of one call of ``fn``, over blocks of calls timed for at least ``min_run_time`` seconds, on
    PyTorch's thread count (Timer's own default is one thread)."""
    check_seconds("min_run_time", min_run_time)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return 1000.0 * timer.blocked_autorange(min_run_time=min_run_time).median


def onnx_latency(path_or_session, batch_size: int, *, input_size: Sequence[int], min_run_time: float = 0.5) -> float:
    """Median onnxruntime latency in ms of one batch of random inputs; a path is opened by ``ort_session``."""
    session = path_or_session
    if isinstance(path_or_session, (str, os.PathLike)):
        session = ort_session(os.fspath(path_or_session))
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((batch_size, *input_size), dtype=np.float32)}
    return median_ms(lambda: session.run(None, feed), min_run_time)


def compare_latency(model: Optional[nn.Module], onnx_paths: Dict[str, PathLike], *, input_size: Sequence[int],
                    batch_sizes: Sequence[int] = (1, 32), min_run_time: float = 0.5) -> List[Dict[str, float]]:
    """One row per batch size: ``torch_ms``, PyTorch eager in inference mode (when ``model`` is given), and
    ``NAME_ms`` for each ONNX file."""
    sessions = {name: ort_session(os.fspath(path)) for name, path in onnx_paths.items()}
    rows = []
    for batch_size in batch_sizes:
        row: Dict[str, float] = {"batch_size": batch_size}
        if model is not None:
            x = torch.randn(batch_size, *input_size)
            with eval_mode(model), torch.inference_mode():
                row["torch_ms"] = median_ms(partial(model, x), min_run_time)
        for name, session in sessions.items():
            row[f"{name}_ms"] = onnx_latency(session, batch_size, input_size=input_size, min_run_time=min_run_time)
        rows.append(row)
    return rows


def format_latency(rows: List[Dict[str, float]], labels: Dict[str, str]) -> str:
    """A table of ``compare_latency`` rows, ``labels`` naming their columns (``torch_ms``, ``NAME_ms``), and the
    speed-up of the last column over the first."""
    keys = list(labels)
    header = [f"{'batch':>5}"] + [f"{labels[k]:>14}" for k in keys] + [f"{'speed-up':>8}"]
    lines = [f"CPU latency, median ms ({torch.get_num_threads()} threads)", "  ".join(header)]
    for row in rows:
        cells = [f"{row['batch_size']:>5}"] + [f"{row[k]:>14.2f}" for k in keys]
        lines.append("  ".join(cells + [f"{row[keys[0]] / row[keys[-1]]:>7.2f}x"]))
    return "\n".join(lines)
