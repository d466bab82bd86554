"""Export: ONNX files checked with onnxruntime (``onnx_export``), int8 calibration images, latency, depth
sweeps, and the model variants that the benchmark times."""
from sdzoo.export.onnx_export import (ExportCheckError, ExportError, ExportReport, QuantizeReport, export_onnx,
                                      predict_onnx, quantize_int8, verify_onnx)

__all__ = ["export_onnx", "verify_onnx", "quantize_int8", "predict_onnx", "ExportReport", "QuantizeReport",
           "ExportError", "ExportCheckError"]
