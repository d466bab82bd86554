"""Images for the ONNX export: the int8 calibration set and the held-out images that measure the quantized
model's agreement, as a model's normalised inputs. The data sets that provide them are those of the registry
that name a ``calibration`` function of this module (``sdzoo.datasets``); they need no download.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from sdzoo.files.checks import check_choice, check_input_size
from sdzoo.training.data import load_data, load_digits_split, normalize, to_unit_float
from sdzoo.datasets import DATASETS
from sdzoo.training.recipes import RECIPES
from sdzoo.training.settings import Settings

__all__ = ["CALIBRATION_IMAGES", "CALIBRATION_DATASETS", "calibration_images", "calibration_split_size",
           "digits_images", "fashion_mnist_images"]


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


def fashion_mnist_images(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                         split: str = "all", data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as a model's inputs, as ``digits_images``: 'train' is the training split of the recipe
    (the 60,000 training images less the 5,000 it holds out for validation), 'test' the 10,000 test images,
    'all' both. Read from ``data_dir`` as the trainer's ``--data-dir`` (None: ~/data, then the Debian package's
    folder); a ``sdzoo.training.data.DataError`` says where it looked when the files are missing."""
    check_choice("split", split, ("all", "train", "test"))
    channels, height, width = check_input_size("input_size", input_size, min_side=8)
    recipe = RECIPES[DATASETS["fashion_mnist"].recipe]
    data = load_data("fashion_mnist", data_dir, val_size=recipe.val_size, split_seed=Settings.split_seed)
    parts = [getattr(data, s) for s in (("train", "test") if split == "all" else (split,))]
    images = torch.cat([p.images for p in parts])
    labels = torch.cat([p.labels for p in parts])
    images = to_unit_float(images)
    if (height, width) != tuple(images.shape[-2:]):
        images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    images = normalize(images[:, :1].expand(-1, channels, -1, -1), _per_channel("mean", mean, channels),
                       _per_channel("std", std, channels))
    return images.numpy(), labels.numpy()


# The data sets whose images may calibrate the int8 export, and the function that gives them.
CALIBRATION_IMAGES = {"digits": digits_images, "fashion_mnist": fashion_mnist_images}
CALIBRATION_DATASETS = tuple(CALIBRATION_IMAGES)  # their names, the choices of --calib-data


def calibration_images(dataset: str, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                       split: str = "all") -> Tuple[np.ndarray, np.ndarray]:
    """One split of a calibration data set (``CALIBRATION_DATASETS``) as a model's normalised inputs, and its labels."""
    check_choice("dataset", dataset, CALIBRATION_DATASETS)
    return CALIBRATION_IMAGES[dataset](input_size, mean, std, split=split)


def calibration_split_size(dataset: str, split: str = "train") -> int:
    """The number of images in one split of a calibration data set."""
    check_choice("dataset", dataset, CALIBRATION_DATASETS)
    return DATASETS[dataset].split_sizes[split]


def _per_channel(name: str, values: Sequence[float], channels: int) -> List[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name} must have 1 or {channels} values; got {len(values)}")
    return values
