"""Class-parallel softmax primitives shared by Partial FC and the classifier-based distillers.

Partial FC (An et al., ICCVW 2021, Sec. 3.1) splits the ``C`` class centres into contiguous
shards, one per rank; every rank receives the global batch, computes logits against its own
shard only, and completes the softmax with all-reduces of the row maximum, the sum of
exponentials and the target logit, so no rank holds ``[B, C]`` logits or all ``C`` centres.
Sampling (Sec. 3.2 ICCVW / Sec. 3 CVPR 2022) keeps every positive class of the batch plus
uniform negatives, ``max(ceil(sample_rate * shard_size), #positives)`` per shard.

:class:`ClassShard` describes one rank's range; :func:`sample_classes`,
:func:`shard_margin_cross_entropy` and :func:`shard_kl_div` work on it. Gradient rule (as in
:mod:`ekd.heads.partial_fc`): the global embeddings pass through :class:`SumGradAcrossRanks`
(identity forward, SUM of the gradient over ranks backward), so each rank's embedding gradient
holds every shard's contribution, and each rank's gradient for its own centre rows is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ekd.errors import ConfigError
from ekd.functional import unit


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of the classes owned by ``rank``; the first
    ``num_classes % world_size`` ranks get one class more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class ClassShard:
    """The classes ``[start, end)`` of ``num_classes`` held by ``rank`` of ``world_size``, and
    how many centres a training step keeps (``num_sample``; all of the shard at rate 1)."""

    num_classes: int
    rank: int = 0
    world_size: int = 1
    sample_rate: float = 1.0
    group: Any = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"class shard: need 0 <= rank < world_size, got {self.rank}, {self.world_size}")
        if self.num_classes < self.world_size:
            raise ConfigError(f"class shard: num_classes {self.num_classes} < world_size "
                              f"{self.world_size}: every rank needs at least one class")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"class shard: sample_rate must be in (0, 1], got {self.sample_rate}")

    @property
    def start(self) -> int:
        return shard_range(self.num_classes, self.rank, self.world_size)[0]

    @property
    def end(self) -> int:
        return shard_range(self.num_classes, self.rank, self.world_size)[1]

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def num_sample(self) -> int:
        # ceil with a guard against float noise (0.1 * 30 = 3.0000000000000004)
        return min(self.size, max(1, math.ceil(round(self.sample_rate * self.size, 9))))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a full ``[C, ...]`` tensor."""
        if full.shape[0] != self.num_classes:
            raise ConfigError(f"class shard: expected {self.num_classes} rows, got {tuple(full.shape)}")
        return full[self.start:self.end]

    def all_reduce(self, x: torch.Tensor, op: Any = None) -> torch.Tensor:
        """In-place all-reduce (SUM unless ``op``) over the shard's group; no-op on one rank."""
        if self.distributed:
            dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return x

    def owned_rows(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask of the samples whose class is in this shard, and their local row (-1 elsewhere)."""
        local = labels - self.start
        mine = (local >= 0) & (local < self.size)
        return mine, torch.where(mine, local, torch.full_like(local, -1))


    def lookup(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Row ``labels[i]`` of the full matrix for every sample, from this shard's ``rows``
        (``[size, d]``) and the others' by all-reduce (no gradient)."""
        mine, local = self.owned_rows(labels)
        out = rows.new_zeros(labels.shape[0], rows.shape[1])
        out[mine] = rows[local[mine]].detach()
        return self.all_reduce(out)


def sample_classes(labels: torch.Tensor, shard: ClassShard,
                   training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept local centre indices (sorted) and each row's column among them (-1: elsewhere).

    Keeps every positive class of the batch owned by the shard plus uniformly sampled
    negatives, ``max(num_sample, #positives)`` in total (Partial FC, CVPR 2022, Sec. 3); all
    of the shard outside training or at sample rate 1. Draws from torch's global RNG.
    """
    in_shard, local = shard.owned_rows(labels)
    if not (training and shard.num_sample < shard.size):
        return torch.arange(shard.size, device=labels.device), local
    positives = torch.unique(local[in_shard])
    score = torch.rand(shard.size, device=labels.device)
    score[positives] = 2.0  # above any uniform draw: positives always survive top-k
    keep = max(shard.num_sample, int(positives.numel()))
    index = torch.topk(score, k=keep, sorted=False).indices.sort().values
    remap = torch.full((shard.size,), -1, dtype=torch.long, device=labels.device)
    remap[index] = torch.arange(keep, device=labels.device)
    column = torch.full_like(local, -1)
    column[in_shard] = remap[local[in_shard]]
    return index, column


class SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; all-reduce (SUM) of the gradient backward, so that the gradient w.r.t.
    the replicated global embeddings gathers the contributions of every class shard."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over class shards (Partial FC, ICCVW 2021, Sec. 3.1).

    ``logits`` [B, k] are this rank's (scaled, margin-applied) logits; ``local_target`` [B] is
    the column of the target in ``logits`` or -1 when the target class lives on another rank.
    The global max, the sum of exponentials and the target logit are combined with all-reduce;
    the backward returns the exact ``(softmax - one_hot) / B`` for the local columns.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, local_target: torch.Tensor, group: Any,
                distributed: bool) -> torch.Tensor:
        batch = logits.shape[0]
        row_max = logits.detach().max(dim=1).values
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(logits.detach() - row_max[:, None])
        sum_exp = exp.sum(dim=1)
        if distributed:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        has = local_target >= 0
        rows = torch.arange(batch, device=logits.device)
        target = torch.zeros(batch, dtype=logits.dtype, device=logits.device)
        target[has] = logits.detach()[rows[has], local_target[has]] - row_max[has]
        if distributed:
            dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
        loss = (torch.log(sum_exp) - target).mean()
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local_target)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        prob, local_target = ctx.saved_tensors
        grad = prob.clone()
        has = local_target >= 0
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows[has], local_target[has]] -= 1.0
        return grad * (grad_out / grad.shape[0]), None, None, None


def shard_margin_cross_entropy(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               shard: ClassShard, target_logit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                               scale: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean margin-softmax CE of the global batch ``emb`` against this rank's centre
    rows ``weight`` [shard.size, d] (sampled in training when ``sample_rate < 1``).

    ``target_logit(cos_target, rows)`` applies the margin to the target cosines of batch rows
    ``rows``. Returns the loss (the same on every rank) and the kept local centre indices.
    """
    index, column = sample_classes(labels, shard, training)
    if shard.distributed:
        emb = SumGradAcrossRanks.apply(emb, shard.group)
    kept = weight if index.numel() == shard.size else weight[index]
    cos = F.linear(unit(emb), unit(kept.to(emb.dtype))).clamp(-1, 1)
    has = column >= 0
    rows = torch.arange(cos.shape[0], device=cos.device)[has]
    logits = cos.clone()
    logits[rows, column[has]] = target_logit(cos[rows, column[has]], rows)
    loss = DistSoftmaxCrossEntropy.apply(logits * scale, column, shard.group, shard.distributed)
    return loss, index


class DistKLDiv(torch.autograd.Function):
    """``sum_i KL(softmax(zt_i) || softmax(zs_i))`` over class shards (logits already divided
    by the temperature); log-sum-exps by all-reduce of max and sum. The backward returns the
    exact ``softmax(zs) - softmax(zt)`` for this rank's columns of the student logits."""

    @staticmethod
    def forward(ctx: Any, zs: torch.Tensor, zt: torch.Tensor, group: Any,
                distributed: bool) -> torch.Tensor:
        def log_softmax(z: torch.Tensor) -> torch.Tensor:
            top = z.max(dim=1).values
            if distributed:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            total = torch.exp(z - top[:, None]).sum(dim=1)
            if distributed:
                dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            return z - (top + total.log())[:, None]

        log_ps, log_pt = log_softmax(zs.detach()), log_softmax(zt.detach())
        pt = log_pt.exp()
        kl = (pt * (log_pt - log_ps)).sum().reshape(1)
        if distributed:
            dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(log_ps.exp() - pt)
        return kl[0]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (diff,) = ctx.saved_tensors
        return diff * grad_out, None, None, None


def shard_kl_div(zs: torch.Tensor, zt: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """Summed KL of the teacher's over the student's class distribution, from each rank's
    ``[B, shard.size]`` logits (same value on every rank)."""
    return DistKLDiv.apply(zs, zt, shard.group, shard.distributed)
