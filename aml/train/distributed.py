"""torch.distributed plumbing for `torchrun --nproc_per_node N aml distill ...` (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def gather_rows(d: Dist, part: np.ndarray, n: int) -> np.ndarray:
    """Reassemble rows computed round-robin (rank r holds rows r, r + world, ...) into (n, ...) on every rank."""
    if d.world == 1:
        return part
    parts: list[np.ndarray | None] = [None] * d.world
    dist.all_gather_object(parts, part)
    out = np.empty((n, *part.shape[1:]), dtype=part.dtype)
    for r, p in enumerate(parts):
        out[r :: d.world] = p
    return out


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def average_grads(d: Dist, params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters DDP does not hold (an objective's own, learned proxies) across ranks."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= d.world
