"""Export: ONNX files checked with onnxruntime (``onnx_export``), int8 calibration images, latency, depth
sweeps, and the model variants that the benchmark times."""
