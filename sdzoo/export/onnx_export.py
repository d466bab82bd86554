"""ONNX export of the zoo's models: export, check, describe (metadata), quantize to int8.

Every file is checked before it is kept: written beside the output, it must pass onnx's full checker and match
PyTorch under onnxruntime, and only then replaces the output (``sdzoo.files.disk.staged_file``). Models come here
folded (``sdzoo.fold``); calibration and test images come from ``sdzoo.export.calibration``.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from torch import nn

from sdzoo.files import SDZOO_VERSION
from sdzoo.files.checks import check_input_size, error_line
from sdzoo.files.disk import PathLike, remove_abandoned_temporaries, staged_file
from sdzoo.survival import TRAINED_FIELDS

__all__ = [
    "DEFAULT_OPSET", "MIN_OPSET", "MAX_INPUT_SIDE", "INPUT_NAME", "OUTPUT_NAME", "ExportError", "ExportCheckError",
    "ExportReport", "QuantizeReport", "export_onnx", "verify_onnx", "onnx_metadata", "read_metadata", "op_histogram",
    "predict_onnx", "ort_session", "quantize_int8", "eval_mode", "check_opset",
]

DEFAULT_OPSET = 20
# The largest input height and width exported: a ResNet's activations at 1024x1024 and the parity check's batches
# already take gigabytes; a config.json or a flag asking for more is refused before anything is allocated.
MAX_INPUT_SIDE = 1024
MIN_OPSET = 18  # the torch.export-based exporter emits opset 18 and later
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_BATCH_AXIS = "batch"


class ExportError(RuntimeError):
    """Export or quantization failed; the output path was left as it was."""


class ExportCheckError(ExportError):
    """The exported file failed a check (onnx checker, onnxruntime, parity with PyTorch)."""


@dataclass
class ExportReport:
    path: str
    opset: int
    input_size: Tuple[int, int, int]
    max_abs_diff: Dict[int, float]  # batch size -> max |onnxruntime - PyTorch|
    atol: float
    rtol: float
    file_size: int
    op_histogram: Dict[str, int]
    metadata: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in self.max_abs_diff.items())
        tolerance = f"atol {self.atol:g}" + (f", rtol {self.rtol:g}" if self.rtol else "")
        return (f"wrote {self.path} ({self.file_size / 2**20:.2f} MiB, opset {self.opset}, "
                f"{sum(self.op_histogram.values())} nodes)\n"
                f"onnxruntime vs PyTorch, max abs diff ({tolerance}): {diffs}")


@dataclass
class QuantizeReport:
    path: str
    fp32_size: int
    int8_size: int
    top1_agreement: float  # fraction of held-out images where int8 and fp32 predict the same class
    num_calibration: int
    num_eval: int

    def summary(self) -> str:
        lines = [
            f"wrote {self.path}: int8 static QDQ, calibrated on {self.num_calibration} images",
            f"file size: fp32 {self.fp32_size / 2**20:.2f} MiB -> int8 {self.int8_size / 2**20:.2f} MiB "
            f"({self.fp32_size / max(self.int8_size, 1):.1f}x smaller)",
            f"top-1 agreement with fp32 on {self.num_eval} held-out images: {100 * self.top1_agreement:.1f}%",
        ]
        return "\n".join(lines)


# -- argument checks -------------------------------------------------------------------------------------
def check_opset(opset) -> int:
    latest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= latest:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {latest}; got {opset!r}")
    return opset


def _check_batch_sizes(name: str, batch_sizes) -> Tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers; got {batch_sizes!r}")
    return sizes


def _input_size_of(model: nn.Module, input_size) -> Tuple[int, int, int]:
    if input_size is None:
        input_size = getattr(model, "pretrained_cfg", {}).get("input_size")
        if input_size is None:
            raise ValueError("input_size must be given: the model has no pretrained_cfg['input_size']")
    return check_input_size("input_size", input_size, max_side=MAX_INPUT_SIDE)


# -- files ------------------------------------------------------------------------------------------------
def ort_session(path_or_bytes, threads: Optional[int] = None, spinning: bool = True):
    """A CPU onnxruntime session on ``threads`` threads, by default the process's torch thread count, so that
    one setting (OMP_NUM_THREADS, ``torch.set_num_threads``, the scripts' --threads) bounds both; onnxruntime's
    own default is a thread a core. ``spinning=False`` stops idle worker threads from busy-waiting, which
    would steal the cores from whatever is timed next (PyTorch, or another session, round-robin)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _run_onnx(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {INPUT_NAME: x})[0]


def predict_onnx(path: PathLike, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of an exported model for (N, C, H, W) ``images``, with onnxruntime on the CPU."""
    images = _check_images("images", images)
    session = ort_session(os.fspath(path))
    return np.concatenate([_run_onnx(session, batch) for batch in _batches(images, batch_size)])


# -- metadata ---------------------------------------------------------------------------------------------
def onnx_metadata(
        model: nn.Module,
        *,
        model_name: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        label_names: Optional[Sequence[str]] = None,
        extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, str]:
    """What a deployment needs to know about a model, as ONNX metadata (string values; lists are JSON).

    ``label_names`` defaults to the model's ``pretrained_cfg['label_names']`` when it has as many as the model
    has classes; otherwise none are written (a wrong list is worse than none).
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if model_name is None:
        arch, tag = cfg.get("architecture"), cfg.get("tag")
        model_name = f"{arch}.{tag}" if arch and tag else (arch or type(model).__name__)
    num_classes = int(getattr(model, "num_classes", cfg.get("num_classes", 0)) or 0)
    meta: Dict[str, Any] = {
        "model_name": model_name,
        "architecture": cfg.get("architecture", type(model).__name__),
        "input_size": list(_input_size_of(model, input_size)),
        "mean": list(cfg.get("mean", ())),
        "std": list(cfg.get("std", ())),
        "interpolation": cfg.get("interpolation", ""),
        "crop_pct": cfg.get("crop_pct", ""),
        "num_classes": num_classes,
        "sdzoo_version": SDZOO_VERSION,
    }
    if label_names is None:
        label_names = cfg.get("label_names")
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != num_classes:
            raise ValueError(f"label_names must name each of the {num_classes} classes; got {len(label_names)} names")
        meta["label_names"] = label_names
    meta.update(_survival_metadata(model))
    if getattr(model, "pruned_from", None):  # sdzoo.prune: the source architecture and layers, the blocks kept
        meta["pruned_from"] = model.pruned_from
    meta.update(extra or {})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _survival_metadata(model: nn.Module) -> Dict[str, Any]:
    """The survival settings the weights were trained with, and whether p_l is folded into them."""
    settings = getattr(model, "survival_settings", None)
    if settings is None:  # a model without stochastic depth of its own (timm's, converted or not): no settings
        return {"stochastic_depth": dict.fromkeys(TRAINED_FIELDS), "folded": "false"}
    return {"stochastic_depth": settings.trained_dict(), "folded": "true" if settings.folded_from else "false"}


def read_metadata(path_or_proto: Union[PathLike, onnx.ModelProto]) -> Dict[str, str]:
    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(os.fspath(path_or_proto))
    return {p.key: p.value for p in proto.metadata_props}


def _add_metadata(path: str, metadata: Dict[str, str]) -> onnx.ModelProto:
    """The file at ``path`` with ``metadata`` added, written back; returns its proto."""
    proto = onnx.load(path)
    # set_model_props replaces every entry: keep what the tools that made the file recorded, unless ours differ.
    onnx.helper.set_model_props(proto, {**read_metadata(proto), **metadata})
    onnx.save(proto, path)
    return proto


def _full_check(path: str, what: str) -> None:
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportCheckError(f"onnx checker rejected the {what}: {err}") from err


def op_histogram(path_or_proto: Union[PathLike, onnx.ModelProto]) -> Counter:
    """How many nodes of each operator type the main graph has."""
    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(os.fspath(path_or_proto))
    return Counter(node.op_type for node in proto.graph.node)


# -- export -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block, then in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _export_graph(model: nn.Module, path: str, input_size: Tuple[int, int, int], opset: int) -> None:
    # torch.onnx.export(dynamo=True) directly: timm's export helper uses the legacy TorchScript exporter.
    # Batch 2 as the example: torch.export would specialise a batch of 1 into the graph.
    example = torch.randn(2, *input_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), path, dynamo=True, opset_version=opset, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim(_BATCH_AXIS)},),
                external_data=False,  # one self-contained file: every zoo model is well under protobuf's 2 GB
            )
    except Exception as err:  # noqa: BLE001  (the exporter raises many types; the caller needs one)
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__} at input size "
                          f"{tuple(input_size)}, opset {opset}: {error_line(err)}") from err


def verify_onnx(
        path: PathLike,
        model: nn.Module,
        *,
        input_size: Sequence[int],
        batch_sizes: Sequence[int] = (1, 3, 16),
        atol: float = 1e-4,
        rtol: float = 0.0,
        seed: int = 0,
) -> Dict[int, float]:
    """onnx's full checker, then onnxruntime against the PyTorch model in eval mode at each batch size.

    A batch passes when its max abs difference is at most ``atol + rtol * max|logit|``. The default is the
    absolute bound alone; ``rtol`` is for untrained deep models, whose logits can reach 1e5 and more.
    Returns the max abs difference per batch size; raises ``ExportCheckError`` when a check fails.
    """
    path = os.fspath(path)
    input_size = check_input_size("input_size", input_size)
    batch_sizes = _check_batch_sizes("batch_sizes", batch_sizes)
    _full_check(path, "exported model")
    try:
        session = ort_session(path)
    except Exception as err:  # noqa: BLE001  (onnxruntime raises its own exception types)
        raise ExportCheckError(f"onnxruntime cannot load the exported model: {err}") from err
    # Hand-written rather than torch.onnx.verification.verify_onnx_program / torch.onnx.testing.assert_onnx_program:
    # those run an in-memory ONNXProgram against its own exported program, while this checks the file on disk
    # (metadata and all) against the eager model, and also a file exported elsewhere (the Hub's ONNX check).
    generator = torch.Generator().manual_seed(seed)
    diffs, scale = {}, 0.0
    with eval_mode(model), torch.no_grad():
        for batch_size in batch_sizes:
            x = torch.randn(batch_size, *input_size, generator=generator)
            expected = model(x).float().numpy()
            got = _run_onnx(session, x.numpy())
            if got.shape != expected.shape:
                raise ExportCheckError(f"onnxruntime output shape {got.shape} != PyTorch {expected.shape} "
                                       f"at batch {batch_size}")
            diffs[batch_size] = float(np.abs(got - expected).max())
            scale = max(scale, float(np.abs(expected).max()))
    bound = atol + rtol * scale
    failed = {b: d for b, d in diffs.items() if not d <= bound}  # `not <=` also catches NaN
    if failed:
        detail = ", ".join(f"batch {b}: {d:.3e}" for b, d in failed.items())
        # Float rounding grows with the logits (an untrained deep ResNet's reach 1e5): say how large they are.
        raise ExportCheckError(f"onnxruntime output differs from PyTorch by more than atol={atol:g} + "
                               f"rtol={rtol:g} x {scale:.3g} (the largest |logit|): {detail}")
    return diffs


def export_onnx(
        model: nn.Module,
        path: PathLike,
        *,
        input_size: Optional[Sequence[int]] = None,
        opset: int = DEFAULT_OPSET,
        verify_batch_sizes: Sequence[int] = (1, 3, 16),
        atol: float = 1e-4,
        rtol: float = 0.0,
        metadata: Optional[Dict[str, Any]] = None,
        seed: int = 0,
) -> ExportReport:
    """Export ``model`` (in eval mode; fold a stochastic-depth model first for a plain-ResNet graph) to one ONNX
    file with a dynamic batch axis, checked by ``verify_onnx`` at ``verify_batch_sizes`` before it replaces
    ``path``. ``input_size`` (C, H, W) defaults to the model's pretrained_cfg, ``metadata`` to ``onnx_metadata``.
    Raises ValueError for a bad argument, ExportError (ExportCheckError: a failed check) when the export fails;
    ``path`` is then left as it was."""
    input_size = _input_size_of(model, input_size)
    opset = check_opset(opset)
    verify_batch_sizes = _check_batch_sizes("verify_batch_sizes", verify_batch_sizes)
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if not tol >= 0:
            raise ValueError(f"{name} must be >= 0; got {tol!r}")
    if metadata is None:
        metadata = onnx_metadata(model, input_size=input_size)
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}

    remove_abandoned_temporaries(path)  # of an export of this file that was killed mid-write
    with staged_file(path) as tmp:
        with eval_mode(model):
            _export_graph(model, tmp, input_size, opset)
        proto = _add_metadata(tmp, metadata)
        diffs = verify_onnx(tmp, model, input_size=input_size, batch_sizes=verify_batch_sizes, atol=atol,
                            rtol=rtol, seed=seed)
        file_size = os.path.getsize(tmp)
    return ExportReport(
        path=os.fspath(path), opset=opset, input_size=input_size, max_abs_diff=diffs, atol=atol, rtol=rtol,
        file_size=file_size, op_histogram=dict(op_histogram(proto)), metadata=metadata)


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


# -- quantization -----------------------------------------------------------------------------------------
def quantize_int8(
        fp32_path: PathLike,
        output_path: PathLike,
        calibration_images: np.ndarray,
        eval_images: np.ndarray,
        *,
        per_channel: bool = True,
        batch_size: int = 32,
        metadata: Optional[Dict[str, str]] = None,
) -> QuantizeReport:
    """Static int8 QDQ quantization with onnxruntime, calibrated on ``calibration_images`` (N, C, H, W).

    Reports file sizes and how often the two models agree on the top-1 class of ``eval_images`` (keep them
    apart from the calibration images). The fp32 file's metadata is carried over.
    The output is written only when the quantized model passes onnx's checker and runs.
    """
    from onnxruntime.quantization import CalibrationDataReader

    fp32_path = os.fspath(fp32_path)
    if not os.path.isfile(fp32_path):
        raise ValueError(f"fp32_path must be an existing ONNX file; got {fp32_path!r}")
    calibration_images = _check_images("calibration_images", calibration_images)
    eval_images = _check_images("eval_images", eval_images)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(_batches(calibration_images, batch_size))

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {INPUT_NAME: batch}

    fp32_meta = read_metadata(fp32_path)
    metadata = dict(fp32_meta, **(metadata or {}))
    metadata.update(quantization=json.dumps(dict(
        method="onnxruntime static QDQ", weights="int8", activations="int8", per_channel=per_channel,
        calibration_images=len(calibration_images))))

    remove_abandoned_temporaries(output_path)  # of a quantization of this file that was killed mid-write
    with staged_file(output_path) as tmp:
        _quantize_static(fp32_path, tmp, _Reader(), per_channel)
        _add_metadata(tmp, metadata)
        _full_check(tmp, "quantized model")
        fp32_session, int8_session = ort_session(fp32_path), ort_session(tmp)
        agreement = _top1_agreement(fp32_session, int8_session, eval_images, batch_size)
        int8_size = os.path.getsize(tmp)
    return QuantizeReport(
        path=os.fspath(output_path), fp32_size=os.path.getsize(fp32_path), int8_size=int8_size,
        top1_agreement=agreement, num_calibration=len(calibration_images),
        num_eval=len(eval_images))


def _quantize_static(fp32_path: str, output_path: str, reader, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with tempfile.TemporaryDirectory() as work:
            # onnxruntime's recommended preparation: shape inference and graph optimisation, then calibrate.
            prepared = os.path.join(work, "prepared.onnx")
            quant_pre_process(fp32_path, prepared)
            quantize_static(
                prepared, output_path, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    except Exception as err:  # noqa: BLE001  (onnxruntime's quantizer raises many types)
        raise ExportError(f"onnxruntime quantization of {fp32_path} failed: {error_line(err)}") from err


def _top1_agreement(session_a, session_b, images: np.ndarray, batch_size: int) -> float:
    agree = 0
    for batch in _batches(images, batch_size):
        agree += int((_run_onnx(session_a, batch).argmax(1) == _run_onnx(session_b, batch).argmax(1)).sum())
    return agree / len(images)


def _check_images(name: str, images) -> np.ndarray:
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{name} must be a non-empty (N, C, H, W) array; got shape {images.shape}")
    return images
