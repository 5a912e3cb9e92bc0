"""Single process or torchrun: which rank this is, and running a step on rank 0 first."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group when RANK/WORLD_SIZE are set (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, 0)
    import torch
    import torch.distributed as dist

    from gen_cli.runtime import resolve_device

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device_name).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def main_first(dist: Dist, fn: Callable[[], Any]) -> Any:
    """Rank 0 computes (and caches) first; the others wait, then read what it cached."""
    if dist.main:
        result = fn()
        dist.barrier()
        return result
    dist.barrier()
    return fn()
