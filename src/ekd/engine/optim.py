"""Optimiser and learning-rate schedule as in arcface_torch / the EKD paper.

SGD with momentum; weight decay on conv/linear weights and class centres only (none on
batch-norm parameters, PReLU slopes and biases, i.e. on 1-D tensors). The schedule is applied
per iteration: linear warm-up, then cosine decay to 0 or step decay at epoch milestones.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (>= 2-D) and an undecayed one."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(modules: Iterable[nn.Module], lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(modules, weight_decay), lr=lr, momentum=momentum)


def lr_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str,
              milestones_steps: list[int] | None = None, gamma: float = 0.1) -> float:
    """Multiplier of the base LR at ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    passed = sum(step >= m for m in (milestones_steps or []))
    return gamma ** passed


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    scheduler: str, milestones_steps: list[int] | None = None,
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, scheduler, milestones_steps, gamma))


@torch.no_grad()
def clip_grad_norm(replicated: Iterable[nn.Parameter], sharded: Iterable[nn.Parameter],
                   max_norm: float, distributed: bool = False) -> torch.Tensor:
    """Scale every gradient by ``min(1, max_norm / ||g||)``, ``||g||`` the L2 norm over all
    trained parameters (as ``torch.nn.utils.clip_grad_norm_``; AdaDistill's recipe: 5).

    ``replicated`` parameters are the same on every rank (after DDP's averaging); ``sharded``
    ones (Partial FC's class shards) differ per rank, so their squared norms are summed over
    ranks: the norm and the scaling equal the single-process ones. A collective when
    ``distributed``. Returns the norm before clipping (non-finite gradients stay non-finite).
    """
    rep = [p.grad for p in replicated if p.grad is not None]
    shard = [p.grad for p in sharded if p.grad is not None]
    device = (rep + shard)[0].device if rep + shard else torch.device("cpu")
    sq_rep = torch.zeros((), dtype=torch.float64, device=device)
    sq_shard = torch.zeros((), dtype=torch.float64, device=device)
    for g in rep:
        sq_rep += g.double().pow(2).sum()
    for g in shard:
        sq_shard += g.double().pow(2).sum()
    if distributed:
        dist.all_reduce(sq_shard)
    total = (sq_rep + sq_shard).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in rep + shard:
        g.mul_(coef.to(g.dtype))
    return total
