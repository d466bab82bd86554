"""The settings of a training run: the typed ``Settings`` and the command line that fills it: a named recipe
overridden by the flags given. What the flag parser cannot see is checked here, each message naming the flag."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from sdzoo.files.run_folder import (
    CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, WEIGHTS_NAME, CheckpointError, check_run_folder_free)
from sdzoo.datasets import DATASETS, dataset_names
from sdzoo.files.checks import and_list, check_output_path
from sdzoo.files.weights import as_json_value
from sdzoo.gate import GATE_MODES, SCALINGS
from sdzoo.training.recipes import DEFAULT_RECIPE, LR_DROP_RULES, RECIPES, Recipe, recipe_for_dataset
from sdzoo.survival import SURVIVAL_RULES

__all__ = ["Settings", "TrainError", "build_parser", "given_flags", "new_run_settings", "DEFINING_SETTINGS"]


class TrainError(Exception):
    """A user error (a bad flag, an impossible combination): reported without a traceback."""


@dataclass(frozen=True)
class Settings(Recipe):
    """Every setting of a run: the recipe's and the ones below it define the run; the rest say how it runs."""
    recipe: str = DEFAULT_RECIPE
    split_seed: int = 1
    num_classes: int = 10                    # synthetic data only
    accum_steps: int = 1
    drop_warmup: float = 0.0                 # fraction of training over which the drop rates ramp up from 0
    # How it runs: free to change on resume.
    data_dir: Optional[str] = None           # None: ~/data (and a system package's folder, fashion_mnist)
    download: bool = True
    output: Optional[str] = None
    device: str = "auto"
    amp: Optional[bool] = None               # None: on with cuda
    channels_last: Optional[bool] = None     # None: on with cuda
    compile: bool = False
    deterministic: bool = False
    workers: int = 8
    eval_batch_size: Optional[int] = None
    checkpoint_every_steps: int = 0
    log_every: int = 20
    quiet: bool = False
    record_gates: bool = False
    threads: Optional[int] = None
    # Learning-rate changes made on resume: dicts of epoch, step, global_step, old, new.
    lr_changes: Tuple[Dict[str, Any], ...] = ()

    @classmethod
    def from_recipe(cls, name: str, **changes: Any) -> "Settings":
        """The named recipe's settings (its note, which describes the paper's run, left out) with ``changes``."""
        recipe = {f.name: getattr(RECIPES[name], f.name) for f in fields(Recipe) if f.name != "note"}
        return cls(**dict(recipe, recipe=name, **changes))

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "Settings":
        """Settings saved by ``to_dict`` (a checkpoint's)."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        missing = [k for k in DEFINING_SETTINGS if k not in values]
        if unknown or missing:
            raise CheckpointError(
                "--resume: the checkpoint's settings " + "; ".join(what for what in (
                    unknown and f"hold keys this version does not know: {', '.join(unknown)}",
                    missing and f"lack settings that define the run: {', '.join(missing)}") if what))
        return cls(**dict(values, lr_drops=tuple(values["lr_drops"]), lr_changes=tuple(values.get("lr_changes", ()))))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (lists for tuples), without the recipe's note."""
        return {k: as_json_value(v) for k, v in asdict(self).items() if k != "note"}


# Settings that define the training run: a resumed run must keep them (it would not be the same run).
DEFINING_SETTINGS = tuple(f.name for f in fields(Recipe) if f.name != "note") + (
    "recipe", "split_seed", "num_classes", "accum_steps", "drop_warmup")
# Files of a finished or stopped run: a new run refuses a folder that holds them.
RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME, SUMMARY_NAME)


# -- flags ---------------------------------------------------------------------------------------------------
def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a number in a range, with an error message that says which range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}; got {text!r}") from None
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        if not (above and below and (kind is int or math.isfinite(value))):
            lo = "(-inf" if low is None else f"({low}" if low_open else f"[{low}"
            hi = "inf)" if high is None else f"{high})" if high_open else f"{high}]"
            raise argparse.ArgumentTypeError(f"must be in {lo}, {hi}; got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _recipe_line(name: str, r: Recipe) -> str:
    drops = ", ".join(f"{d:.0%}" for d in r.lr_drops)
    every = f", evaluated every {r.eval_every_steps} steps" if r.eval_every_steps else ""
    return (f"  {name:<10} {r.model}, {r.epochs} epochs, batch {r.batch_size}, lr {r.lr} / 10 at {drops}{every}: "
            f"{r.note}")


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags. Every flag defaults to None (not given), so that the recipe's value applies."""
    recipes = "\n".join(_recipe_line(name, r) for name, r in RECIPES.items())
    parser = argparse.ArgumentParser(
        prog="sdzoo train",
        description="Train a stochastic-depth ResNet (Huang et al., 2016) with the paper's recipe. "
                    "Flags left out take the recipe's value; with no flags at all it trains on the digits "
                    "that scikit-learn ships (offline, about a minute on 2 CPU cores).",
        epilog=f"recipes (--recipe; by default the one named after --dataset):\n{recipes}\n\n"
               "several processes: torchrun --nproc_per_node N -m sdzoo train ... (--batch-size stays the global "
               "batch).\nexit status: 0 done, 2 bad usage or data, 3 the loss became NaN or infinite.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bool_flag = argparse.BooleanOptionalAction

    add = parser.add_argument_group("run").add_argument
    add("--recipe", choices=list(RECIPES), help="named preset of the settings below (default: the --dataset's)")
    add("--output", help="run folder: a timm local-dir (config.json + model.safetensors of the best validation "
                         "epoch), metrics.jsonl, summary.json, curves.png, checkpoint.pt (default: runs/MODEL-DATASET)")
    add("--resume", nargs="?", const="", metavar="RUN",
        help="continue the run in RUN (a run folder or its checkpoint.pt; default: --output) exactly where "
             "its last checkpoint left it, with its settings; only --lr may change (recorded as a change)")
    add("--seed", type=_number(int, 0, 2**63 - 1), help="seed of the weights, the data order, the augmentation "
                                                        "and the gates (the same on every process; default 1)")
    add("--quiet", action="store_true", default=None, help="no progress bar or per-epoch lines")

    add = parser.add_argument_group("data").add_argument
    add("--dataset", choices=list(DATASETS), help="data set (default: digits, which needs no download)")
    add("--data-dir", help="folder of the data set; torchvision's files for cifar10/cifar100/svhn, "
                           "train/ val/ [test/] class folders for imagenet/imagefolder, the four idx files "
                           "(or torchvision's FashionMNIST/raw/ under it) for fashion_mnist (default: ~/data; "
                           "for fashion_mnist also the folder of the Debian package dataset-fashion-mnist)")
    add("--download", action=bool_flag, help="download cifar10/cifar100/svhn when missing (default: yes)")
    add("--val-size", type=_number(int, 0), help="training images held out for validation: the test error is "
                                                 "reported at the epoch of best validation error "
                                                 "(cifar 5000, svhn 6000; 0: report the last epoch)")
    add("--split-seed", type=_number(int, 0, 2**63 - 1), help="seed of the train/validation split (default 1)")
    add("--image-size", type=_number(int, 8, 1024), help="input size for digits, synthetic and folder data "
                                                         "(digits 16, synthetic 32, imagenet 224)")
    add("--num-classes", type=_number(int, 2), help="classes of the synthetic data (default 10)")
    add("--shift", type=_number(int, 0), help="random shift of up to this many pixels with zero fill, done on "
                                              "the training device (cifar 4)")
    add("--hflip", action=bool_flag, help="random horizontal flip (cifar: yes)")
    add("--color-jitter", type=_number(float, 0.0, 1.0), help="brightness, contrast and saturation jitter of "
                                                              "folder data, as fb.resnet.torch (imagenet 0.4)")
    add("--lighting", type=_number(float, 0.0), help="std of the PCA lighting noise of folder data, as "
                                                    "fb.resnet.torch (imagenet 0.1)")
    add("--workers", type=_number(int, 0), help="loader processes for folder data (default 8)")

    add = parser.add_argument_group("model").add_argument
    add("--model", help="a model of the zoo, e.g. sd_resnet110_cifar, sd_resnet152 (default: the recipe's)")
    add("--survival-prob", type=_number(float, 0.0, 1.0, low_open=True),
        help="p_L, survival probability of the last residual block; 1 is constant depth (default 0.5)")
    add("--survival-rule", choices=SURVIVAL_RULES, help="linear decay from 1 to p_L (the paper's) or uniform")
    add("--gate-mode", choices=GATE_MODES, help="batch: one draw per block per mini-batch (the paper's); "
                                                "sample: per-sample drop; off: constant depth")
    add("--scaling", choices=SCALINGS, help="expectation: branch times p_l at test time (the paper's); "
                                            "inverted: branch / p_l in training")
    add("--drop-warmup", type=_number(float, 0.0, 1.0), metavar="FRACTION",
        help="ramp the drop rates linearly from 0 over this fraction of training (default 0: none)")

    add = parser.add_argument_group("optimisation").add_argument
    add("--epochs", type=_number(int, 1), help="epochs (cifar 500, svhn 50, imagenet 90)")
    add("--batch-size", type=_number(int, 1), help="global batch, split evenly over the processes (default 128)")
    add("--accum-steps", type=_number(int, 1), help="micro-batches per process and step; they share one draw "
                                                    "of the gates (default 1)")
    add("--lr", type=_number(float, 0.0, low_open=True), help="learning rate (default 0.1)")
    add("--lr-drops", type=_number(float, 0.0, 1.0, True, True), nargs="*", metavar="FRACTION",
        help="fractions of the run where lr is multiplied by --lr-gamma (cifar 0.5 0.75, svhn 0.6 0.7; "
             "none: constant lr)")
    add("--lr-gamma", type=_number(float, 0.0, 1.0, low_open=True), help="lr factor at each drop (default 0.1)")
    add("--lr-drop-rule", choices=LR_DROP_RULES,
        help="which epoch a drop at fraction f of E epochs lands on, counting from 1: main.lua keeps the old lr "
             "while epoch < f x E (the authors' CIFAR/SVHN code: 0.1 for epochs 1-249 of 500); fb.resnet.torch "
             "while epoch <= f x E (imagenet: 0.1 for 1-30 of 90)")
    add("--momentum", type=_number(float, 0.0, 1.0, high_open=True), help="SGD momentum (default 0.9)")
    add("--nesterov", action=bool_flag, help="Nesterov momentum (default: yes)")
    add("--dampening", type=_number(float, 0.0, 1.0, high_open=True), help="SGD dampening (default 0)")
    add("--weight-decay", type=_number(float, 0.0, 1.0), help="L2 weight decay on every parameter (default 1e-4)")

    add = parser.add_argument_group("speed").add_argument
    add("--device", choices=("auto", "cpu", "cuda"), help="auto: cuda when there is a GPU (default)")
    add("--amp", action=bool_flag, help="bfloat16 autocast of the training forward pass (default: on with "
                                         "cuda); the loss, the weights and every evaluation stay fp32")
    add("--channels-last", action=bool_flag, help="channels-last memory format (default: on with cuda)")
    add("--compile", action="store_true", default=None, help="torch.compile the model (gates stay random)")
    add("--deterministic", action="store_true", default=None,
        help="deterministic kernels, for bit-exact resume on a GPU (CPU runs are deterministic anyway)")
    add("--threads", type=_number(int, 1), help="CPU threads of torch (default: torch's choice)")
    add("--eval-batch-size", type=_number(int, 1), help="batch per process for evaluation "
                                                        "(default: max(256, 2 x the training batch))")

    add = parser.add_argument_group("distributed").add_argument
    add("--sync-bn", action=bool_flag,
        help="BatchNorm statistics over the global batch when several GPUs train (SyncBatchNorm; CUDA only; "
             "default: yes in the paper recipes, whose BatchNorm saw the whole batch). With --no-sync-bn each "
             "process normalises its own part, as a single process with --accum-steps = processes would")

    add = parser.add_argument_group("checkpoints and logs").add_argument
    add("--eval-every-steps", type=_number(int, 0),
        help="evaluate validation and test every N optimizer steps (and after the last step), each a line of "
             "metrics.jsonl; the best weights are those of the evaluation of lowest validation error (svhn "
             "200, as main.lua; default 0: at the end of each epoch)")
    add("--checkpoint-every-steps", type=_number(int, 0),
        help="also checkpoint every N optimizer steps inside an epoch (default 0: at the end of each epoch)")
    add("--log-every", type=_number(int, 1), help="steps between progress updates and loss checks (default 20)")
    add("--record-gates", action="store_true", default=None,
        help="write each step's gates to gates_rankR.txt in the run folder (to check that every process "
             "skips the same blocks)")
    return parser


# -- settings ------------------------------------------------------------------------------------------------
def given_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags given (the parser leaves the others None), with ``lr_drops`` in order."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "lr_drops" in given:
        given["lr_drops"] = tuple(sorted(given["lr_drops"]))
    return given


def new_run_settings(given: Dict[str, Any]) -> Settings:
    """The settings of a new run: its recipe overridden by the flags ``given``, checked."""
    recipe = given.pop("recipe", None) or (recipe_for_dataset(given["dataset"]) if "dataset" in given
                                           else DEFAULT_RECIPE)
    settings = Settings.from_recipe(recipe, **given)
    _check_settings(settings, given)
    if settings.output is None:
        settings = dataclasses.replace(settings, output=os.path.join("runs", f"{settings.model}-{settings.dataset}"))
    _check_new_run_folder(settings.output)
    return settings


def _check_new_run_folder(output: str) -> None:
    """--output must be a folder (or not exist yet) that holds no run and that no other process writes to."""
    try:
        check_output_path("--output", output, kind="folder")
    except ValueError as e:
        raise TrainError(str(e)) from None
    path = Path(output)
    if not path.is_dir():
        return
    check_run_folder_free(path)
    if (path / CHECKPOINT_NAME).exists():
        raise TrainError(f"--output {output} already holds a run ({CHECKPOINT_NAME}): pass --resume "
                         "to continue it, or choose another --output")
    others = [name for name in RUN_FILES if (path / name).exists()]
    if others:
        # Its config.json would describe our weights (or its weights stay beside our config): refuse.
        raise TrainError(f"--output {output} holds another run's files ({', '.join(others)}) and no "
                         f"{CHECKPOINT_NAME} to resume; choose another --output, or move those files away")


def _check_settings(s: Settings, given: Dict[str, Any]) -> None:
    """Combinations the flag parser cannot see; each message names the flag."""
    import timm

    models = timm.list_models("sd_*")
    if s.model not in models:
        raise TrainError(f"--model must be one of {', '.join(models)}; got {s.model!r}")
    dataset, spec = s.dataset, DATASETS[s.dataset]
    if "num_classes" in given and not spec.classes_by_flag:
        raise TrainError(f"--num-classes applies to --dataset {and_list(dataset_names(classes_by_flag=True))} "
                         f"only ({dataset} fixes its classes)")
    if "val_size" in given and not spec.val_split:
        raise TrainError(f"--val-size applies to {and_list(dataset_names(val_split=True))}; {dataset} has fixed "
                         "splits")
    if "image_size" in given and spec.image_size:
        side = spec.image_size
        raise TrainError(f"--image-size does not apply to {dataset}: its images are {side}x{side}")
    if "shift" in given and not spec.on_device:
        raise TrainError(f"--shift applies to in-memory data sets; {dataset} augments with random resized crops")
    image_size = spec.image_size or s.image_size
    if "shift" in given and s.shift >= image_size:
        where = f"{dataset}: {image_size} pixels" if spec.image_size else f"{image_size} pixels"
        raise TrainError(f"--shift {s.shift} must be smaller than the image ({where})")
    for flag in ("color_jitter", "lighting"):
        if flag in given and spec.on_device:
            raise TrainError(f"--{flag.replace('_', '-')} applies to {and_list(dataset_names(on_device=False))} "
                             f"data; {dataset} is augmented on the device")
    if given.get("sync_bn") and (s.device == "cpu" or not torch.cuda.is_available()):
        raise TrainError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only")
    if s.nesterov and (s.momentum <= 0 or s.dampening != 0):
        raise TrainError("--nesterov needs --momentum > 0 and --dampening 0 (or pass --no-nesterov)")
