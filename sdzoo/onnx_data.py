"""Images for the ONNX export: the int8 calibration set and the held-out images that measure the quantized
model's agreement, as a model's normalised inputs. The data sets that provide them are those of the registry
that name a ``calibration`` function of this module (``sdzoo.datasets``); they need no download.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from ._checks import check_choice, check_input_size
from .data import load_digits_split, normalize
from .datasets import DATASETS

__all__ = ["CALIB_DATA", "calibration_images", "calibration_split_size", "digits_images"]

CALIB_DATA = tuple(name for name, spec in DATASETS.items() if spec.calibration)


def digits_images(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                  split: str = "all") -> Tuple[np.ndarray, np.ndarray]:
    """The digits as a model's inputs, for ONNX calibration and measurement: (N, C, H, W) float32 images,
    normalised with ``mean`` and ``std`` (one value, or one per channel), and (N,) int64 labels.

    ``split`` is one of the fixed splits ('train', 'val', 'test') or 'all' (1,797 images, in that order):
    calibrate on 'train', measure on 'test'.
    """
    split_sizes = DATASETS["digits"].split_sizes
    check_choice("split", split, ("all", *split_sizes))
    channels, height, width = check_input_size("input_size", input_size, min_side=8)
    parts = [load_digits_split(s, (height, width)) for s in (split_sizes if split == "all" else [split])]
    images = torch.cat([p[0][:, :1] for p in parts]).expand(-1, channels, -1, -1)
    labels = torch.cat([p[1] for p in parts])
    images = normalize(images, _per_channel("mean", mean, channels), _per_channel("std", std, channels))
    return images.numpy(), labels.numpy()


def calibration_images(dataset: str, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                       split: str = "all") -> Tuple[np.ndarray, np.ndarray]:
    """One split of a calibration data set (``CALIB_DATA``) as a model's normalised inputs, and its labels."""
    check_choice("dataset", dataset, CALIB_DATA)
    images = globals()[DATASETS[dataset].calibration]  # the entry's function, one of those above
    return images(input_size, mean, std, split=split)


def calibration_split_size(dataset: str, split: str = "train") -> int:
    """The number of images in one split of a calibration data set."""
    check_choice("dataset", dataset, CALIB_DATA)
    return DATASETS[dataset].split_sizes[split]


def _per_channel(name: str, values: Sequence[float], channels: int) -> List[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name} must have 1 or {channels} values; got {len(values)}")
    return values
