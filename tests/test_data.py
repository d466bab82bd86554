"""Data: digits splits, statistics and model inputs, the on-device shift + flip, epoch plans, missing data sets,
ImageFolder directories, and fb.resnet.torch's ImageNet augmentation (colour jitter, PCA lighting)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdzoo.datasets import DATASETS
from sdzoo.export.calibration import digits_images
from sdzoo.training.data import (
    DIGITS_SPLIT_SIZES, ColorJitter, DataError, Lighting, load_data, load_digits_split, normalize, random_shift_flip)
from sdzoo.training.recipes import RECIPES

DIGITS_MEAN, DIGITS_STD = DATASETS["digits"].mean, DATASETS["digits"].std
IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC = DATASETS["imagenet"].pca_eigval, DATASETS["imagenet"].pca_eigvec


def test_digits_splits_are_fixed_disjoint_and_cover_the_set():
    seen = []
    for split, size in DIGITS_SPLIT_SIZES.items():
        images, labels = load_digits_split(split, image_size=16)
        assert images.shape == (size, 3, 16, 16) and images.dtype == torch.float32
        assert labels.shape == (size,) and set(labels.tolist()) == set(range(10))
        assert 0.0 <= images.min() and images.max() <= 1.0
        again, _ = load_digits_split(split, image_size=16)
        assert torch.equal(images, again)
        seen.append(images[:, 0].flatten(1))
    rows = torch.cat(seen)
    assert len(rows) == 1797
    # together the splits hold every image of the set once (compared at 8x8, where nothing is resampled)
    from sklearn.datasets import load_digits
    full = torch.as_tensor(load_digits().images, dtype=torch.float32).div(16).flatten(1)
    union = torch.cat([load_digits_split(split, image_size=8)[0][:, 0].flatten(1) for split in DIGITS_SPLIT_SIZES])
    for a, b in zip(torch.unique(union, dim=0, return_counts=True), torch.unique(full, dim=0, return_counts=True)):
        assert torch.equal(a, b)


def test_digits_mean_std_match_the_training_split():
    images, _ = load_digits_split("train", image_size=8)
    assert images.mean().item() == pytest.approx(DIGITS_MEAN[0], abs=1e-4)
    assert images.std().item() == pytest.approx(DIGITS_STD[0], abs=1e-4)


def test_digits_images_are_normalised_model_inputs():
    images, labels = digits_images((3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.5))
    assert images.shape == (1797, 3, 32, 32) and images.dtype == np.float32
    assert sorted(set(labels.tolist())) == list(range(10))
    # the training split, as the training data normalises it
    train, train_labels = digits_images((3, 16, 16), DIGITS_MEAN, DIGITS_STD, split="train")
    split_images, split_labels = load_digits_split("train", image_size=16)
    assert torch.equal(torch.from_numpy(train), normalize(split_images, DIGITS_MEAN, DIGITS_STD))
    assert torch.equal(torch.from_numpy(train_labels), split_labels)
    # any channel count and a non-square size; the splits do not overlap
    train, _ = digits_images((1, 16, 24), mean=(0.5,), std=(0.25,), split="train")
    test, _ = digits_images((1, 16, 24), mean=(0.5,), std=(0.25,), split="test")
    assert train.shape == (1257, 1, 16, 24) and test.shape == (360, 1, 16, 24)
    assert not any(np.array_equal(test[0], t) for t in train)
    # undo the normalisation: every channel holds the same [0, 1] digit
    raw = images * np.array([0.25, 0.2, 0.5]).reshape(1, 3, 1, 1) + np.array([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1)
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    np.testing.assert_allclose(raw[:, 0], raw[:, 2], atol=1e-5)
    with pytest.raises(ValueError, match="split must be one of 'all', 'train', 'val', 'test'; got 'holdout'"):
        digits_images((3, 32, 32), (0.5,), (0.25,), split="holdout")
    with pytest.raises(ValueError, match=r"input_size must be \(channels, height, width\)"):
        digits_images((32, 32), (0.5,), (0.25,))
    with pytest.raises(ValueError, match="mean must have 1 or 3 values; got 2"):
        digits_images((3, 32, 32), (0.5, 0.5), (0.25,))


def _shift_flip_reference(x, shifts, flips, pad):
    out = torch.empty_like(x)
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    for i in range(len(x)):
        dy, dx = shifts[i].tolist()
        crop = padded[i, :, pad + dy: pad + dy + h, pad + dx: pad + dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def test_random_shift_flip_matches_a_per_image_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 10, 12, generator=g)
    shifts = torch.randint(-4, 5, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    assert torch.equal(random_shift_flip(x, shifts, flips, 4), _shift_flip_reference(x, shifts, flips, 4))
    # zero shift and no flip is the identity; a full shift fills with zeros
    assert torch.equal(random_shift_flip(x, torch.zeros(16, 2, dtype=torch.long), None, 4), x)
    moved = random_shift_flip(x, torch.full((16, 2), 4), None, 4)
    assert torch.all(moved[..., -4:, :] == 0) and torch.equal(moved[..., :-4, :-4], x[..., 4:, 4:])


def test_rank_slices_of_a_plan_make_up_the_global_batch():
    data = load_data("digits", image_size=8, shift=1, hflip=True)
    plan = data.plan_epoch(torch.Generator().manual_seed(3), torch.Generator().manual_seed(4))
    cpu = torch.device("cpu")
    whole = list(data.train_batches(plan, 0, 3, 0, 1, 8, cpu))
    halves = [list(data.train_batches(plan, 0, 3, r, 2, 4, cpu)) for r in (0, 1)]
    for step in range(3):
        x = torch.cat([halves[0][step][0], halves[1][step][0]])
        y = torch.cat([halves[0][step][1], halves[1][step][1]])
        assert torch.equal(x, whole[step][0]) and torch.equal(y, whole[step][1])
    # a resumed epoch starts at its step and sees the same batches
    assert torch.equal(next(data.train_batches(plan, 2, 3, 0, 1, 8, cpu))[0], whole[2][0])


def test_missing_data_sets_name_the_path_and_the_flag(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(DataError, match="--data-dir .*nothing.*CIFAR-10 not found.*--no-download"):
        load_data("cifar10", str(missing), download=False)
    with pytest.raises(DataError, match="--data-dir .*nothing.*train/ and val/"):
        load_data("imagefolder", str(missing))


def test_a_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, root, download=False, **kwargs):
            if download:
                raise OSError("network is unreachable")
            super().__init__(root, download=False, **kwargs)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataError, match=r"--data-dir .*downloading it failed \(OSError: network is unreachable\)"):
        load_data("cifar10", str(tmp_path), download=True)


def _image_folder(root, size=20):
    """A tiny ImageFolder: train/ and val/, two classes of four random images each."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            for i in range(4):
                pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder_batches_are_deterministic_per_image(tmp_path):
    _image_folder(tmp_path)
    data = load_data("imagefolder", str(tmp_path), image_size=16, hflip=True, workers=0)
    assert data.num_classes == 2 and data.test_is_val and len(data) == 8
    plan = data.plan_epoch(torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    cpu = torch.device("cpu")
    first = [x for x, _ in data.train_batches(plan, 0, 2, 0, 1, 4, cpu)]
    second = [x for x, _ in data.train_batches(plan, 0, 2, 0, 1, 4, cpu)]
    assert first[0].shape == (4, 3, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(next(data.train_batches(plan, 1, 2, 0, 1, 4, cpu))[0], first[1])


def test_imagefolder_eval_transform_is_the_resize_and_centre_crop_of_before(tmp_path):
    """timm's eval transform gives, pixel for pixel, what Resize(floor(size / 0.875)) + CenterCrop + PILToTensor
    gave: uint8 images, normalised on the device."""
    from PIL import Image
    from torchvision import transforms as T

    _image_folder(tmp_path)
    g = torch.Generator().manual_seed(1)
    for i, (h, w) in enumerate(((37, 51), (64, 30), (16, 16), (300, 200))):
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(pixels).save(tmp_path / "val" / "b" / f"sized{i}.png")
    data = load_data("imagefolder", str(tmp_path), image_size=16, workers=0)
    before = T.Compose([T.Resize(math.floor(16 / 0.875)), T.CenterCrop(16), T.PILToTensor()])
    paths = data.val.filenames(absolute=True)
    assert len(paths) == len(data.val) == 12
    for i, path in enumerate(paths):
        image, label = data.val[i]
        assert image.dtype == torch.uint8 and torch.equal(image, before(Image.open(path).convert("RGB"))), path
        assert data.classes[label] == os.path.basename(os.path.dirname(path))
    x, y = next(data.eval_batches("val", 0, 1, 12, torch.device("cpu")))
    assert torch.equal(x, normalize(torch.stack([data.val[i][0] for i in range(12)]), data.mean, data.std))
    assert y.tolist() == [data.val[i][1] for i in range(12)]


def test_imagefolder_evaluation_shards_hold_each_image_once(tmp_path):
    _image_folder(tmp_path)
    data = load_data("imagefolder", str(tmp_path), image_size=16, workers=0)
    cpu = torch.device("cpu")
    whole = list(data.eval_batches("test", 0, 1, 3, cpu))
    shards = [batch for rank in range(3) for batch in data.eval_batches("test", rank, 3, 2, cpu)]
    for part in (0, 1):
        assert torch.equal(torch.cat([b[part] for b in shards]), torch.cat([b[part] for b in whole]))
    assert sum(len(y) for _, y in shards) == 8  # 3 + 3 + 2: no shard is padded with repeated images


def test_imagefolder_splits_must_have_the_same_class_folders(tmp_path):
    import shutil

    def folder(name):
        _image_folder(tmp_path / name)
        return tmp_path / name

    root = folder("extra")
    shutil.copytree(root / "val" / "b", root / "val" / "c")
    with pytest.raises(DataError, match=r"--data-dir .*extra: the class folders of val/ differ from those of "
                                        r"train/ \(not in train/: c\)"):
        load_data("imagefolder", str(root))
    root = folder("missing")
    shutil.rmtree(root / "val" / "b")
    with pytest.raises(DataError, match=r"class folders of val/ differ .*\(missing: b\)"):
        load_data("imagefolder", str(root))
    root = folder("loose")
    shutil.copy(root / "train" / "a" / "0.png", root / "train" / "0.png")
    with pytest.raises(DataError, match="--data-dir .*loose: train/ holds images outside class folders"):
        load_data("imagefolder", str(root))
    root = folder("empty")
    os.makedirs(root / "test")
    with pytest.raises(DataError, match="--data-dir .*empty: Found 0 images in subfolders of .*test"):
        load_data("imagefolder", str(root))


class _FakeTorchvision:
    """Stand-ins for torchvision's CIFAR10 / SVHN classes: the same attributes, small random contents."""

    @staticmethod
    def cifar(sizes):
        class FakeCIFAR10:
            classes = [f"class{i}" for i in range(10)]

            def __init__(self, root, train=True, download=False):
                n = sizes["train" if train else "test"]
                g = torch.Generator().manual_seed(0 if train else 1)
                self.data = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
                self.targets = (torch.arange(n) % 10).tolist()
        return FakeCIFAR10

    @staticmethod
    def svhn(sizes):
        class FakeSVHN:
            def __init__(self, root, split="train", download=False):
                n = sizes[split]
                g = torch.Generator().manual_seed(("train", "extra", "test").index(split))
                self.data = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).numpy()
                self.labels = (torch.arange(n) % 10).numpy()
        return FakeSVHN


def test_cifar_split_holds_out_a_fixed_validation_set(monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeTorchvision.cifar({"train": 100, "test": 20}))
    data = load_data("cifar10", val_size=10, split_seed=1, shift=4, hflip=True)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 20)
    assert data.train.images.shape == (90, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.classes[0] == "class0" and data.num_classes == 10
    full = torch.from_numpy(torchvision.datasets.CIFAR10("x").data).permute(0, 3, 1, 2)
    pooled = torch.cat([data.train.images, data.val.images]).flatten(1)
    assert torch.equal(torch.unique(pooled, dim=0), torch.unique(full.flatten(1), dim=0))  # a partition
    again = load_data("cifar10", val_size=10, split_seed=1)
    assert torch.equal(again.val.images, data.val.images)
    other = load_data("cifar10", val_size=10, split_seed=2)
    assert not torch.equal(other.val.images, data.val.images)


def test_svhn_validation_set_takes_two_thirds_from_train_and_one_third_from_extra(monkeypatch):
    import torchvision

    sizes = {"train": 200, "extra": 300, "test": 50}
    monkeypatch.setattr(torchvision.datasets, "SVHN", _FakeTorchvision.svhn(sizes))
    data = load_data("svhn", val_size=60)  # 4 per class from train, 2 per class from extra
    assert len(data.val) == 60 and len(data.train) == 500 - 60 and len(data.test) == 50
    assert torch.equal(data.val.labels.bincount(), torch.full((10,), 6))
    train_rows = torch.from_numpy(torchvision.datasets.SVHN("x", split="train").data).flatten(1)
    from_train = sum(bool((train_rows == row).all(1).any()) for row in data.val.images.flatten(1))
    assert from_train == 40


# -- fb.resnet.torch's ImageNet augmentation -----------------------------------------------------------------
def test_imagenet_training_transform_has_the_jitter_and_lighting_of_fb_resnet_torch(tmp_path):
    _image_folder(tmp_path, size=24)
    recipe = RECIPES["imagenet"]
    assert (recipe.color_jitter, recipe.lighting) == (0.4, 0.1)
    data = load_data("imagefolder", str(tmp_path), image_size=16, hflip=True, workers=0,
                     color_jitter=recipe.color_jitter, lighting=recipe.lighting)
    steps = data.train_transform.transforms
    names = [type(t).__name__ for t in steps]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor", "ConvertImageDtype", "ColorJitter",
                     "Lighting"]
    crop, jitter, lighting = steps[0], steps[4], steps[5]
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert (jitter.brightness, jitter.contrast, jitter.saturation) == (0.4, 0.4, 0.4)
    assert lighting.alphastd == 0.1
    assert lighting.eigval.tolist() == pytest.approx([0.2175, 0.0188, 0.0045])
    assert lighting.eigvec[0].tolist() == pytest.approx([-0.5675, 0.7192, 0.4009])

    # The same epoch plan with and without jitter + lighting: the same crops and flips, other colours.
    plain = load_data("imagefolder", str(tmp_path), image_size=16, hflip=True, workers=0)
    assert [type(t).__name__ for t in plain.train_transform.transforms] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor"]
    plan = data.plan_epoch(torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    cpu = torch.device("cpu")
    jittered = next(data.train_batches(plan, 0, 1, 0, 1, 4, cpu))[0]
    original = next(plain.train_batches(plan, 0, 1, 0, 1, 4, cpu))[0]
    assert jittered.dtype == original.dtype == torch.float32 and jittered.shape == (4, 3, 16, 16)
    difference = (jittered - original).abs().flatten(1).amax(1)
    assert (difference > 0.05).all()  # every image's colours changed
    again = next(data.train_batches(plan, 0, 1, 0, 1, 4, cpu))[0]
    assert torch.equal(jittered, again)  # a function of the image's seed


def _lighting_reference(image, alpha):
    """fb.resnet.torch's Lighting, written as transforms.lua does it: rgb[i] = sum_j eigvec[i][j] alpha[j] eigval[j]."""
    out = image.clone()
    for i in range(3):
        out[i] += sum(IMAGENET_PCA_EIGVEC[i][j] * float(alpha[j]) * IMAGENET_PCA_EIGVAL[j] for j in range(3))
    return out


def test_lighting_adds_the_pca_offset_and_does_not_clamp():
    image = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    out = Lighting(0.1)(image)
    torch.manual_seed(3)
    alpha = torch.empty(3).normal_(0.0, 0.1)
    assert torch.allclose(out, _lighting_reference(image, alpha), atol=1e-6)
    assert not torch.equal(out, image)
    assert torch.equal(Lighting(0.0)(image), image)
    white = torch.ones(3, 2, 2)
    assert any((Lighting(0.1)(white) > 1).any() for _ in range(10))  # no clamp to [0, 1]


def test_color_jitter_blends_as_fb_resnet_torch():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 6, 7, generator=g)
    grey_weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    grey = (image * grey_weights).sum(0, keepdim=True).expand_as(image)
    for seed in range(5):
        torch.manual_seed(seed)
        # brightness: alpha * image, alpha in [0.6, 1.4], not clamped
        ratio = ColorJitter(0.4, 0, 0)(image) / image
        assert torch.allclose(ratio, ratio.flatten()[0]) and 0.6 <= ratio.flatten()[0] <= 1.4
        # contrast: a blend with the mean grey level
        mean = grey.mean()
        out = ColorJitter(0, 0.4, 0)(image)
        scale = (out - mean) / (image - mean)
        assert torch.allclose(scale, scale.flatten()[0], atol=1e-4) and 0.6 - 1e-4 <= scale.flatten()[0] <= 1.4 + 1e-4
        # saturation: a blend with the grey image, which it leaves alone
        out = ColorJitter(0, 0, 0.4)(image)
        scale = (out - grey) / (image - grey)
        assert torch.allclose(scale, scale.flatten()[0], atol=1e-3)
        flat_grey = torch.full((3, 4, 4), 0.3)
        assert torch.allclose(ColorJitter(0, 0, 0.4)(flat_grey), flat_grey)
    assert any((ColorJitter(0.4, 0.4, 0.4)(torch.ones(3, 2, 2)) > 1).any() for _ in range(20))  # no clamp


# -- the registry (sdzoo.datasets) ----------------------------------------------------------------------------
def test_registry_entries_are_what_every_module_reads():
    import dataclasses

    import sdzoo.training.data
    from sdzoo.hub import model_card
    from sdzoo.export import calibration as onnx_data
    from sdzoo.datasets import DATASETS
    from sdzoo.training.recipes import recipe_for_dataset
    from sdzoo.training.settings import build_parser
    from timm.models import get_pretrained_cfg

    choices = next(a.choices for a in build_parser()._actions if a.dest == "dataset")
    assert list(choices) == list(DATASETS) == list(sdzoo.training.data.LOADERS)
    assert sdzoo.training.data.TENSOR_DATASETS == tuple(n for n, d in DATASETS.items() if d.on_device)
    assert DIGITS_SPLIT_SIZES is DATASETS["digits"].split_sizes
    for name, spec in DATASETS.items():
        assert spec.name == name and len(spec.mean) == len(spec.std) == spec.in_chans
        assert callable(sdzoo.training.data.LOADERS[name]), name
        assert recipe_for_dataset(name) == spec.recipe and spec.recipe in RECIPES, name
        assert RECIPES[spec.recipe].dataset in (name, "imagenet"), name
        assert model_card.RunResults(name, 1.0, 1).dataset_name == spec.title
        if name in onnx_data.CALIBRATION_IMAGES:
            assert spec.split_sizes and callable(onnx_data.CALIBRATION_IMAGES[name])
        if spec.cifar_tag:  # the zoo's cfgs carry the entry's statistics and classes
            cfg = get_pretrained_cfg(f"sd_resnet110_cifar.{name}")
            assert (cfg.mean, cfg.std, cfg.num_classes) == (spec.mean, spec.std, spec.num_classes)
            assert cfg.input_size == (spec.in_chans, spec.image_size, spec.image_size)
    assert onnx_data.CALIBRATION_DATASETS == ("digits", "fashion_mnist")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASETS["digits"].mean = (0.5,) * 3


def test_a_data_set_is_one_registry_entry_and_its_loader(monkeypatch):
    import dataclasses

    from sdzoo.datasets import DATASETS
    from sdzoo.training.data import LOADERS
    from sdzoo.training.recipes import recipe_for_dataset

    spec = dataclasses.replace(DATASETS["digits"], name="digits_copy", mean=(0.5,) * 3, std=(0.25,) * 3)
    monkeypatch.setitem(DATASETS, "digits_copy", spec)
    monkeypatch.setitem(LOADERS, "digits_copy", LOADERS["digits"])
    data = load_data("digits_copy", image_size=8)
    assert data.name == "digits_copy" and (data.mean, data.std) == (spec.mean, spec.std)
    assert len(data) == DIGITS_SPLIT_SIZES["train"] and data.num_classes == 10
    assert recipe_for_dataset("digits_copy") == "digits"
