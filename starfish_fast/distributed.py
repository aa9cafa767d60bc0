"""Several processes under torchrun: one per GPU (or CPU processes with gloo), the global batch split
evenly across them, gradients averaged by ``DistributedDataParallel``; nothing home-made.

    torchrun --nproc-per-node 8 -m starfish_fast recover --model-name ... --mode fast
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m starfish_fast recover ...

    from starfish_fast import distributed
    group = distributed.join("auto", "cuda")      # None outside torchrun; else rank, world size, device

``join`` starts the process group from torchrun's environment (NCCL with CUDA, gloo on the CPU) once
per process; the device is ``cuda:LOCAL_RANK``. Outside torchrun (WORLD_SIZE unset or 1) nothing
changes. Rank 0 alone logs at INFO, shows progress and writes files.
"""
from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the processes (a new tensor; the backend's device)."""
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced / self.world_size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    def gather(self, value) -> list:
        """Every process's ``value`` (picklable), in rank order."""
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def current() -> Group | None:
    """The job this process belongs to, if ``join`` started one (or the caller initialised the group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                 dist.get_backend())


def join(setting: str, device_type: str) -> Group | None:
    """The torchrun job of this process, joined once (``setting``: HealConfig.distributed, auto | off)."""
    if setting == "off" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
        # the group this module started is destroyed before the interpreter exits: left to the
        # backend's destructors at exit, a gloo worker sometimes aborted there ("terminate called
        # without an active exception") after every result had been written
        atexit.register(leave)
        if dist.get_rank() != 0:          # one voice for the whole job
            logging.getLogger("starfish_fast").setLevel(logging.WARNING)
    return current()


def leave() -> None:
    """Destroy the process group, if one is up (what ``join`` registers to run at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_batches(batches: Sequence[torch.Tensor], group: Group | None) -> list[torch.Tensor]:
    """This process's slice of each global batch: the same steps as one process, up to reduction order."""
    if group is None:
        return list(batches)
    for i, batch in enumerate(batches):
        if batch.shape[0] % group.world_size:
            which = "the batch size" if i == 0 else f"calibration batch {i} (the last)"
            raise ValueError(f"{which} is {batch.shape[0]} images, not divisible by the {group.world_size} "
                             f"processes of this torchrun job: choose a batch size (and a calibration count) "
                             f"that {group.world_size} divides")
    return [batch.chunk(group.world_size)[group.rank] for batch in batches]


class BlockForward(nn.Module):
    """A module whose forward is the adapter's block forward: what DDP wraps, so that the gradients of the
    trainable weights are averaged in the backward (bucketed, overlapped); frozen weights never travel."""

    def __init__(self, model: nn.Module, adapter, blocks: Sequence[str]):
        super().__init__()
        self.model, self.adapter, self.blocks = model, adapter, tuple(blocks)

    def forward(self, images: torch.Tensor, need_logits: bool):
        return self.adapter.forward_blocks(self.model, images, self.blocks, need_logits=need_logits)


def data_parallel(model: nn.Module, adapter, blocks: Sequence[str], device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over the block forward. ``static_graph``: the same weights get gradients
    every step (scope weights the loss never reaches, e.g. after the last block, are then allowed)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(BlockForward(model, adapter, blocks),
                                   device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)


def sync_batchnorm(model: nn.Module, device: torch.device) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm of ``model`` swapped for a SyncBatchNorm (statistics over the whole global batch);
    the originals, to put back with ``restore_modules``. CUDA only, as SyncBatchNorm (the plan checks)."""
    from starfish_fast.models import set_submodule

    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            synced = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats).to(device)
            synced.weight, synced.bias = module.weight, module.bias
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
            synced.train(module.training)
            set_submodule(model, name, synced)
            swapped.append((name, module))
    return swapped


def restore_modules(model: nn.Module, swapped: list[tuple[str, nn.Module]]) -> None:
    """Put back modules swapped out (they share their parameters and buffers with the stand-ins)."""
    from starfish_fast.models import set_submodule

    for name, module in swapped:
        set_submodule(model, name, module)
