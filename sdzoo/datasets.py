"""The data sets of sdzoo, one entry each: all the package knows about a data set. Adding one is an entry here, its
loader in ``sdzoo.training.data.LOADERS`` and, if its images may calibrate the int8 export, a function in
``sdzoo.export.calibration.CALIBRATION_IMAGES``. Free of imports, so that the models do not import the data pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

__all__ = ["DatasetSpec", "DATASETS", "dataset_names"]


@dataclass(frozen=True)
class DatasetSpec:
    """What sdzoo knows about one data set (``DATASETS[name]``)."""
    name: str                                # the --dataset value
    mean: Tuple[float, ...]                  # per-channel statistics of the training images (values in [0, 1])
    std: Tuple[float, ...]
    on_device: bool                          # held in memory as tensors, augmented on the training device;
    #                                          else a folder read and augmented by DataLoader workers
    recipe: Optional[str] = None             # the recipe (sdzoo.training.recipes) it trains with, unless --recipe
    display_name: Optional[str] = None       # in the model card (None: the name)
    hub_id: Optional[str] = None             # the Hub data set id the model card links
    num_classes: Optional[int] = None        # its fixed class count; None: its class folders or --num-classes
    in_chans: int = 3                        # channels of its images, and of the models trained on them
    classes_by_flag: bool = False            # --num-classes sets its class count
    image_size: Optional[int] = None         # its fixed image side; None: --image-size sets it
    val_split: bool = False                  # --val-size holds out part of its training set for validation
    split_sizes: Optional[Dict[str, int]] = field(default=None, hash=False)  # its fixed splits, where it has them
    files: Optional[str] = None              # the folder of torchvision's files under --data-dir
    system_dir: Optional[str] = None         # where a system package puts its files (read without --data-dir)
    system_package: Optional[str] = None     # that package
    torchvision_class: Optional[str] = None  # the torchvision.datasets class that reads them
    cifar_tag: bool = False                  # the zoo's CIFAR-layout models have a cfg tag for it
    pca_eigval: Optional[Tuple[float, ...]] = None  # principal components of its RGB pixels for fb.resnet.torch's
    pca_eigvec: Optional[Tuple[Tuple[float, ...], ...]] = None  # lighting noise; the columns are the eigenvectors

    @property
    def title(self) -> str:
        """The name the model card shows."""
        return self.display_name or self.name


_IMAGENET = DatasetSpec(
    name="imagenet", recipe="imagenet", on_device=False, display_name="ImageNet-1k", hub_id="ILSVRC/imagenet-1k",
    num_classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    # As fb.resnet.torch's datasets/imagenet.lua gives them.
    pca_eigval=(0.2175, 0.0188, 0.0045),
    pca_eigvec=((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203)))

DATASETS: Dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec(
        name="cifar10", recipe="cifar10", on_device=True, display_name="CIFAR-10", hub_id="uoft-cs/cifar10",
        num_classes=10, image_size=32, val_split=True, files="cifar-10-batches-py", torchvision_class="CIFAR10",
        cifar_tag=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    DatasetSpec(
        name="cifar100", recipe="cifar100", on_device=True, display_name="CIFAR-100", hub_id="uoft-cs/cifar100",
        num_classes=100, image_size=32, val_split=True, files="cifar-100-python", torchvision_class="CIFAR100",
        cifar_tag=True, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    DatasetSpec(
        name="svhn", recipe="svhn", on_device=True, display_name="SVHN", hub_id="ufldl-stanford/svhn",
        num_classes=10, image_size=32, val_split=True, torchvision_class="SVHN", cifar_tag=True,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
    _IMAGENET,
    # Any ImageFolder-style directory: ImageNet's statistics and recipe, its classes from its folders.
    replace(_IMAGENET, name="imagefolder", display_name=None, hub_id=None, num_classes=None),
    DatasetSpec(
        name="digits", recipe="digits", on_device=True,
        display_name="scikit-learn handwritten digits (8x8 images, upsampled)", num_classes=10,
        split_sizes={"train": 1257, "val": 180, "test": 360},
        # The training split's pixels / 16, one grey channel repeated three times (tests/test_data.py checks).
        mean=(0.3049,) * 3, std=(0.3758,) * 3),
    DatasetSpec(
        name="synthetic", recipe="synthetic", on_device=True,
        display_name="random images and labels (a throughput run: nothing was learned)", classes_by_flag=True,
        split_sizes={"train": 2560, "val": 256, "test": 256}, mean=(0.5,) * 3, std=(0.29,) * 3),
    # Read from its four idx files, gzipped or not; nothing is downloaded. Its recipe holds out 5,000 of the 60,000
    # training images, as the paper's CIFAR protocol does.
    DatasetSpec(
        name="fashion_mnist", recipe="fashion_mnist", on_device=True, display_name="Fashion-MNIST",
        hub_id="zalando-datasets/fashion_mnist", num_classes=10, in_chans=1, image_size=28, val_split=True,
        files="FashionMNIST/raw", torchvision_class="FashionMNIST", system_dir="/usr/share/datasets/fashion-mnist",
        system_package="dataset-fashion-mnist", cifar_tag=True,
        split_sizes={"train": 55000, "val": 5000, "test": 10000},
        # The 60,000 training images' pixels / 255 (tests/test_fashion_mnist.py checks).
        mean=(0.2860,), std=(0.3530,)),
)}


def dataset_names(**where) -> Tuple[str, ...]:
    """The names of the data sets whose entries have the given values, e.g. ``dataset_names(on_device=True)``."""
    return tuple(name for name, spec in DATASETS.items()
                 if all(getattr(spec, key) == value for key, value in where.items()))
