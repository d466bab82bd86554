#!/usr/bin/env python3
"""Export a trained model to ONNX, folded and checked against PyTorch: `sdzoo export` (sdzoo/cli/export.py).

    python scripts/export_onnx.py --model local-dir:runs/r110 --output r110.onnx
    python scripts/export_onnx.py --model hf-hub:ORG/NAME --output model.onnx --quantize int8 --benchmark

Exit status: 0 written and checked, 1 the export or its check failed (no file written), 2 a wrong argument.
"""
import sys

from sdzoo.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
