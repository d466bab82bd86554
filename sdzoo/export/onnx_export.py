"""ONNX export of the zoo's models: export, check, describe (metadata), quantize to int8. Every file is written
beside its output and replaces it only once its checks pass (``sdzoo.files.disk.staged_file``)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from torch import nn

from sdzoo.files import SDZOO_VERSION
from sdzoo.files.checks import check_input_size, error_line
from sdzoo.files.disk import PathLike, remove_abandoned_temporaries, staged_file
from sdzoo.survival import TRAINED_FIELDS

DEFAULT_OPSET = 20
# A ResNet's activations at 1024x1024 and the parity check's batches already take gigabytes.
MAX_INPUT_SIDE = 1024
MIN_OPSET = 18  # the torch.export-based exporter emits opset 18 and later
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


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
        return (f"wrote {self.path}: int8 static QDQ, calibrated on {self.num_calibration} images\n"
                f"file size: fp32 {self.fp32_size / 2**20:.2f} MiB -> int8 {self.int8_size / 2**20:.2f} MiB "
                f"({self.fp32_size / max(self.int8_size, 1):.1f}x smaller)\n"
                f"top-1 agreement with fp32 on {self.num_eval} held-out images: {100 * self.top1_agreement:.1f}%")


# -- arguments --------------------------------------------------------------------------------------------
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


def _check_images(name: str, images) -> np.ndarray:
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{name} must be a non-empty (N, C, H, W) array; got shape {images.shape}")
    return images


def _input_size_of(model: nn.Module, input_size) -> Tuple[int, int, int]:
    if input_size is None:
        input_size = getattr(model, "pretrained_cfg", {}).get("input_size")
        if input_size is None:
            raise ValueError("input_size must be given: the model has no pretrained_cfg['input_size']")
    return check_input_size("input_size", input_size, max_side=MAX_INPUT_SIDE)


def _batches(images: np.ndarray, batch_size: int):
    return np.split(images, range(batch_size, len(images), batch_size))


# -- running and reading files ----------------------------------------------------------------------------
def ort_session(path_or_bytes, threads: Optional[int] = None, spinning: bool = True):
    """A CPU onnxruntime session on ``threads`` threads, by default torch's, so that one setting bounds both
    (onnxruntime's own default is a thread a core). ``spinning=False`` keeps idle workers from busy-waiting
    on the cores that whatever is timed next needs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _run_onnx(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {INPUT_NAME: x})[0]


def _predict(session, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([_run_onnx(session, batch) for batch in _batches(images, batch_size)])


def predict_onnx(path: PathLike, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of an exported model for (N, C, H, W) ``images``, with onnxruntime on the CPU."""
    return _predict(ort_session(os.fspath(path)), _check_images("images", images), batch_size)


def _proto(path_or_proto: Union[PathLike, onnx.ModelProto]) -> onnx.ModelProto:
    return path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(os.fspath(path_or_proto))


def read_metadata(path_or_proto: Union[PathLike, onnx.ModelProto]) -> Dict[str, str]:
    return {p.key: p.value for p in _proto(path_or_proto).metadata_props}


def op_histogram(path_or_proto: Union[PathLike, onnx.ModelProto]) -> Counter:
    """How many nodes of each operator type the main graph has."""
    return Counter(node.op_type for node in _proto(path_or_proto).graph.node)


def _add_metadata(path: str, metadata: Dict[str, str]) -> onnx.ModelProto:
    """The file at ``path`` with ``metadata`` added (over what the exporter recorded), written back."""
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {**read_metadata(proto), **metadata})  # set_model_props replaces all
    onnx.save(proto, path)
    return proto


def _full_check(path: str, what: str) -> None:
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportCheckError(f"onnx checker rejected the {what}: {err}") from err


# -- metadata ---------------------------------------------------------------------------------------------
def _strings(meta: Dict[str, Any]) -> Dict[str, str]:
    """ONNX metadata values are strings: anything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def onnx_metadata(model: nn.Module, *, model_name: Optional[str] = None, input_size: Optional[Sequence[int]] = None,
                  label_names: Optional[Sequence[str]] = None, extra: Optional[Dict[str, Any]] = None
                  ) -> Dict[str, str]:
    """What a deployment needs to know about a model, as ONNX metadata (string values; lists are JSON).
    ``label_names`` defaults to the model's ``pretrained_cfg['label_names']``."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture")
    if model_name is None:
        model_name = f"{arch}.{cfg['tag']}" if arch and cfg.get("tag") else (arch or type(model).__name__)
    num_classes = int(getattr(model, "num_classes", cfg.get("num_classes", 0)) or 0)
    settings = getattr(model, "survival_settings", None)  # None: no stochastic depth of its own (timm's models)
    meta: Dict[str, Any] = dict(
        model_name=model_name, architecture=arch or type(model).__name__,
        input_size=list(_input_size_of(model, input_size)), mean=list(cfg.get("mean", ())),
        std=list(cfg.get("std", ())), interpolation=cfg.get("interpolation", ""), crop_pct=cfg.get("crop_pct", ""),
        num_classes=num_classes, sdzoo_version=SDZOO_VERSION,
        stochastic_depth=dict.fromkeys(TRAINED_FIELDS) if settings is None else settings.trained_dict(),
        folded="true" if settings is not None and settings.folded_from else "false")
    label_names = cfg.get("label_names") if label_names is None else label_names
    if label_names is not None:
        meta["label_names"] = [str(n) for n in label_names]
        if len(label_names) != num_classes:  # a wrong list is worse than none
            raise ValueError(f"label_names must name each of the {num_classes} classes; got {len(label_names)} names")
    if getattr(model, "pruned_from", None):  # sdzoo.prune: the source architecture and layers, the blocks kept
        meta["pruned_from"] = model.pruned_from
    return _strings(dict(meta, **(extra or {})))


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


def verify_onnx(path: PathLike, model: nn.Module, *, input_size: Sequence[int], batch_sizes: Sequence[int] = (1, 3, 16),
                atol: float = 1e-4, rtol: float = 0.0, seed: int = 0) -> Dict[int, float]:
    """onnx's full checker, then onnxruntime against the PyTorch model in eval mode at each batch size; returns
    the max abs difference per batch size, raises ``ExportCheckError`` when a check fails.

    A batch passes when its max abs difference is at most ``atol + rtol * max|logit|``: ``rtol`` is for untrained
    deep models, whose logits can reach 1e5. The file on disk is checked against the eager model (not an
    in-memory ONNXProgram, as torch.onnx.verification does), so that a file exported elsewhere can be checked.
    """
    path = os.fspath(path)
    input_size = check_input_size("input_size", input_size)
    batch_sizes = _check_batch_sizes("batch_sizes", batch_sizes)
    _full_check(path, "exported model")
    try:
        session = ort_session(path)
    except Exception as err:  # noqa: BLE001  (onnxruntime raises its own exception types)
        raise ExportCheckError(f"onnxruntime cannot load the exported model: {err}") from err
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
    failed = ", ".join(f"batch {b}: {d:.3e}" for b, d in diffs.items() if not d <= atol + rtol * scale)  # and NaN
    if failed:
        raise ExportCheckError(f"onnxruntime output differs from PyTorch by more than atol={atol:g} + "
                               f"rtol={rtol:g} x {scale:.3g} (the largest |logit|): {failed}")
    return diffs


def export_onnx(model: nn.Module, path: PathLike, *, input_size: Optional[Sequence[int]] = None,
                opset: int = DEFAULT_OPSET, verify_batch_sizes: Sequence[int] = (1, 3, 16), atol: float = 1e-4,
                rtol: float = 0.0, metadata: Optional[Dict[str, Any]] = None, seed: int = 0) -> ExportReport:
    """Export ``model`` (in eval mode; fold a stochastic-depth model first for a plain-ResNet graph) to one ONNX
    file with a dynamic batch axis, checked by ``verify_onnx`` before it replaces ``path``. ``input_size``
    (C, H, W) defaults to the model's pretrained_cfg, ``metadata`` to ``onnx_metadata``.
    Raises ValueError for a bad argument, ExportError (ExportCheckError: a failed check) when the export fails;
    ``path`` is then left as it was."""
    input_size = _input_size_of(model, input_size)
    opset = check_opset(opset)
    verify_batch_sizes = _check_batch_sizes("verify_batch_sizes", verify_batch_sizes)
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if not tol >= 0:
            raise ValueError(f"{name} must be >= 0; got {tol!r}")
    metadata = _strings(onnx_metadata(model, input_size=input_size) if metadata is None else metadata)

    remove_abandoned_temporaries(path)  # of an export of this file that was killed mid-write
    with staged_file(path) as tmp:
        try:  # torch.onnx.export itself: timm's export helper uses the legacy TorchScript exporter
            with eval_mode(model), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Batch 2 as the example: torch.export would specialise a batch of 1 into the graph.
                torch.onnx.export(model, (torch.randn(2, *input_size),), tmp, dynamo=True, opset_version=opset,
                                  verbose=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
        except Exception as err:  # noqa: BLE001  (the exporter raises many types; the caller needs one)
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__} at input size "
                              f"{tuple(input_size)}, opset {opset}: {error_line(err)}") from err
        proto = _add_metadata(tmp, metadata)
        diffs = verify_onnx(tmp, model, input_size=input_size, batch_sizes=verify_batch_sizes, atol=atol,
                            rtol=rtol, seed=seed)
        file_size = os.path.getsize(tmp)
    return ExportReport(
        path=os.fspath(path), opset=opset, input_size=input_size, max_abs_diff=diffs, atol=atol, rtol=rtol,
        file_size=file_size, op_histogram=dict(op_histogram(proto)), metadata=metadata)


# -- quantization -----------------------------------------------------------------------------------------
def quantize_int8(fp32_path: PathLike, output_path: PathLike, calibration_images: np.ndarray, eval_images: np.ndarray,
                  *, per_channel: bool = True, batch_size: int = 32, metadata: Optional[Dict[str, str]] = None
                  ) -> QuantizeReport:
    """Static int8 QDQ quantization with onnxruntime, calibrated on ``calibration_images`` (N, C, H, W); reports
    file sizes and how often int8 and fp32 agree on the top-1 class of ``eval_images`` (keep them apart from the
    calibration images). The fp32 file's metadata is carried over; the output is written only when the quantized
    model passes onnx's checker and runs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path = os.fspath(fp32_path)
    if not os.path.isfile(fp32_path):
        raise ValueError(f"fp32_path must be an existing ONNX file; got {fp32_path!r}")
    calibration_images = _check_images("calibration_images", calibration_images)
    eval_images = _check_images("eval_images", eval_images)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{INPUT_NAME: b} for b in _batches(calibration_images, batch_size)])

        def get_next(self):
            return next(self.feeds, None)

    metadata = {**read_metadata(fp32_path), **(metadata or {}), "quantization": json.dumps(dict(
        method="onnxruntime static QDQ", weights="int8", activations="int8", per_channel=per_channel,
        calibration_images=len(calibration_images)))}

    remove_abandoned_temporaries(output_path)  # of a quantization of this file that was killed mid-write
    with staged_file(output_path) as tmp:
        try:
            with tempfile.TemporaryDirectory() as work:  # onnxruntime's recommended preparation comes first
                prepared = os.path.join(work, "prepared.onnx")
                quant_pre_process(fp32_path, prepared)
                quantize_static(prepared, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        except Exception as err:  # noqa: BLE001  (onnxruntime's quantizer raises many types)
            raise ExportError(f"onnxruntime quantization of {fp32_path} failed: {error_line(err)}") from err
        _add_metadata(tmp, metadata)
        _full_check(tmp, "quantized model")
        top1 = [_predict(ort_session(p), eval_images, batch_size).argmax(1) for p in (fp32_path, tmp)]
        int8_size = os.path.getsize(tmp)
    return QuantizeReport(path=os.fspath(output_path), fp32_size=os.path.getsize(fp32_path), int8_size=int8_size,
                          top1_agreement=float((top1[0] == top1[1]).mean()), num_calibration=len(calibration_images),
                          num_eval=len(eval_images))
