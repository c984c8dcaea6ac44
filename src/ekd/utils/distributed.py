"""Process-group setup and global-batch gathering for ``torchrun`` training.

With several processes, EKD and every relational distiller must see the *global* batch: the
low-FPR thresholds only exist among enough negatives. Student embeddings are gathered with a
differentiable all-gather (:func:`ekd.heads.partial_fc.gather_global_batch`); teacher
embeddings with a plain one.

Gradient scale. Every rank computes the same distillation loss ``L`` on the gathered batch.
The backward of the differentiable all-gather sums, for rank r's slice, the gradients of all
ranks' (identical) losses: ``W * dL/de_r``. DDP then averages parameter gradients over the W
ranks, so the update is exactly ``dL/dtheta`` of the single-process loss on the concatenated
batch: loss weights mean the same for any world size. (A plain gather that keeps only the local
slice's gradient, followed by the DDP average, would scale the distillation gradient by 1/W;
summing instead of averaging would scale it by W.)
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ekd.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank and world size from the ``torchrun`` environment (single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group started by ``torchrun`` (NCCL on GPU, Gloo on CPU)."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group. Unreachable objects that still hold it (a dropped DDP wrapper
    in a reference cycle) are collected first, so that destroying it joins its threads."""
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order (no gradient)."""
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def average_replicated_grads(module: torch.nn.Module, info: DistInfo) -> None:
    """Average the gradients of a module replicated on every rank (the distillers; DDP does the
    student's). Each rank computed the same global-batch loss, so the mean is that gradient."""
    if not info.enabled:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world_size


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    """Mean of a Python number over ranks (for logging)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
