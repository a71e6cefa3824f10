"""Data-parallel training through torchrun: PyTorch's DistributedDataParallel, NCCL on CUDA, gloo on CPU.

`torchrun --nproc_per_node N -m sdcompress train ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; this
module reads them, and everything else in the training loop asks `Dist` what to do (which device, which shard,
whether to write). A single process is a world of size 1 and takes none of these paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    backend: str | None = None  # nccl | gloo under torchrun

    @property
    def enabled(self) -> bool:
        return self.world > 1 or dist.is_initialized()

    @property
    def main(self) -> bool:
        """Only rank 0 writes checkpoints and logs and shows progress."""
        return self.rank == 0

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_sum(t) / self.world if self.enabled else t

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_name: str) -> tuple[Dist, str]:
    """Join the process group torchrun describes (if any); the device name this rank should use."""
    if not launched_by_torchrun():
        return Dist(), device_name
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if cuda:
        torch.cuda.set_device(local)
    return Dist(rank, world, backend), f"cuda:{local}" if cuda else "cpu"


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
