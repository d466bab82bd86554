"""The processes of a run and what they share: torchrun's ranks, the device, the global batch's split, the data,
SyncBatchNorm and the DDP wrapper."""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as torch_dist
from timm.utils import distribute_bn
from torch import Tensor, nn

from sdzoo.training.data import DataError, load_data
from sdzoo.training.settings import Settings, TrainError

__all__ = ["Dist", "setup_processes", "all_reduce", "local_batch_size", "load_data_everywhere", "use_sync_batchnorm",
           "sync_batchnorm_statistics", "wrap_model"]


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


def setup_processes(s: Settings) -> Tuple[Dist, torch.device]:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or a single process; the device to train on."""
    if s.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available here; use --device cpu (or auto)")
    use_cuda = s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available())
    dist = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not s.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if s.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if s.threads:
        torch.set_num_threads(s.threads)
    if dist.enabled and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist, device


def all_reduce(t: Tensor, dist: Dist, op=torch_dist.ReduceOp.SUM) -> Tensor:
    """``t`` reduced in place over the processes (itself on one process)."""
    if dist.enabled:
        torch_dist.all_reduce(t, op=op)
    return t


def local_batch_size(s: Settings, dist: Dist) -> int:
    """The global batch is split over the processes, then over micro-batches."""
    if s.batch_size % (dist.world * s.accum_steps):
        raise TrainError(f"--batch-size {s.batch_size} must be divisible by processes x --accum-steps "
                         f"({dist.world} x {s.accum_steps})")
    return s.batch_size // dist.world


def load_data_everywhere(s: Settings, dist: Dist, device: torch.device):
    """Rank 0 loads first (it may download), then the others; an error on rank 0 stops every rank. In-memory
    data then moves to the GPU, so that a batch is an index and its augmentation a tensor op."""
    def load():
        return load_data(s.dataset, s.data_dir, download=s.download, val_size=s.val_size, split_seed=s.split_seed,
                         image_size=s.image_size, num_classes=s.num_classes, shift=s.shift, hflip=s.hflip,
                         workers=s.workers, color_jitter=s.color_jitter, lighting=s.lighting)
    data, error = None, [None]
    if dist.main:
        try:
            data = load()
        except DataError as e:
            error = [str(e)]
    if dist.enabled:
        torch_dist.broadcast_object_list(error, 0)  # rank 0's error, or None, to every rank
    if error[0]:
        raise DataError(error[0])
    data = data if dist.main else load()
    if device.type == "cuda":
        data.to(device)  # in-memory data moves; folder data stays with its loader
    if len(data) < s.batch_size:
        raise TrainError(f"--batch-size {s.batch_size} is larger than the {len(data)} training images")
    return data


def use_sync_batchnorm(s: Settings, dist: Dist, cuda: bool, micro_batch: int) -> bool:
    """Whether BatchNorm normalises over every process's images. Where the settings ask for it but it cannot
    run (gloo on CPUs), rank 0 says once what differs."""
    if s.sync_bn and dist.enabled and not cuda and dist.main:
        print(f"warning: SyncBatchNorm runs on GPUs only, so on these {dist.world} CPU processes BatchNorm "
              f"normalises each process's own {micro_batch} images, not the {micro_batch * dist.world} of "
              f"the step across processes as the recipe's single-GPU BatchNorm did (a single process with "
              f"--accum-steps {dist.world} would match this run); pass --no-sync-bn to accept it silently",
              file=sys.stderr)
    return s.sync_bn and dist.enabled and cuda


def sync_batchnorm_statistics(model: nn.Module, dist: Dist) -> None:
    """Rank 0's BatchNorm statistics on every rank (what DDP gives every rank at its next forward anyway)."""
    if dist.enabled and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        distribute_bn(model, dist.world, reduce=False)


def wrap_model(model: nn.Module, s: Settings, dist: Dist, device: torch.device):
    """(the model that trains, the one that evaluates, the no_sync context for all but a step's last
    micro-batch): compiled with ``compile``, and the training one in DDP on several processes."""
    if s.compile:
        model = torch.compile(model)
    if not dist.enabled:
        return model, model, nullcontext
    # A plain DDP: every rank skips the same blocks (shared gate seed), and a skipped block's parameters get
    # zero gradients, so every parameter has a gradient in every step.
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, model, ddp.no_sync
