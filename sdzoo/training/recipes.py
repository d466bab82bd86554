"""Training recipes: the paper's settings per data set (those of the authors' Torch7 code, Huang et al., 2016),
as named presets that every flag can override. docs/differences.md lists where sdzoo deliberately differs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from sdzoo.datasets import DATASETS
from sdzoo.survival import SurvivalSettings

__all__ = ["Recipe", "RECIPES", "DEFAULT_RECIPE", "LR_DROP_RULES", "PAPER_RESULTS", "recipe_for_dataset"]

# Test error (%) reported by Huang et al. (2016): (architecture, data set) -> rows of
# (setting, constant depth, stochastic depth). CIFAR results use the standard augmentation ("+").
PAPER_RESULTS: Dict[Tuple[str, str], List[Tuple[str, float, float]]] = {
    ("sd_resnet110_cifar", "cifar10"): [("ResNet-110, CIFAR-10+, 500 epochs", 6.41, 5.25)],
    ("sd_resnet110_cifar", "cifar100"): [("ResNet-110, CIFAR-100+, 500 epochs", 27.76, 24.98)],
    ("sd_resnet152_cifar", "svhn"): [("ResNet-152 (CIFAR layout), SVHN, 50 epochs", 1.80, 1.75)],
    ("sd_resnet1202_cifar", "cifar10"): [("ResNet-1202, CIFAR-10+, 500 epochs", 6.67, 4.91)],
    ("sd_resnet152", "imagenet"): [
        ("ResNet-152, ImageNet val, 90 epochs", 23.06, 23.38),
        ("ResNet-152, ImageNet val, 120 epochs", 21.78, 21.98),
    ],
}


_SURVIVAL = SurvivalSettings()  # the recipes' survival settings default to the model's
LR_DROP_RULES = ("main.lua", "fb.resnet.torch")  # the old lr while epoch < f * E, or <= f * E (--lr-drop-rule)


@dataclass(frozen=True)
class Recipe:
    model: str
    dataset: str
    epochs: int
    batch_size: int = 128                    # global batch, split over the processes
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    dampening: float = 0.0
    weight_decay: float = 1e-4               # on every parameter, BN and biases included
    lr_drops: Tuple[float, ...] = (0.5, 0.75)  # fractions of the run where lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    lr_drop_rule: str = "main.lua"
    survival_prob: float = _SURVIVAL.survival_prob  # p_L
    survival_rule: str = _SURVIVAL.survival_rule
    gate_mode: str = _SURVIVAL.gate_mode
    scaling: str = _SURVIVAL.scaling
    seed: int = 1                            # the authors' code seeds with 1
    val_size: int = 0                        # images held out of the training set for validation
    image_size: int = 32
    shift: int = 0                           # random translation of up to this many pixels, zero fill
    hflip: bool = False
    color_jitter: float = 0.0                # brightness, contrast and saturation jitter (folder data)
    lighting: float = 0.0                    # std of the PCA lighting noise (folder data)
    eval_every_steps: int = 0                # 0: evaluate at the end of each epoch
    sync_bn: bool = True                     # SyncBatchNorm when several GPUs train: BN sees the whole batch
    note: str = field(default="", compare=False)


RECIPES: Dict[str, Recipe] = {
    # CIFAR: 45k/5k train/validation split, 4 px shift + flip, 500 epochs, lr / 10 at epochs 250 and 375.
    "cifar10": Recipe(
        model="sd_resnet110_cifar", dataset="cifar10", epochs=500, val_size=5000, shift=4, hflip=True,
        note="Huang et al. 2016, CIFAR-10+: ResNet-110, test error 5.25% with stochastic depth"),
    "cifar100": Recipe(
        model="sd_resnet110_cifar", dataset="cifar100", epochs=500, val_size=5000, shift=4, hflip=True,
        note="Huang et al. 2016, CIFAR-100+: ResNet-110, test error 24.98% with stochastic depth"),
    # SVHN: train + extra minus 6,000 validation images (400/class from train, 200/class from extra),
    # no augmentation, 50 epochs, lr / 10 at 60% and 70% of training; validation and test every 200 steps, the
    # test error reported at the best of those ~1,170 validation points (main.lua).
    "svhn": Recipe(
        model="sd_resnet152_cifar", dataset="svhn", epochs=50, val_size=6000, lr_drops=(0.6, 0.7),
        eval_every_steps=200,
        note="Huang et al. 2016, SVHN: 152-layer CIFAR-layout ResNet, test error 1.75% with stochastic depth"),
    # ImageNet: ResNet-152 as in fb.resnet.torch (batch 256, lr 0.1 for epochs 1-30, / 10 after epochs 30 and 60,
    # random sized crop, colour jitter 0.4, PCA lighting 0.1, flip), 90 epochs.
    # The validation folder is the held-out set; it also serves as the test set when there is no test/.
    "imagenet": Recipe(
        model="sd_resnet152", dataset="imagenet", epochs=90, batch_size=256, lr_drops=(1 / 3, 2 / 3),
        lr_drop_rule="fb.resnet.torch", image_size=224, hflip=True, color_jitter=0.4, lighting=0.1,
        note="Huang et al. 2016, ImageNet: ResNet-152, 90 epochs, val error 23.38% with stochastic depth"),
    # digits: 1,797 8x8 images upsampled to 16x16 (32x32 is no more accurate here and 4x slower); ResNet-20,
    # 30 epochs of batch 64: 96.9-99.2% test accuracy (seeds 1-3) in 15-25 s on two CPU cores. A 1 px shift
    # at 8x8 is 2 px here; flipping a digit changes what it is, so no flip.
    "digits": Recipe(
        model="sd_resnet20_cifar", dataset="digits", epochs=30, batch_size=64, image_size=16, shift=2,
        hflip=False, sync_bn=False,
        note="offline sanity run: scikit-learn's handwritten digits, ResNet-20 with stochastic depth"),
    # Fashion-MNIST, the CIFAR protocol at 28x28 in one grey channel: 55k/5k train/validation split, 4 px shift +
    # flip, lr / 10 at 50% and 75%. The CPU recipe: ResNet-20 for 15 epochs, about an hour for each of two runs
    # at once on a 2-core machine (one thread each; docs/fashion_mnist.md has the measurement).
    "fashion_mnist": Recipe(
        model="sd_resnet20_cifar", dataset="fashion_mnist", epochs=15, val_size=5000, image_size=28, shift=4,
        hflip=True, sync_bn=False,
        note="CPU recipe: Fashion-MNIST, ResNet-20, about an hour on 2 CPU cores"),
    # The paper's CIFAR recipe on Fashion-MNIST, for a GPU: ResNet-110, 500 epochs.
    "fashion_mnist_gpu": Recipe(
        model="sd_resnet110_cifar", dataset="fashion_mnist", epochs=500, val_size=5000, image_size=28, shift=4,
        hflip=True,
        note="GPU recipe: the paper's CIFAR-10 recipe on Fashion-MNIST"),
    # synthetic: random images and labels, for throughput runs; nothing is learned.
    "synthetic": Recipe(
        model="sd_resnet110_cifar", dataset="synthetic", epochs=2, shift=4, hflip=True, sync_bn=False,
        note="throughput run on random data"),
}

DEFAULT_RECIPE = "digits"


def recipe_for_dataset(dataset: str) -> Optional[str]:
    """The recipe a data set trains with by default, as ``sdzoo.datasets`` names it (None if none)."""
    name = getattr(DATASETS.get(dataset), "recipe", None)
    return name if name in RECIPES else None
