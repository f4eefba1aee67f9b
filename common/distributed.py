"""Several processes training one model (`torchrun`): process group, DDP wrapper, SyncBatchNorm, rank-0 helpers.

    torchrun --nproc_per_node=4 train_lite_model.py --key=value ...

torchrun starts one process per GPU (or per CPU share) and sets RANK, WORLD_SIZE and LOCAL_RANK. Without them (a
plain `python script.py`, or torchrun with one process) every function here is a no-op, so one process trains
exactly as it always has. With them:
- `init_distributed` (called by `training.runtime.setup_runtime`) joins the process group: NCCL on CUDA, gloo on
  the CPU; process i of a node uses cuda:LOCAL_RANK; other ranks' stdout is silenced;
- `wrap_model` puts this stage's trainable parameters under DistributedDataParallel (gradients averaged over the
  processes before clipping, so the clip norm and the GradScaler's decision are the same on every rank);
- rank 0 alone writes files and evaluates (`from_main` runs a computation there and hands its result to every
  rank); every rank still takes part in every collective.
BATCH_SIZE is per process: N processes x BATCH_SIZE is one optimizer step's batch.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")

# Rank 0 may prepare the data cache (preprocessing RAVDESS takes tens of minutes) while the others wait at a
# barrier; the default 10-30 min timeout would kill them. A dead process is noticed by torchrun, not by this timeout.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    """This process's index on its node (its GPU), from torchrun's LOCAL_RANK."""
    return int(os.environ.get("LOCAL_RANK", 0)) if dist.is_initialized() else 0


def is_main() -> bool:
    """True in the one process that writes files, prints and evaluates (rank 0; the only one without torchrun)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun started several processes (WORLD_SIZE > 1); torchrun with one process is one process."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def init_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL for CUDA, gloo for the CPU) and return the device of this process
    (cuda:LOCAL_RANK for CUDA); in a single process, `device` unchanged and nothing else happens.

    Rendezvous (MASTER_ADDR/PORT, or torchrun's c10d endpoint) comes from torchrun's environment variables.
    """
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
        if not is_main():
            # One copy of every line: rank 0's. Errors (stderr) still come from every rank.
            sys.stdout = open(os.devnull, "w")
    return device


def cleanup() -> None:
    """Leave the process group (run_script calls it when a script ends)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 only, its result (any picklable value) returned on every rank.

    For what must happen once: reading a checkpoint, evaluating a split, writing the final metrics.
    """
    if not dist.is_initialized():
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] in one process."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over the processes (epoch statistics of each rank's share of the data)."""
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return total.tolist()


def all_ranks_true(flag: bool) -> bool:
    """True when `flag` is true on every rank (e.g. a finite loss), so all processes take the same branch."""
    if not dist.is_initialized():
        return flag
    agreed = torch.tensor(int(flag), device=_collective_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap_model(model: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """The model to train this stage with: DDP over its trainable parameters under torchrun, the model itself in one
    process. Call it again after `set_trainable` changes which parameters train (DDP registers them once).

    `find_unused_parameters`: a modality dropped from every clip of a batch, or a missing-modality token no clip
    needed, leaves parameters without a gradient in that step. Keep using the returned module only for the training
    forward; everything else (evaluation, EMA, checkpoints, `model.config`) uses `model` itself.
    """
    if not dist.is_initialized():
        return model
    if sync_batchnorm:
        convert_sync_batchnorm(model, device)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> None:
    """Replace, in place, every BatchNorm of `model` by one whose training statistics are those of the global batch
    (all processes): torch's SyncBatchNorm on CUDA, `GlooSyncBatchNorm` on the CPU (torch's runs on GPUs only).
    Weights and running statistics are the same tensors, so the optimizer and checkpoints are unaffected."""
    sync_class = nn.SyncBatchNorm if device.type == "cuda" else GlooSyncBatchNorm
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, _BatchNorm) and not isinstance(child, (nn.SyncBatchNorm, GlooSyncBatchNorm)):
                setattr(parent, name, _as_sync(child, sync_class))


def _as_sync(bn: _BatchNorm, sync_class: type[_BatchNorm]) -> _BatchNorm:
    sync = sync_class(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    return sync


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm over the whole global batch on any device (all-reduced sums, differentiable through
    `torch.distributed.nn.functional.all_reduce`); plain BatchNorm in eval mode or in one process."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        reduce_dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()  # statistics in float32, as BatchNorm does under autocast
        count = dist_functional.all_reduce(torch.tensor([xf.numel() / xf.shape[1]], device=x.device))
        mean = dist_functional.all_reduce(xf.sum(reduce_dims)) / count
        centred = xf - mean.view(shape)
        # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels badly.
        var = dist_functional.all_reduce(centred.square().sum(reduce_dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of an index order, as `DistributedSampler` makes it: padded by repeating its start to a
    multiple of the world size, then every world_size-th index from this rank; all of it in one process."""
    n_ranks = world_size()
    if n_ranks == 1 or len(indices) == 0:
        return indices
    total = math.ceil(len(indices) / n_ranks) * n_ranks
    padded = indices.repeat(math.ceil(total / len(indices)))[:total]
    return padded[rank()::n_ranks]
