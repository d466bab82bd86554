"""Fixtures and markers shared by the test files.

``gpu`` tests are skipped where CUDA is not available, so the suite passes on a CPU-only machine; ``.ci/gpu``
runs them where a GPU is. ``network`` marks the tests that may fetch a package with pip (timm's sdist).
"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run .ci/gpu where one is)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)
