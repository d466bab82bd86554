"""Train a stochastic-depth ResNet with the paper's recipe, on one process or many.

    python scripts/train.py --dataset cifar10 --data-dir ~/data --output runs/r110
    torchrun --nproc_per_node 8 scripts/train.py --dataset cifar10 --data-dir ~/data --output runs/r110
    python scripts/train.py --output runs/r110 --resume

The file reads top to bottom: command-line flags, settings (a named recipe overridden by the flags),
processes and device, then ``train()``: data, model, optimizer, resume, and the loop. Each step trains on
one global batch, split evenly over the processes (and over ``--accum-steps`` micro-batches), with one
draw of the gates for the whole global batch: every rank skips the same blocks. Each epoch ends with the
validation and test error (or, with ``--eval-every-steps N``, these come every N steps), a line of
``metrics.jsonl``, the best weights so far, and a checkpoint. Evaluation runs in fp32, also when training
autocasts to bf16.

Exactness, as in the authors' code: every parameter decays (BN and biases too), and a skipped block's
parameters see a zero gradient, not a missing one, so weight decay and momentum still move them.
Checkpoints hold every random state (data order, augmentation, gates, torch), so a resumed run ends with
the same weights, bit for bit, as one that was never stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (
    CHECKPOINT_NAME, CONFIG_NAME, WEIGHTS_NAME, CheckpointError, RunFolderBusy, check_run_folder_free, load_state,
    lock_run_folder, remove_stale_temp_files, save_model_config, save_state, save_weights)
from ._files import atomic_write, save_json
from .data import DATASETS, TENSOR_DATASETS, DataError, load_data
from .gate import GATE_MODES, SCALINGS
from .metrics_plot import epoch_records, evaluations, plot_curves, read_metrics
from .recipes import DEFAULT_RECIPE, LR_DROP_RULES, RECIPES, recipe_for_dataset
from .survival import SURVIVAL_RULES, drop_warmup_factor

__all__ = ["main", "train", "build_parser", "resolve_settings", "build_optimizer",
           "train_step", "TrainError", "Diverged"]

CHECKPOINT_FORMAT = 1
EXIT_USAGE, EXIT_DIVERGED = 2, 3

# Settings that define the training run: a resumed run must keep them (it would not be the same run).
DEFINING = (
    "recipe", "model", "dataset", "val_size", "split_seed", "image_size", "num_classes", "epochs", "batch_size",
    "accum_steps", "lr", "momentum", "nesterov", "dampening", "weight_decay", "lr_drops", "lr_gamma",
    "lr_drop_rule", "shift", "hflip", "color_jitter", "lighting", "survival_prob", "survival_rule", "gate_mode",
    "scaling", "seed", "sync_bn", "eval_every_steps", "drop_warmup")
# Defining settings added after the first checkpoints were written: a run resumed from one of those had them so.
LATER_DEFINING = dict(lr_drop_rule="fb.resnet.torch", color_jitter=0.0, lighting=0.0, eval_every_steps=0,
                      drop_warmup=0.0)
# Defining settings a resumed run may change: a lower learning rate is the way out of a diverged run.
CHANGEABLE_ON_RESUME = ("lr",)
# Files of a finished or stopped run: a new run refuses a folder that holds them.
RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, "metrics.jsonl", "summary.json")
# Settings of how it runs, free to change on resume.
RUN_DEFAULTS = dict(
    data_dir="~/data", download=True, output=None, device="auto", amp=None, channels_last=None, compile=False,
    deterministic=False, workers=8, eval_batch_size=None, checkpoint_every_steps=0, log_every=20, quiet=False,
    record_gates=False, threads=None)


class TrainError(Exception):
    """A user error (a bad flag, an impossible combination): reported without a traceback."""


class Diverged(TrainError):
    """The loss became NaN or infinite."""


# -- flags ---------------------------------------------------------------------------------------------------
def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a number in a range, with an error message that says which range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}; got {text!r}")
        bad = (low is not None and (value <= low if low_open else value < low)) or \
              (high is not None and (value >= high if high_open else value > high)) or \
              (kind is float and not math.isfinite(value))
        if bad:
            lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
            hi = "inf)" if high is None else f"{high}" + (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"must be in {lo or '(-inf, '}{hi}; got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    recipes = "\n".join(
        f"  {name:<10} {r.model}, {r.epochs} epochs, batch {r.batch_size}, lr {r.lr} / 10 at "
        f"{', '.join(f'{d:.0%}' for d in r.lr_drops)}"
        f"{f', evaluated every {r.eval_every_steps} steps' if r.eval_every_steps else ''}: {r.note}"
        for name, r in RECIPES.items())
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a stochastic-depth ResNet (Huang et al., 2016) with the paper's recipe. "
                    "Flags left out take the recipe's value; with no flags at all it trains on the digits "
                    "that scikit-learn ships (offline, about a minute on 2 CPU cores).",
        epilog=f"recipes (--recipe; by default the one named after --dataset):\n{recipes}\n\n"
               "several processes: torchrun --nproc_per_node N train.py ... (--batch-size stays the global "
               "batch).\nexit status: 0 done, 2 bad usage or data, 3 the loss became NaN or infinite.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    bool_flag = argparse.BooleanOptionalAction

    g = parser.add_argument_group("run")
    add = g.add_argument
    add("--recipe", choices=list(RECIPES), help="named preset of the settings below (default: the --dataset's)")
    add("--output", help="run folder: a timm local-dir (config.json + model.safetensors of the best "
                         "validation epoch), metrics.jsonl, summary.json, curves.png, checkpoint.pt "
                         "(default: runs/MODEL-DATASET)")
    add("--resume", nargs="?", const="", metavar="RUN",
        help="continue the run in RUN (a run folder or its checkpoint.pt; default: --output) exactly where "
             "its last checkpoint left it, with its settings; only --lr may change (recorded as a change)")
    add("--seed", type=_number(int, 0, 2**63 - 1), help="seed of the weights, the data order, the augmentation and the "
                                             "gates (the same on every process; default 1)")
    add("--quiet", action="store_true", default=None, help="no progress bar or per-epoch lines")

    g = parser.add_argument_group("data")
    add = g.add_argument
    add("--dataset", choices=DATASETS, help="data set (default: digits, which needs no download)")
    add("--data-dir", help="folder of the data set; torchvision's files for cifar10/cifar100/svhn, "
                           "train/ val/ [test/] class folders for imagenet/imagefolder (default: ~/data)")
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

    g = parser.add_argument_group("model")
    add = g.add_argument
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

    g = parser.add_argument_group("optimisation")
    add = g.add_argument
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

    g = parser.add_argument_group("speed")
    add = g.add_argument
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

    g = parser.add_argument_group("distributed")
    add = g.add_argument
    add("--sync-bn", action=bool_flag,
        help="BatchNorm statistics over the global batch when several GPUs train (SyncBatchNorm; CUDA only; "
             "default: yes in the paper recipes, whose BatchNorm saw the whole batch). With --no-sync-bn each "
             "process normalises its own part, as a single process with --accum-steps = processes would")

    g = parser.add_argument_group("checkpoints and logs")
    add = g.add_argument
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
def resolve_settings(args: argparse.Namespace) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """The run's settings (recipe < flags, or the checkpoint's < run flags on resume) and the checkpoint."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "lr_drops" in given:
        given["lr_drops"] = sorted(given["lr_drops"])
    resume = given.pop("resume", None)
    if resume is not None:
        return _resume_settings(resume, given)
    recipe_name = given.get("recipe") or (recipe_for_dataset(given["dataset"]) if "dataset" in given
                                          else DEFAULT_RECIPE)
    recipe = RECIPES[recipe_name].to_dict()
    recipe.pop("note")
    settings = dict(recipe, recipe=recipe_name, split_seed=1, num_classes=10, accum_steps=1, drop_warmup=0.0,
                    **RUN_DEFAULTS)
    settings.update(given)
    _check_settings(settings, given)
    if settings["output"] is None:
        settings["output"] = os.path.join("runs", f"{settings['model']}-{settings['dataset']}")
    output = settings["output"]
    _check_output_folder(output)
    if os.path.exists(os.path.join(output, CHECKPOINT_NAME)):
        raise TrainError(f"--output {output} already holds a run ({CHECKPOINT_NAME}): pass --resume "
                         "to continue it, or choose another --output")
    others = [name for name in RUN_FILES if os.path.exists(os.path.join(output, name))]
    if others:
        # Its config.json would describe our weights (or its weights stay beside our config): refuse.
        raise TrainError(f"--output {output} holds another run's files ({', '.join(others)}) and no "
                         f"{CHECKPOINT_NAME} to resume; choose another --output, or move those files away")
    return settings, None


def _check_output_folder(output: str) -> None:
    """--output must be a folder (or not exist yet, under folders) that no other process is writing to."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise TrainError(f"--output {output} is a file; give a folder (the run folder)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainError(f"--output {output}: {parent} is a file, not a folder")
            break
    if path.is_dir():
        check_run_folder_free(path)


def _resume_settings(resume: str, given: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    path = Path(resume or given.get("output") or "")
    if not str(path) or str(path) == ".":
        raise TrainError("--resume needs the run folder: --resume RUN, or --output RUN --resume")
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if path.parent.is_dir():
        check_run_folder_free(path.parent)
    checkpoint = load_state(path, map_location=torch.device("cpu"))
    if "output" in given and Path(given["output"]).resolve() != path.parent.resolve():
        raise TrainError(f"--output {given['output']} is not the folder of the run resumed ({path.parent})")
    required = ("settings", "epoch", "step", "global_step", "elapsed", "best", "totals", "model", "optimizer",
                "scheduler", "rng", "world_size")
    if (not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT
            or any(k not in checkpoint for k in required) or not isinstance(checkpoint["settings"], dict)):
        raise CheckpointError(f"--resume: {path} is not a checkpoint of this trainer (it lacks the format "
                              f"marker or one of {', '.join(required)})")
    settings = dict(LATER_DEFINING, **checkpoint["settings"])
    for key in CHANGEABLE_ON_RESUME:
        if key in given and given[key] != settings.get(key):
            settings[f"{key}_changes"] = [*settings.get(f"{key}_changes", []), dict(
                epoch=checkpoint["epoch"], step=checkpoint["step"], global_step=checkpoint["global_step"],
                old=settings.get(key), new=given[key])]
            settings[key] = given[key]
    changed = [k for k in DEFINING if k in given and given[k] != settings.get(k)]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (run: {settings.get(k)})" for k in changed)
        raise TrainError(f"--resume continues a run with its own settings; these flags differ: {flags}. "
                         "Start a new run (another --output) to change them")
    settings.update({k: v for k, v in given.items() if k in RUN_DEFAULTS})
    settings["output"] = str(path.parent)
    return settings, checkpoint


def _check_settings(s: Dict[str, Any], given: Dict[str, Any]) -> None:
    """Combinations the flag parser cannot see; each message names the flag."""
    import timm

    models = timm.list_models("sd_*")
    if s["model"] not in models:
        raise TrainError(f"--model must be one of {', '.join(models)}; got {s['model']!r}")
    dataset = s["dataset"]
    if "num_classes" in given and dataset != "synthetic":
        raise TrainError(f"--num-classes applies to --dataset synthetic only ({dataset} fixes its classes)")
    if "val_size" in given and dataset not in ("cifar10", "cifar100", "svhn"):
        raise TrainError(f"--val-size applies to cifar10, cifar100 and svhn; {dataset} has fixed splits")
    if "image_size" in given and dataset in ("cifar10", "cifar100", "svhn"):
        raise TrainError(f"--image-size does not apply to {dataset}: its images are 32x32")
    if "shift" in given and dataset in ("imagenet", "imagefolder"):
        raise TrainError(f"--shift applies to in-memory data sets; {dataset} augments with random resized crops")
    if "shift" in given and s["image_size"] is not None and s["shift"] >= s["image_size"]:
        raise TrainError(f"--shift {s['shift']} must be smaller than the image ({s['image_size']} pixels)")
    if "shift" in given and dataset in ("cifar10", "cifar100", "svhn") and s["shift"] >= 32:
        raise TrainError(f"--shift {s['shift']} must be smaller than the image ({dataset}: 32 pixels)")
    for flag in ("color_jitter", "lighting"):
        if flag in given and dataset not in ("imagenet", "imagefolder"):
            raise TrainError(f"--{flag.replace('_', '-')} applies to imagenet and imagefolder data; {dataset} "
                             "is augmented on the device")
    if given.get("sync_bn") and (s["device"] == "cpu" or not torch.cuda.is_available()):
        raise TrainError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only")
    if s["nesterov"] and (s["momentum"] <= 0 or s["dampening"] != 0):
        raise TrainError("--nesterov needs --momentum > 0 and --dampening 0 (or pass --no-nesterov)")


# -- processes and device ------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_processes(s: Dict[str, Any]) -> Tuple[Dist, torch.device]:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process; the device to train on."""
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available here; use --device cpu (or auto)")
    use_cuda = s["device"] == "cuda" or (s["device"] == "auto" and torch.cuda.is_available())
    dist = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if s["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if use_cuda:
        torch.backends.cudnn.benchmark = not s["deterministic"]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    if dist.enabled and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist, device


def _all_reduce(t: Tensor, dist: Dist, op=torch_dist.ReduceOp.SUM) -> Tensor:
    if dist.enabled:
        torch_dist.all_reduce(t, op=op)
    return t


def _sync_buffers(model: nn.Module, dist: Dist) -> None:
    """BatchNorm running statistics from rank 0 (what DDP gives every rank at its next forward)."""
    if dist.enabled:
        for buffer in model.buffers():
            torch_dist.broadcast(buffer, 0)


def _stream_seed(seed: int, stream: int) -> int:
    """Independent seeds for the data order and the augmentation, derived from --seed."""
    import numpy as np
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


def load_data_everywhere(s: Dict[str, Any], dist: Dist):
    """Rank 0 loads first (it may download), then the others; an error on rank 0 stops every rank."""
    def load():
        return load_data(s["dataset"], s["data_dir"], download=s["download"], val_size=s["val_size"],
                         split_seed=s["split_seed"], image_size=s["image_size"], num_classes=s["num_classes"],
                         shift=s["shift"], hflip=s["hflip"], workers=s["workers"], color_jitter=s["color_jitter"],
                         lighting=s["lighting"])
    data, error = None, None
    if dist.main:
        try:
            data = load()
        except DataError as e:
            error = str(e)
    if dist.enabled:
        message = [error]
        torch_dist.broadcast_object_list(message, 0)
        error = message[0]
    if error:
        raise DataError(error)
    return data if dist.main else load()


# -- model and optimizer -------------------------------------------------------------------------------------
def create_model(s: Dict[str, Any], num_classes: int) -> nn.Module:
    import timm
    # The gate generator is seeded from --seed on every rank, so every rank draws the same gates.
    return timm.create_model(
        s["model"], num_classes=num_classes, survival_prob=s["survival_prob"], survival_rule=s["survival_rule"],
        gate_mode=s["gate_mode"], scaling=s["scaling"], gate_seed=s["seed"])


def build_optimizer(model: nn.Module, s: Dict[str, Any]) -> torch.optim.SGD:
    # One group: BN weights and biases decay too, as the authors' code flattens all parameters.
    return torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"], dampening=s["dampening"],
                           nesterov=s["nesterov"], weight_decay=s["weight_decay"])


def lr_milestones(s: Dict[str, Any]) -> List[int]:
    """Epochs done when each lr drop takes effect (MultiStepLR's milestones), by --lr-drop-rule."""
    milestones = set()
    for fraction in s["lr_drops"]:
        at = round(fraction * s["epochs"], 9)  # 0.6 x 50 is not exactly 30 in floating point
        # main.lua: lr 0.1 while epoch < f x E (epochs from 1); fb.resnet.torch: while epoch <= f x E.
        done = math.ceil(at) - 1 if s["lr_drop_rule"] == "main.lua" else math.floor(at)
        milestones.add(max(1, done))
    return sorted(milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, s: Dict[str, Any]):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_milestones(s), gamma=s["lr_gamma"])


def use_sync_batchnorm(s: Dict[str, Any], dist: Dist, cuda: bool, micro_batch: int) -> bool:
    """Whether BatchNorm normalises over every process's images (SyncBatchNorm). Where the settings ask for it
    but it cannot run (gloo on CPUs), rank 0 says once what differs."""
    if not (s["sync_bn"] and dist.enabled):
        return False
    if cuda:
        return True
    if dist.main:
        print(f"warning: SyncBatchNorm runs on GPUs only, so on these {dist.world} CPU processes BatchNorm "
              f"normalises each process's own {micro_batch} images, not the {micro_batch * dist.world} of "
              f"the step across processes as the recipe's single-GPU BatchNorm did (a single process with "
              f"--accum-steps {dist.world} would match this run); pass --no-sync-bn to accept it silently",
              file=sys.stderr)
    return False


def _change_lr(optimizer: torch.optim.Optimizer, scheduler, old: float, new: float) -> None:
    """A resumed run's new --lr: the schedule goes on from the new base rate (drops already passed still apply)."""
    for group in optimizer.param_groups:
        group["lr"] *= new / old
        group["initial_lr"] = new
    scheduler.base_lrs = [new] * len(scheduler.base_lrs)


def stage_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """Parameters by stage (stem, layer1.., head): the groups of the gradient-magnitude metric."""
    groups: Dict[str, List[nn.Parameter]] = {"stem": [], **{n: [] for n in model.stage_names}, "head": []}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        groups[top if top in model.stage_names else "head" if top in ("fc", "global_pool") else "stem"].append(p)
    return {k: v for k, v in groups.items() if v}


def grad_abs_sums(groups: Dict[str, List[nn.Parameter]]) -> Tensor:
    """Sum of |gradient| per group, on the device (no sync)."""
    return torch.stack([torch.stack(torch._foreach_norm([p.grad for p in ps], 1)).sum().double()
                        for ps in groups.values()])


class GateLog:
    """The gates of the last training step, as the model's gate sampler recorded its last draw."""

    def __init__(self, sampler: nn.Module):
        self.sampler = sampler

    @property
    def last(self) -> Optional[Tuple[list, int]]:
        return self.sampler.last_draw

    def depth(self) -> float:
        """Blocks that ran in the last step (per sample, averaged, in sample mode)."""
        if self.last is None:
            return float("nan")
        gates, batch = self.last
        # A batch gate is a bool, or a float holding the inverted scale (0: skipped) under drop-rate warmup.
        return sum(1.0 if g is None else float(g > 0) if g.dim() == 0 else g.numel() / batch for g in gates)

    def line(self) -> str:
        gates, _ = self.last
        return " ".join("1" if g is None else str(int(g > 0)) if g.dim() == 0 else ",".join(map(str, g.tolist()))
                        for g in gates)


# -- one step and one evaluation -----------------------------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
               gate_sampler: nn.Module, accum_steps: int = 1, autocast=nullcontext, no_sync=nullcontext,
               grad_groups: Optional[Dict[str, List[nn.Parameter]]] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One optimizer step on this process's part of the global batch.

    Returns the summed loss, the number of correct predictions and, with ``grad_groups``, the summed
    |gradient| of each group (all on the device, no sync).

    Micro-batches of a step share one draw of the gates (the sampler is rewound before each): the whole
    mini-batch keeps or skips a block, as in the paper, however it is split over processes and micro-batches.
    """
    gate_state = gate_sampler.get_rng_state() if accum_steps > 1 else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i, (xm, ym) in enumerate(zip(x.chunk(accum_steps), y.chunk(accum_steps))):
        if i:
            gate_sampler.set_rng_state(gate_state)
        with no_sync() if i < accum_steps - 1 else nullcontext():
            with autocast():
                logits = model(xm)
            loss = F.cross_entropy(logits.float(), ym)
            (loss / accum_steps).backward()
        loss_sum += loss.detach().double() * len(ym)
        correct += (logits.detach().argmax(1) == ym).sum()
    grad_abs = grad_abs_sums(grad_groups) if grad_groups else None
    optimizer.step()
    optimizer.zero_grad()
    return loss_sum, correct, grad_abs


@torch.no_grad()
def evaluate(model: nn.Module, data, split: str, dist: Dist, batch_size: int, device: torch.device,
             channels_last: bool = False) -> Tuple[float, float]:
    """(mean loss, error %) of a split, each rank evaluating its part. No gates are drawn in eval mode.

    Always fp32, as the authors evaluated: no autocast here, even when training autocasts to bf16, since bf16
    logits can flip borderline predictions and so the reported error."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in data.eval_batches(split, dist.rank, dist.world, batch_size, device):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    model.train()
    loss_sum, correct, count = _all_reduce(totals, dist).tolist()
    return loss_sum / count, 100.0 * (1.0 - correct / count)


# -- checkpoints ---------------------------------------------------------------------------------------------
def apply_drop_warmup(gate_sampler, step: int, total_steps: int, fraction: float) -> None:
    """--drop-warmup: the share of the drop rates in effect at this step (sdzoo.survival.drop_warmup_factor)."""
    if fraction:
        gate_sampler.set_drop_rate_factor(drop_warmup_factor(step, total_steps, fraction))


def _rng_states(order_state: Tensor, aug_state: Tensor, gate_sampler, device: torch.device) -> Dict[str, Any]:
    return dict(order=order_state, augment=aug_state, gates=gate_sampler.get_rng_state(),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _restore_rng(rng: Dict[str, Any], order_gen, aug_gen, gate_sampler, device: torch.device) -> None:
    order_gen.set_state(rng["order"])
    aug_gen.set_state(rng["augment"])
    gate_sampler.set_rng_state(rng["gates"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _truncate_lines(path: Path, keep) -> None:
    """Drop the lines a killed run wrote after its last checkpoint (and any half-written line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if keep(line):
                kept.append(line + "\n")
        except (ValueError, KeyError, IndexError):
            pass
    atomic_write(path, lambda temp: Path(temp).write_text("".join(kept)))


@dataclass
class EpochTotals:
    """Running sums of one epoch, saved in mid-epoch checkpoints so a resumed epoch reports the same."""
    loss_sum: Tensor
    correct: Tensor
    seen: int = 0
    steps: int = 0
    depth_sum: float = 0.0
    train_time: float = 0.0
    grad_abs: Optional[Tensor] = None

    @classmethod
    def zeros(cls, num_groups: int, device: torch.device) -> "EpochTotals":
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device),
                   grad_abs=torch.zeros(num_groups, dtype=torch.float64, device=device))

    def to_state(self) -> Dict[str, Any]:
        return dict(loss_sum=self.loss_sum.item(), correct=self.correct.item(), seen=self.seen, steps=self.steps,
                    depth_sum=self.depth_sum, train_time=self.train_time, grad_abs=self.grad_abs.tolist())

    @classmethod
    def from_state(cls, state: Dict[str, Any], device: torch.device) -> "EpochTotals":
        return cls(torch.tensor(state["loss_sum"], dtype=torch.float64, device=device),
                   torch.tensor(state["correct"], dtype=torch.int64, device=device),
                   state["seen"], state["steps"], state["depth_sum"], state["train_time"],
                   torch.tensor(state["grad_abs"], dtype=torch.float64, device=device))


def _divergence(loss_sum: Tensor, model: Optional[nn.Module], dist: Dist) -> Optional[str]:
    """What became NaN or infinite on any rank, or None: the loss (a NaN or inf loss in any step leaves the
    epoch's sum non-finite, so no step escapes) and, before anything is saved, the weights and statistics."""
    bad = torch.zeros(2, device=loss_sum.device)
    bad[0] = (~torch.isfinite(loss_sum)).float()
    if model is not None:
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        bad[1] = (~torch.stack([torch.isfinite(t).all() for t in tensors])).any().float()
    loss_bad, state_bad = _all_reduce(bad, dist, torch_dist.ReduceOp.MAX).tolist()
    if loss_bad:
        return "the training loss"
    return "the weights or BatchNorm statistics" if state_bad else None


# -- training ------------------------------------------------------------------------------------------------
def train(s: Dict[str, Any], checkpoint: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run (or continue) a training run with settings ``s``; returns the summary written to summary.json."""
    start_time = time.perf_counter()
    dist, device = setup_processes(s)
    cuda = device.type == "cuda"
    amp = cuda if s["amp"] is None else s["amp"]
    if amp and cuda and not torch.cuda.is_bf16_supported():
        raise TrainError("--amp needs a GPU with bfloat16 (Ampere or newer); pass --no-amp")
    channels_last = cuda if s["channels_last"] is None else s["channels_last"]
    out = Path(s["output"])
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        folder_lock = lock_run_folder(out)  # noqa: F841  one writer per run folder, until train() returns
    say = (lambda msg: print(msg, flush=True)) if dist.main and not s["quiet"] else (lambda msg: None)

    # Batch geometry: the global batch is split over ranks, then over micro-batches.
    global_batch, accum = s["batch_size"], s["accum_steps"]
    if global_batch % (dist.world * accum):
        raise TrainError(f"--batch-size {global_batch} must be divisible by processes x --accum-steps "
                         f"({dist.world} x {accum})")
    local_batch = global_batch // dist.world

    # Data
    data = load_data_everywhere(s, dist)
    if cuda and s["dataset"] in TENSOR_DATASETS:
        data.to(device)  # the whole data set on the GPU: a batch is an index, the augmentation a tensor op
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise TrainError(f"--batch-size {global_batch} is larger than the {len(data)} training images")
    eval_batch = s["eval_batch_size"] or max(256, 2 * local_batch)

    # Model
    torch.manual_seed(s["seed"])
    raw_model = create_model(s, data.num_classes)
    sync_bn = use_sync_batchnorm(s, dist, cuda, global_batch // (dist.world * accum))
    if sync_bn:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    raw_model.to(device)
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    gate_sampler = raw_model.gate_sampler
    gate_log = GateLog(gate_sampler)
    groups = stage_groups(raw_model)
    group_sizes = torch.tensor([sum(p.numel() for p in ps) for ps in groups.values()], dtype=torch.float64)
    num_blocks, expected_depth = len(raw_model.residual_blocks()), raw_model.expected_depth()

    # Optimizer, lr schedule, random streams
    optimizer = build_optimizer(raw_model, s)
    scheduler = build_scheduler(optimizer, s)
    order_gen = torch.Generator().manual_seed(_stream_seed(s["seed"], 1))
    aug_gen = torch.Generator().manual_seed(_stream_seed(s["seed"], 2))
    start_epoch, start_step, global_step, elapsed = 0, 0, 0, 0.0
    best = dict(epoch=None, step=None, val_error=None, test_error=None)
    eval_every = s["eval_every_steps"]
    totals_state = None
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["settings"]["lr"] != s["lr"]:
            _change_lr(optimizer, scheduler, checkpoint["settings"]["lr"], s["lr"])
            say(f"--lr changed from {checkpoint['settings']['lr']} to {s['lr']} (recorded in metrics.jsonl and "
                "summary.json)")
        _restore_rng(checkpoint["rng"], order_gen, aug_gen, gate_sampler, device)
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step"]
        global_step, elapsed, best = checkpoint["global_step"], checkpoint["elapsed"], checkpoint["best"]
        totals_state = checkpoint["totals"]
        say(f"resuming {out} at epoch {start_epoch + 1}, step {start_step} (global step {global_step})")
        if checkpoint["world_size"] != dist.world and dist.main:
            # Same global batches and gates, but BatchNorm sees other per-process batches: not bit-identical.
            print(f"warning: the run was checkpointed with {checkpoint['world_size']} process(es) and resumes "
                  f"with {dist.world}; it continues correctly but not bit for bit", file=sys.stderr)

    model = torch.compile(raw_model) if s["compile"] else raw_model
    eval_model = model
    if dist.enabled:
        # A plain DDP: every rank skips the same blocks (shared gate seed), and a skipped block's parameters
        # get zero gradients, so every parameter has a gradient in every step.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    no_sync = model.no_sync if dist.enabled else nullcontext
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext

    # Run folder
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
        _truncate_lines(out / "metrics.jsonl", lambda line: json.loads(line)["step"] <= global_step)
    gates_file = None
    if s["record_gates"]:
        if dist.enabled:
            torch_dist.barrier()  # the folder exists
        gates_path = out / f"gates_rank{dist.rank}.txt"
        _truncate_lines(gates_path, lambda line: int(line.split(" ", 1)[0]) <= global_step)
        gates_file = open(gates_path, "a")

    def save_checkpoint(epoch: int, step: int, totals: EpochTotals, order_state, aug_state) -> None:
        """Everything needed to continue at (epoch, step): the data plan is redrawn from the epoch-start
        states of its generators, the other random states are those of this moment."""
        if gates_file is not None:
            gates_file.flush()
        if dist.main:
            save_state(out / CHECKPOINT_NAME, dict(
                format=CHECKPOINT_FORMAT, settings=s, epoch=epoch, step=step, global_step=global_step,
                world_size=dist.world,
                elapsed=elapsed + time.perf_counter() - start_time, best=best, totals=totals.to_state(),
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                rng=_rng_states(order_state, aug_state, gate_sampler, device)))

    def check_finite(epoch: int, step: int, loss_sum: Tensor, with_state: bool) -> None:
        what = _divergence(loss_sum, raw_model if with_state else None, dist)
        if what is None:
            return
        if (out / CHECKPOINT_NAME).exists():
            advice = (f"the last good checkpoint, {out / CHECKPOINT_NAME}, is kept. Continue from it with a lower "
                      f"learning rate: --resume {out} --lr {s['lr'] / 10:g}; or check the data")
        else:
            advice = ("no checkpoint had been written yet. Start again with a lower --lr (into a new --output), "
                      "or check the data")
        raise Diverged(f"{what} became NaN or infinite in epoch {epoch + 1} (by step {step} of "
                       f"{steps_per_epoch}); training stopped and {advice}")

    def run_evaluation(epoch: int) -> Dict[str, Any]:
        """Validation and test loss and error of the weights now; the best weights are those of the lowest
        validation error so far (of the latest evaluation when there is no validation set)."""
        nonlocal best
        started = time.perf_counter()
        val_loss = val_error = None
        if data.val is not None:
            val_loss, val_error = evaluate(eval_model, data, "val", dist, eval_batch, device, channels_last)
        if data.test_is_val:
            test_loss, test_error = val_loss, val_error
        else:
            test_loss, test_error = evaluate(eval_model, data, "test", dist, eval_batch, device, channels_last)
        improved = val_error is None or best["val_error"] is None or val_error < best["val_error"]
        if improved:
            best = dict(epoch=epoch + 1, step=global_step, val_error=val_error, test_error=test_error)
            if dist.main:
                # config.json is rewritten with every model.safetensors, from the same model: they always agree.
                save_model_config(out / CONFIG_NAME, raw_model, data.data_config(), tag=s["dataset"],
                                  label_names=data.classes)
                save_weights(out / WEIGHTS_NAME, raw_model)
        return dict(val_loss=val_loss, val_error=val_error, test_loss=test_loss, test_error=test_error,
                    eval_time_s=time.perf_counter() - started)

    def record_evaluation(epoch: int, lr: float) -> None:
        """An evaluation inside the epochs (--eval-every-steps): a line of metrics.jsonl of its own."""
        result = run_evaluation(epoch)
        if dist.main:
            record = dict(kind="eval", epoch=epoch + 1, step=global_step, epochs_done=global_step / steps_per_epoch,
                          lr=lr, **result)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if not s["quiet"]:
                val = "-" if result["val_error"] is None else f"{result['val_error']:.2f}%"
                tqdm.write(f"step {global_step} (epoch {epoch + 1})  val err {val}  test err "
                           f"{result['test_error']:.2f}%  lr {lr:.3g}  best val @ step {best['step']}")

    def summarize(finished: bool) -> Dict[str, Any]:
        """summary.json: the paper's number (test error at the evaluation of best validation error) and context."""
        records = read_metrics(out / "metrics.jsonl") if dist.main else []
        evals = evaluations(records)
        points = f"evaluation (every {eval_every} steps)" if eval_every else "epoch"
        return dict(
            finished=finished, epochs_done=len(epoch_records(records)), evaluations=len(evals),
            best_epoch=best["epoch"], best_step=best.get("step"), best_val_error=best["val_error"],
            test_error=best["test_error"],
            test_accuracy=None if best["test_error"] is None else 100.0 - best["test_error"],
            selection=(f"{points} of lowest validation error" if best["val_error"] is not None
                       else f"last {points} (no validation set)"),
            test_set="the validation set (no separate test set)" if data.test_is_val else "test",
            last_epoch_test_error=evals[-1]["test_error"] if evals else None,
            total_time_s=elapsed + time.perf_counter() - start_time, world_size=dist.world, device=device.type,
            num_blocks=num_blocks, expected_depth=expected_depth, lr_changes=s.get("lr_changes", []), settings=s)

    say(f"{s['model']} on {s['dataset']}: {len(data)} training images, {steps_per_epoch} steps of {global_batch} "
        f"per epoch, {dist.world} process(es) on {device}, expected depth {expected_depth:.2f} of {num_blocks} "
        f"blocks; run folder {out}")
    from tqdm import tqdm

    model.train()
    for epoch in range(start_epoch, s["epochs"]):
        order_state, aug_state = order_gen.get_state(), aug_gen.get_state()  # epoch-start states
        plan = data.plan_epoch(order_gen, aug_gen)
        step = start_step if epoch == start_epoch else 0
        totals = (EpochTotals.from_state(totals_state, device) if epoch == start_epoch and totals_state
                  else EpochTotals.zeros(len(groups), device))
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch + 1}/{s['epochs']}", leave=False,
                   disable=not dist.main or s["quiet"], dynamic_ncols=True)
        window_start, window_images, window_loss = time.perf_counter(), 0, totals.loss_sum.item()
        t0 = time.perf_counter()
        for x, y in data.train_batches(plan, step, steps_per_epoch, dist.rank, dist.world, local_batch, device):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            apply_drop_warmup(gate_sampler, global_step, s["epochs"] * steps_per_epoch, s["drop_warmup"])
            loss_sum, correct, grad_abs = train_step(
                model, optimizer, x, y, gate_sampler=gate_sampler, accum_steps=accum, autocast=autocast,
                no_sync=no_sync, grad_groups=groups)
            totals.grad_abs += grad_abs
            step += 1
            global_step += 1
            totals.loss_sum += loss_sum
            totals.correct += correct
            totals.seen += len(y)
            totals.steps += 1
            totals.depth_sum += gate_log.depth()
            if gates_file is not None:
                gates_file.write(f"{global_step} {gate_log.line()}\n")
            bar.update(1)
            last_step = step == steps_per_epoch
            if eval_every and global_step % eval_every == 0:
                if not sync_bn:
                    _sync_buffers(raw_model, dist)  # rank 0's statistics, which DDP gives every rank anyway
                check_finite(epoch, step, totals.loss_sum, with_state=True)  # before the weights may be saved
                totals.train_time += time.perf_counter() - t0
                record_evaluation(epoch, lr)
                t0 = time.perf_counter()
            if step % s["log_every"] == 0 or last_step:
                check_finite(epoch, step, totals.loss_sum, with_state=False)
                now, loss_now = time.perf_counter(), totals.loss_sum.item()
                local_images = totals.seen - window_images
                bar.set_postfix(loss=f"{(loss_now - window_loss) / max(1, local_images):.4f}", lr=f"{lr:.3g}",
                                img_s=f"{local_images * dist.world / max(now - window_start, 1e-9):.0f}",
                                depth=f"{totals.depth_sum / totals.steps:.1f}/{num_blocks} (E {expected_depth:.1f})")
                window_start, window_images, window_loss = now, totals.seen, loss_now
            if s["checkpoint_every_steps"] and global_step % s["checkpoint_every_steps"] == 0 and not last_step:
                check_finite(epoch, step, totals.loss_sum, with_state=True)
                totals.train_time += time.perf_counter() - t0
                save_checkpoint(epoch, step, totals, order_state, aug_state)
                t0 = time.perf_counter()
        bar.close()
        train_loss_sum = _all_reduce(totals.loss_sum.clone(), dist).item()
        train_correct = _all_reduce(totals.correct.double(), dist).item()
        totals.train_time += time.perf_counter() - t0
        seen = totals.seen * dist.world
        scheduler.step()
        if not sync_bn:
            _sync_buffers(raw_model, dist)
        check_finite(epoch, step, totals.loss_sum, with_state=True)  # before anything is saved

        # Evaluation: the full network, each branch scaled by its survival probability; with --eval-every-steps
        # the evaluations came during the epoch, and the run's last step gets one if it fell between two.
        no_evaluation = dict(val_loss=None, val_error=None, test_loss=None, test_error=None, eval_time_s=0.0)
        if not eval_every:
            result = run_evaluation(epoch)
        else:
            result = no_evaluation
            if epoch + 1 == s["epochs"] and global_step % eval_every:
                record_evaluation(epoch, lr)
        grad_abs = totals.grad_abs.cpu()  # the same on every rank: gradients are all-reduced before the step
        record = dict(
            kind="epoch", epoch=epoch + 1, step=global_step, lr=lr, train_loss=train_loss_sum / seen,
            train_error=100.0 * (1.0 - train_correct / seen), val_loss=result["val_loss"],
            val_error=result["val_error"], test_loss=result["test_loss"], test_error=result["test_error"],
            epoch_time_s=totals.train_time + result["eval_time_s"], train_time_s=totals.train_time,
            img_per_s=seen / max(totals.train_time, 1e-9), mean_depth=totals.depth_sum / max(1, totals.steps),
            expected_depth=expected_depth,
            grad_mean_abs={k: v for k, v in zip(groups, (grad_abs / (group_sizes * max(1, totals.steps))).tolist())})
        for change in s.get("lr_changes", []):  # a --lr given on resume took effect in this epoch
            if change["epoch"] == epoch:
                record["lr_change"] = change
        if dist.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        save_checkpoint(epoch + 1, 0, EpochTotals.zeros(len(groups), device), order_gen.get_state(),
                        aug_gen.get_state())
        if dist.main and not s["quiet"]:
            errors = "" if eval_every else (
                f"val err {'-' if result['val_error'] is None else format(result['val_error'], '.2f') + '%'}  "
                f"test err {result['test_error']:.2f}%  ")
            tqdm.write(f"epoch {epoch + 1}/{s['epochs']}  loss {record['train_loss']:.4f}  train err "
                       f"{record['train_error']:.2f}%  {errors}lr {lr:.3g}  "
                       f"{record['img_per_s']:.0f} img/s  depth {record['mean_depth']:.1f}/{num_blocks}  "
                       f"best val @ {'step ' + str(best['step']) if eval_every else best['epoch']}")
        if dist.main:
            save_json(out / "summary.json", summarize(finished=False))

    if gates_file is not None:
        gates_file.close()
    summary = summarize(finished=True)
    if dist.main:
        save_json(out / "summary.json", summary)
        plot_curves(out / "metrics.jsonl", out / "curves.png",
                    title=f"{s['model']} on {s['dataset']} (p_L = {s['survival_prob']}, {s['survival_rule']})")
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    settings = None
    try:
        settings, checkpoint = resolve_settings(args)
        summary = train(settings, checkpoint)
    except Diverged as e:
        if rank0:
            print(f"{parser.prog}: stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (TrainError, DataError, CheckpointError, RunFolderBusy) as e:
        if rank0:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, a file limit, no permission: the files written before are intact
        if rank0:
            where = f" ({e.filename})" if e.filename else ""
            print(f"{parser.prog}: error: cannot write the run folder{where}: {e.strerror or e}; the files "
                  "written before are intact (continue with --resume once there is room)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if rank0:
            checkpoint_path = settings and Path(settings["output"]) / CHECKPOINT_NAME
            if checkpoint_path and checkpoint_path.exists():
                status = f"the last checkpoint, {checkpoint_path}, is kept (continue with --resume)"
            else:
                status = "stopped before the first checkpoint: there is nothing to resume"
            print(f"{parser.prog}: interrupted; {status}", file=sys.stderr)
        return 130
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    if rank0:
        test = "-" if summary["test_error"] is None else f"{summary['test_error']:.2f}%"
        at = f"step {summary['best_step']} (epoch {summary['best_epoch']})" if settings["eval_every_steps"] \
            else f"epoch {summary['best_epoch']}"
        print(f"done: best validation at {at}, test error there {test} "
              f"(accuracy {summary['test_accuracy']:.2f}%), {summary['total_time_s']:.1f} s; "
              f"run folder {settings['output']}")
    return 0
