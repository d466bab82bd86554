"""The data sets of the training script, their fixed splits, and augmentation done on the training device.

Small data sets are held in memory as tensors (on the GPU when training there), so a batch is an index and its
augmentation one batched op; ImageFolder directories are decoded and augmented in DataLoader workers. Everything
random about an epoch is drawn up front (``EpochPlan``): a resumed epoch redraws it and skips the batches done,
and the data seen does not depend on the number of processes.
"""
from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from sdzoo.files.checks import check_choice, error_line
from sdzoo.datasets import DATASETS, DatasetSpec, dataset_names

__all__ = [
    "LOADERS", "DataError", "DIGITS_SPLIT_SIZES", "EpochPlan", "InMemoryData", "FolderData", "load_data",
    "load_digits_split", "read_idx", "read_fashion_mnist", "fashion_mnist_folder", "random_shift_flip", "normalize",
    "ColorJitter", "Lighting", "imagenet_train_transform",
]

TENSOR_DATASETS = dataset_names(on_device=True)  # the registry's data sets held in memory as tensors
DIGITS_SPLIT_SIZES = DATASETS["digits"].split_sizes
_IMAGENET = DATASETS["imagenet"]
DEFAULT_DATA_DIR = "~/data"  # --data-dir when none is given


class DataError(Exception):
    """A data set that cannot be found, downloaded or used: a user error, reported without a traceback."""


def load_digits_split(split: str, image_size: Union[int, Tuple[int, int]] = 32) -> Tuple[Tensor, Tensor]:
    """One fixed, stratified split of scikit-learn's digits: float32 images ``(N, 3, H, W)`` in [0, 1] (grey
    levels / 16, bilinearly upsampled from 8x8, not normalised) and int64 labels ``(N,)``."""
    check_choice("split", split, DIGITS_SPLIT_SIZES)
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 8 for s in size):
        raise ValueError(f"image_size must be an integer >= 8 or a (height, width) pair of them; got {image_size!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = torch.arange(len(digits.target)).numpy()
    rest, test = train_test_split(index, test_size=DIGITS_SPLIT_SIZES["test"], stratify=digits.target,
                                  random_state=0)
    train, val = train_test_split(rest, test_size=DIGITS_SPLIT_SIZES["val"], stratify=digits.target[rest],
                                  random_state=0)
    chosen = {"train": train, "val": val, "test": test}[split]
    images = torch.as_tensor(digits.images[chosen], dtype=torch.float32).div_(16.0).unsqueeze(1)
    if size != (8, 8):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return images, torch.as_tensor(digits.target[chosen], dtype=torch.int64)


# -- tensor ops on the training device -----------------------------------------------------------------------
def to_unit_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images as float32 in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [0, 255] or float [0, 1] images to float32 normalised per channel."""
    x = to_unit_float(x)
    return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)


def random_shift_flip(x: Tensor, shifts: Tensor, flips: Optional[Tensor], pad: int) -> Tensor:
    """Shift each image by ``shifts[i] = (dy, dx)`` pixels (|d| <= pad) with zero fill, then mirror it where
    ``flips[i]``: the paper's pad-and-crop + flip as two gathers over the whole batch."""
    n, c, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=x.device) + pad + shifts[:, :1].to(x.device)   # (n, h) in the padded image
    cols = torch.arange(w, device=x.device) + pad + shifts[:, 1:].to(x.device)   # (n, w)
    if flips is not None:
        cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h, x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


@dataclass
class EpochPlan:
    """Everything random about one epoch's data: the order, and each position's augmentation."""
    order: Tensor                       # (N,) permutation of the training set
    shifts: Optional[Tensor] = None     # (N, 2) int64, in-memory data with shift
    flips: Optional[Tensor] = None      # (N,) bool, in-memory data with flip
    seeds: Optional[Tensor] = None      # (N,) int64 per-image augmentation seeds, folder data

    def rank_positions(self, step: int, rank: int, world: int, local_batch: int) -> slice:
        """Positions in the epoch order of one rank's part of one global batch."""
        start = (step * world + rank) * local_batch
        return slice(start, start + local_batch)


def _shard(num: int, rank: int, world: int) -> range:
    """The contiguous part of ``range(num)`` that one rank evaluates: the first ``num % world`` ranks one more."""
    per, extra = divmod(num, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


# -- in-memory data (CIFAR, SVHN, digits, Fashion-MNIST, synthetic) -----------------------------------------
@dataclass
class Split:
    images: Tensor   # uint8 (N, C, H, W) in [0, 255] or float in [0, 1]
    labels: Tensor   # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    @staticmethod
    def cat(parts: Sequence["Split"]) -> "Split":
        return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


class _Data:
    """What both kinds of data set share: the size of an epoch and the timm data config the models are saved with."""
    crop_pct = 1.0  # of the evaluation images: 1.0 is the whole image
    in_chans = 3
    test_is_val = False

    def __init__(self, spec: DatasetSpec, classes: Optional[Sequence[str]]):
        self.name, self.mean, self.std = spec.name, tuple(spec.mean), tuple(spec.std)
        self.classes = None if classes is None else list(classes)

    def __len__(self) -> int:
        return len(self.train)

    def data_config(self) -> dict:
        size = self.image_size
        return dict(input_size=(self.in_chans, size, size), mean=self.mean, std=self.std, crop_pct=self.crop_pct,
                    interpolation="bilinear")


class InMemoryData(_Data):
    """A data set held as tensors; batches are gathered, normalised and augmented on the device."""

    def __init__(self, spec: DatasetSpec, train: Split, val: Optional[Split], test: Split,
                 classes: Optional[Sequence[str]] = None, *, shift: int = 0, hflip: bool = False,
                 num_classes: Optional[int] = None):
        super().__init__(spec, classes)
        self.train, self.val, self.test = train, val, test
        self.num_classes = num_classes or spec.num_classes
        self.shift, self.hflip = int(shift), bool(hflip)
        self.image_size, self.in_chans = int(train.images.shape[-1]), int(train.images.shape[1])

    def to(self, device: torch.device) -> "InMemoryData":
        """Keep the whole data set on the training device (a batch is then an index)."""
        self.train, self.val, self.test = (None if split is None else split.to(device)
                                           for split in (self.train, self.val, self.test))
        return self

    def plan_epoch(self, order_gen: torch.Generator, aug_gen: torch.Generator) -> EpochPlan:
        n = len(self.train)
        plan = EpochPlan(order=torch.randperm(n, generator=order_gen))
        if self.shift:
            plan.shifts = torch.randint(-self.shift, self.shift + 1, (n, 2), generator=aug_gen)
        if self.hflip:
            plan.flips = torch.rand(n, generator=aug_gen) < 0.5
        return plan

    def train_batches(self, plan: EpochPlan, start_step: int, num_steps: int, rank: int, world: int,
                      local_batch: int, device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
        images, labels = self.train.images, self.train.labels
        # The plan goes to the device once per epoch, so a step makes no host-to-device copy of it.
        order = plan.order.to(images.device)
        flips = None if plan.flips is None else plan.flips.to(device)
        shifts = None if plan.shifts is None else plan.shifts.to(device)
        if flips is not None and shifts is None:
            shifts = torch.zeros(len(order), 2, dtype=torch.long, device=device)
        for step in range(start_step, num_steps):
            pos = plan.rank_positions(step, rank, world, local_batch)
            index = order[pos]
            x = normalize(images.index_select(0, index).to(device, non_blocking=True), self.mean, self.std)
            if shifts is not None:  # after normalising, so that the zero fill is the mean colour
                x = random_shift_flip(x, shifts[pos], None if flips is None else flips[pos], self.shift)
            yield x, labels.index_select(0, index).to(device, non_blocking=True)

    def eval_batches(self, split: str, rank: int, world: int, batch_size: int,
                     device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
        data = getattr(self, split)
        part = _shard(len(data), rank, world)
        if not part:  # split() of nothing yields one empty batch; a compiled model would recompile for it
            return
        for x, y in zip(data.images[part.start:part.stop].split(batch_size),
                        data.labels[part.start:part.stop].split(batch_size)):
            yield normalize(x.to(device, non_blocking=True), self.mean, self.std), y.to(device, non_blocking=True)


def _hold_out(full: Split, val_size: int, split_seed: int, label: str) -> Tuple[Split, Optional[Split]]:
    """(train, validation): ``val_size`` images held out by a fixed draw of ``split_seed``; validation None for 0."""
    if not 0 <= val_size < len(full):
        raise DataError(f"--val-size must be in [0, {len(full)}) for {label}; got {val_size}")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(split_seed))
    val = full.subset(order[:val_size].sort().values) if val_size else None
    return full.subset(order[val_size:].sort().values), val


def _torchvision_split(spec: DatasetSpec, label: str, where: str, root: str, download: bool, **kwargs):
    """One split of a torchvision data set (whose files live in ``where``), with errors that name the path and flag."""
    import torchvision

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        return cls(root, download=False, **kwargs)
    except RuntimeError:
        if not download:
            raise DataError(
                f"--data-dir {root}: {label} not found (looked in {where}); drop --no-download to fetch it "
                f"(needs internet), or point --data-dir at the folder that holds it") from None
    try:
        return cls(root, download=True, **kwargs)
    except Exception as e:  # noqa: BLE001  (network errors come as URLError, OSError, RuntimeError, ...)
        raise DataError(
            f"--data-dir {root}: {label} is not there and downloading it failed ({error_line(e)}). "
            f"Download it on a machine with internet and copy it into {where}, or point --data-dir at "
            "the folder that holds it") from None


def _load_cifar(spec: DatasetSpec, root: str, *, download: bool, val_size: int, split_seed: int, shift: int,
                hflip: bool, **_) -> InMemoryData:
    where = os.path.join(root, spec.files)
    sets = [_torchvision_split(spec, spec.display_name, where, root, download, train=train) for train in (True, False)]
    full, test = (Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),  # NHWC -> NCHW
                        torch.as_tensor(ds.targets, dtype=torch.int64)) for ds in sets)
    train, val = _hold_out(full, val_size, split_seed, spec.display_name)
    return InMemoryData(spec, train, val, test, sets[0].classes, shift=shift, hflip=hflip)


def _load_svhn(spec: DatasetSpec, root: str, *, download: bool, val_size: int, split_seed: int, shift: int,
               hflip: bool, **_) -> InMemoryData:
    def get(split: str) -> Split:
        ds = _torchvision_split(spec, f"{spec.display_name} ({split}_32x32.mat)", root, root, download, split=split)
        return Split(torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64))

    train, extra, test = get("train"), get("extra"), get("test")
    # The paper's validation set: 400 images per class from train and 200 from extra, so a size that splits 2:1
    # over train and extra, evenly over the 10 classes.
    if val_size % 30:
        raise DataError(f"--val-size {val_size}: SVHN holds out 2/3 from train and 1/3 from extra, evenly over "
                        "10 classes, so it must be a multiple of 30 (the paper's is 6000)")
    generator = torch.Generator().manual_seed(split_seed)
    keep, held = [], []
    for part, per_class in ((train, val_size * 2 // 30), (extra, val_size // 30)):
        val_mask = torch.zeros(len(part), dtype=torch.bool)
        for c in range(spec.num_classes):
            members = (part.labels == c).nonzero().flatten()
            if per_class > len(members):
                raise DataError(f"--val-size {val_size} asks for more SVHN class-{c} images than there are")
            val_mask[members[torch.randperm(len(members), generator=generator)[:per_class]]] = True
        keep.append(part.subset(~val_mask))
        held.append(part.subset(val_mask))
    return InMemoryData(spec, Split.cat(keep), Split.cat(held) if val_size else None, test,
                        [str(c) for c in range(spec.num_classes)], shift=shift, hflip=hflip)


def _load_digits(spec: DatasetSpec, root: str, *, image_size: int, shift: int, hflip: bool, **_) -> InMemoryData:
    splits = [Split(*load_digits_split(s, image_size)) for s in ("train", "val", "test")]
    return InMemoryData(spec, *splits, [str(c) for c in range(spec.num_classes)], shift=shift, hflip=hflip)


def _load_synthetic(spec: DatasetSpec, root: str, *, image_size: int, num_classes: int, shift: int, hflip: bool,
                    **_) -> InMemoryData:
    generator = torch.Generator().manual_seed(0)

    def make(n: int) -> Split:
        images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
        return Split(images, torch.randint(0, num_classes, (n,), generator=generator))

    splits = [make(spec.split_sizes[s]) for s in ("train", "val", "test")]
    return InMemoryData(spec, *splits, shift=shift, hflip=hflip, num_classes=num_classes)


# -- Fashion-MNIST: idx files -----------------------------------------------------------------------------------
# The idx format (LeCun's MNIST page): a big-endian int32 magic 0x0000TTNN (TT the element type, 0x08 unsigned
# bytes; NN the number of dimensions), NN big-endian int32 sizes, then the elements.
IDX_UBYTE = 0x08
FASHION_MNIST_FILES = {  # split -> (images, labels) file names, without .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str, ndim: int) -> Tensor:
    """The uint8 array of an idx file of ``ndim`` dimensions, gzipped (``.gz``) or not; a file that is not one,
    or whose size does not match its header, is a ``DataError`` naming it."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a gzip stream cut short is an EOFError; a foreign one, an OSError
        raise DataError(f"{path}: cannot read it ({error_line(e)}); the file is damaged or not an idx file") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != (IDX_UBYTE << 8 | ndim):
        found = "too short for a header" if magic is None else f"magic number 0x{magic:08x}"
        raise DataError(f"{path}: not an idx file of {ndim}-dimensional unsigned bytes (expected magic number "
                        f"0x{IDX_UBYTE << 8 | ndim:08x}; {found})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, less than its {header}-byte header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path}: {what}: {len(raw)} bytes where its header ({' x '.join(map(str, shape))} "
                        f"bytes) makes {expected}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(shape)


def _idx_path(folder: str, name: str) -> Optional[str]:
    """The file ``name`` in ``folder``, uncompressed or gzipped (None if neither is there)."""
    paths = (os.path.join(folder, name), os.path.join(folder, name + ".gz"))
    return next((path for path in paths if os.path.isfile(path)), None)


def fashion_mnist_folder(spec: DatasetSpec, data_dir: Optional[str]) -> str:
    """The folder of the four idx files: ``data_dir`` or torchvision's layout under it; without a ``data_dir``,
    the default data folder (the same two places) or the system package's folder."""
    root = os.path.expanduser(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    places = [root, os.path.join(root, spec.files)]
    if data_dir is None and spec.system_dir:
        places.append(spec.system_dir)
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for place in places:
        missing = [name for name in names if not _idx_path(place, name)]
        if not missing:
            return place
        if len(missing) < len(names):
            raise DataError(f"{spec.display_name}: {place} holds some of its idx files but not "
                            f"{', '.join(name + '[.gz]' for name in missing)}")
    flag = "--data-dir" if data_dir is not None else "no --data-dir given"
    raise DataError(
        f"{spec.display_name} not found ({flag}; looked for {', '.join(n + '[.gz]' for n in names)} in "
        f"{', '.join(places)}). Nothing is downloaded: install the package {spec.system_package} "
        f"(apt-get install {spec.system_package}), or on a machine with internet run "
        f"torchvision.datasets.{spec.torchvision_class}(ROOT, download=True) and pass --data-dir ROOT")


def read_fashion_mnist(folder: str, split: str, image_size: int = 28) -> Split:
    """One split ('train' or 'test') of the idx files in ``folder``: uint8 images ``(N, 1, 28, 28)`` and int64
    labels, checked to agree in number, size and classes."""
    check_choice("split", split, FASHION_MNIST_FILES)
    image_path, label_path = (_idx_path(folder, name) for name in FASHION_MNIST_FILES[split])
    for path, name in zip((image_path, label_path), FASHION_MNIST_FILES[split]):
        if path is None:
            raise DataError(f"{os.path.join(folder, name)}[.gz] not found")
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if tuple(images.shape[1:]) != (image_size, image_size):
        raise DataError(f"{image_path}: images of {images.shape[1]}x{images.shape[2]} pixels; Fashion-MNIST's "
                        f"are {image_size}x{image_size}")
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
    if len(labels) and int(labels.max()) >= 10:
        raise DataError(f"{label_path}: label {int(labels.max())}; Fashion-MNIST's classes are 0..9")
    return Split(images.unsqueeze(1).clone(), labels.long())


def _load_fashion_mnist(spec: DatasetSpec, data_dir: Optional[str], *, val_size: int, split_seed: int, shift: int,
                        hflip: bool, **_) -> InMemoryData:
    from torchvision.datasets import FashionMNIST  # its class names, no files

    folder = fashion_mnist_folder(spec, data_dir)
    full, test = (read_fashion_mnist(folder, split, spec.image_size) for split in ("train", "test"))
    train, val = _hold_out(full, val_size, split_seed, spec.display_name)
    return InMemoryData(spec, train, val, test, FashionMNIST.classes, shift=shift, hflip=hflip)


# -- ImageFolder-style directories ---------------------------------------------------------------------------
# fb.resnet.torch's colour augmentation on float RGB images in [0, 1], hand-written: torchvision's ColorJitter
# clamps after each step where fb.resnet.torch does not, and neither torchvision nor timm has the PCA lighting.
def _grey(image: Tensor) -> Tensor:
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).expand_as(image)


class ColorJitter(torch.nn.Module):
    """fb.resnet.torch's ``ColorJitter``: brightness, contrast and saturation in a random order, each a blend
    ``alpha * image + (1 - alpha) * other``, ``alpha ~ U(1 - v, 1 + v)``, with black, the mean grey level or the
    grey image; unclamped. Draws from torch's global generator (seeded per image by the loader)."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
        super().__init__()
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def forward(self, image: Tensor) -> Tensor:
        steps = [(v, other) for v, other in ((self.brightness, torch.zeros_like),
                                             (self.contrast, lambda img: _grey(img).mean().expand_as(img)),
                                             (self.saturation, _grey)) if v]
        for i in torch.randperm(len(steps)).tolist():
            var, other = steps[i]
            alpha = 1.0 + float(torch.empty(()).uniform_(-var, var))
            image = alpha * image + (1.0 - alpha) * other(image)
        return image

    def extra_repr(self) -> str:
        return f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}"


class Lighting(torch.nn.Module):
    """AlexNet's PCA lighting noise as fb.resnet.torch's ``Lighting``: adds ``eigvec @ (alpha * eigval)`` to the
    RGB channels, ``alpha ~ N(0, alphastd)`` per image; unclamped."""

    def __init__(self, alphastd: float = 0.1, eigval: Sequence[float] = _IMAGENET.pca_eigval,
                 eigvec: Sequence[Sequence[float]] = _IMAGENET.pca_eigvec):
        super().__init__()
        self.alphastd = float(alphastd)
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        if self.alphastd == 0:
            return image
        alpha = torch.empty(3).normal_(0.0, self.alphastd)
        return image + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}"


def imagenet_train_transform(image_size: int, hflip: bool = True, color_jitter: float = 0.4,
                             lighting: float = 0.1):
    """fb.resnet.torch's ImageNet training transform of a PIL image: RandomSizedCrop (8-100% of the area, aspect
    3/4-4/3, bicubic), flip, ColorJitter, Lighting; a float32 tensor with jitter or lighting, else uint8. Flipping
    before the per-pixel colour steps gives the images of fb.resnet.torch's flip after them."""
    from torchvision import transforms as T

    steps = [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                 interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.PILToTensor())
    if color_jitter or lighting:
        steps.append(T.ConvertImageDtype(torch.float32))  # [0, 1], the range of fb.resnet.torch's constants
    if color_jitter:
        steps.append(ColorJitter(color_jitter, color_jitter, color_jitter))
    if lighting:
        steps.append(Lighting(lighting))
    return T.Compose(steps)


class _SeededTransform(torch.utils.data.Dataset):
    """PIL images asked for as ``(index, seed)``: an image's augmentation is a function of its seed alone, not of
    the loader's worker count or where a resumed epoch starts."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        image, label = self.images[index]
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone (workers=0)
            torch.manual_seed(int(seed))
            return self.transform(image), label


def _class_names(images) -> List[str]:
    """The classes of a timm ImageDataset, in the order of their indices."""
    class_to_idx = images.reader.class_to_idx
    return sorted(class_to_idx, key=class_to_idx.get)


def _check_classes(root: str, split: str, classes: List[str], train_classes: List[str]) -> None:
    if "" in classes:  # timm's reader labels the images that lie in the split folder itself ''
        raise DataError(f"--data-dir {root}: {split}/ holds images outside class folders; put each class's "
                        f"images in a sub-folder of {split}/ named after the class")
    if classes != train_classes:
        missing, extra = sorted(set(train_classes) - set(classes)), sorted(set(classes) - set(train_classes))
        detail = "; ".join(f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for what, names in (("missing", missing), ("not in train/", extra)) if names)
        raise DataError(f"--data-dir {root}: the class folders of {split}/ differ from those of train/ ({detail})")


class FolderData(_Data):
    """An ImageFolder-style directory read with timm's folder reader, decoded and augmented by DataLoader
    workers (uint8 batches; float32 training batches with colour jitter or lighting)."""
    crop_pct = 0.875  # evaluation: shorter side resized to size / 0.875 (256 for 224), then the centre crop

    def __init__(self, spec: DatasetSpec, root: str, *, image_size: int, hflip: bool, workers: int,
                 color_jitter: float = 0.0, lighting: float = 0.0, **_):
        from timm.data import create_dataset, create_transform

        for path in (os.path.join(root, "train"), os.path.join(root, "val")):
            if not os.path.isdir(path):
                raise DataError(
                    f"--data-dir {root}: expected an ImageFolder-style directory with train/ and val/ "
                    f"sub-folders (one folder of images per class, optionally test/ too); {path} not found")
        super().__init__(spec, None)
        self.root, self.image_size, self.workers = root, int(image_size), int(workers)
        self.train_transform = imagenet_train_transform(image_size, hflip, color_jitter, lighting)
        # timm's eval transform of the saved cfg; use_prefetcher: uint8 tensors, normalised on the device.
        self.eval_transform = create_transform(**self.data_config(), is_training=False, use_prefetcher=True)
        splits = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
        try:
            # Each split by its own path and class index: timm's split search falls back to the whole root, and
            # given train/'s class_map its reader would silently drop the images of classes train/ lacks.
            folders = {s: create_dataset("", root=os.path.join(root, s), search_split=False,
                                         transform=None if s == "train" else self.eval_transform) for s in splits}
        except RuntimeError as e:  # a split without images
            raise DataError(f"--data-dir {root}: {e}") from None
        self.classes = _class_names(folders["train"])
        for split, folder in folders.items():
            _check_classes(root, split, _class_names(folder), self.classes)
        self.num_classes = len(self.classes)
        self.test_is_val = "test" not in folders
        self.train = _SeededTransform(folders["train"], self.train_transform)
        self.val = folders["val"]
        self.test = folders.get("test", self.val)

    def to(self, device: torch.device) -> "FolderData":
        return self

    def plan_epoch(self, order_gen: torch.Generator, aug_gen: torch.Generator) -> EpochPlan:
        n = len(self.train)
        return EpochPlan(order=torch.randperm(n, generator=order_gen),
                         seeds=torch.randint(0, 2 ** 62, (n,), generator=aug_gen))

    def _batches(self, dataset, batches, device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
        # Not timm's create_loader: its samplers would replace the seeded epoch plan (and the bit-exact resume),
        # and its OrderedDistributedSampler pads evaluation shards with repeated images.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                                             pin_memory=device.type == "cuda")
        for x, y in loader:
            yield normalize(x.to(device, non_blocking=True), self.mean, self.std), y.to(device, non_blocking=True)

    def train_batches(self, plan: EpochPlan, start_step: int, num_steps: int, rank: int, world: int,
                      local_batch: int, device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
        positions = [plan.rank_positions(step, rank, world, local_batch) for step in range(start_step, num_steps)]
        batches = [list(zip(plan.order[pos].tolist(), plan.seeds[pos].tolist())) for pos in positions]
        yield from self._batches(self.train, batches, device)

    def eval_batches(self, split: str, rank: int, world: int, batch_size: int,
                     device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
        images = getattr(self, split)
        part = _shard(len(images), rank, world)
        yield from self._batches(images, torch.utils.data.BatchSampler(part, batch_size, drop_last=False), device)


# The loader of each data set of the registry (tests/test_data.py checks that every entry has one).
LOADERS: Dict[str, Callable[..., Any]] = {
    "cifar10": _load_cifar, "cifar100": _load_cifar, "svhn": _load_svhn, "imagenet": FolderData,
    "imagefolder": FolderData, "digits": _load_digits, "synthetic": _load_synthetic,
    "fashion_mnist": _load_fashion_mnist,
}


def load_data(name: str, data_dir: Optional[str] = None, *, download: bool = True, val_size: int = 0,
              split_seed: int = 1, image_size: int = 32, num_classes: int = 10, shift: int = 0,
              hflip: bool = False, workers: int = 4, color_jitter: float = 0.0, lighting: float = 0.0):
    """Load a data set by ``--dataset`` name: an ``InMemoryData`` or a ``FolderData``. ``shift`` applies to
    in-memory data, ``color_jitter`` and ``lighting`` (fb.resnet.torch's 0.4 and 0.1) to folder data.
    ``data_dir`` None is ``~/data`` (and, for a data set a system package installs, that package's folder)."""
    if name not in DATASETS:
        raise DataError(f"--dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    spec = DATASETS[name]
    if spec.system_dir is None:  # only a data set with a system folder tells "no --data-dir" apart
        data_dir = os.path.expanduser(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    return LOADERS[name](spec, data_dir, download=download, val_size=val_size, split_seed=split_seed,
                         image_size=image_size, num_classes=num_classes, shift=shift, hflip=hflip, workers=workers,
                         color_jitter=color_jitter, lighting=lighting)
