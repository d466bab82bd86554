"""Images for the ONNX export, as a model's normalised inputs: the int8 calibration set and the held-out images
that measure the quantized model's agreement. Their data sets (``CALIBRATION_IMAGES``) need no download.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sdzoo.files.checks import check_choice, check_input_size
from sdzoo.training.data import DIGITS_SPLIT_SIZES, load_data, load_digits_split, normalize, to_unit_float
from sdzoo.datasets import DATASETS
from sdzoo.training.recipes import RECIPES
from sdzoo.training.settings import Settings

__all__ = ["CALIBRATION_IMAGES", "CALIBRATION_DATASETS", "calibration_images", "calibration_split_size",
           "digits_images", "fashion_mnist_images"]


def digits_images(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                  split: str = "all") -> Tuple[np.ndarray, np.ndarray]:
    """The digits as a model's inputs: (N, C, H, W) float32 images normalised with ``mean`` and ``std`` (one
    value, or one per channel), and (N,) int64 labels. ``split`` is a fixed split ('train', 'val', 'test') or
    'all' (1,797 images, in that order): calibrate on 'train', measure on 'test'."""
    check_choice("split", split, ("all", *DIGITS_SPLIT_SIZES))
    size = check_input_size("input_size", input_size, min_side=8)
    parts = [load_digits_split(s, size[1:]) for s in (DIGITS_SPLIT_SIZES if split == "all" else [split])]
    return _model_inputs(parts, size, mean, std)


def fashion_mnist_images(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                         split: str = "all", data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``digits_images`` gives the digits: 'train' is its recipe's training split (the 60,000
    training images less the 5,000 held out), 'test' the 10,000 test images, 'all' both. Read from ``data_dir`` as
    the trainer's ``--data-dir`` (None: ~/data, then the Debian package's folder); missing files are a DataError."""
    check_choice("split", split, ("all", "train", "test"))
    size = check_input_size("input_size", input_size, min_side=8)
    recipe = RECIPES[DATASETS["fashion_mnist"].recipe]
    data = load_data("fashion_mnist", data_dir, val_size=recipe.val_size, split_seed=Settings.split_seed)
    parts = [getattr(data, s) for s in (("train", "test") if split == "all" else (split,))]
    return _model_inputs([(p.images, p.labels) for p in parts], size, mean, std)


def _model_inputs(parts: Sequence[Tuple[Tensor, Tensor]], size: Tuple[int, int, int], mean: Sequence[float],
                  std: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(images, labels) of grey data sets as a model's inputs: resized bilinearly to ``size``'s sides where they
    differ, the grey channel repeated ``size[0]`` times, normalised (one mean or std broadcast to every channel)."""
    channels, height, width = size
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(f"{name} must have 1 or {channels} values; got {len(values)}")
    images = to_unit_float(torch.cat([images[:, :1] for images, _ in parts]))
    if (height, width) != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    images = normalize(images.expand(-1, channels, -1, -1), mean, std)
    return images.numpy(), torch.cat([labels for _, labels in parts]).numpy()


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
