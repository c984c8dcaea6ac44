"""Partial FC: class-parallel margin softmax cross-entropy for very many identities.

Reference: An et al., "Partial FC: Training 10 Million Identities on a Single Machine",
ICCVW 2021, and An et al., "Killing Two Birds with One Stone: Efficient and Robust Training
of Face Recognition CNNs by Partial FC", CVPR 2022.

The ``C`` class centres are split into contiguous shards, one per rank (model parallelism on
the classifier, Sec. 3.1 of the ICCVW paper). Every rank receives the *global* batch (the
caller all-gathers embeddings differentiably, and labels), computes the logits against its own
shard only, and the softmax cross-entropy is completed with three collectives (max, sum of
exponentials, target logit), so no rank ever materialises the ``[B, C]`` logit matrix.
Partial FC's sampling (Sec. 3.2 ICCVW / Sec. 3 CVPR) keeps, per step and per shard, every
positive class centre present in the batch plus uniformly drawn negatives, so that
``max(ceil(sample_rate * shard_size), #positives in the shard)`` centres are used.

Gradient-scale rule (what a trainer must do so that every gradient equals the single-process
gradient of the mean cross-entropy over the global batch):

1. Gather the local embeddings with a differentiable all-gather whose backward SUMS the
   incoming gradients over ranks (:func:`gather_global_batch` does, as does
   ``torch.distributed.nn.functional.all_gather``), and pass the same global batch (same
   order) on every rank. Do not rescale the loss.
2. Wrap the backbone in ``DistributedDataParallel`` with its default gradient AVERAGING.
3. Do NOT wrap :class:`PartialFC` in DDP (DDP would broadcast rank 0's shard over the others
   at construction and average gradients of different classes together) and do NOT all-reduce
   its gradient: each rank's ``weight.grad`` is already the exact single-process gradient of
   its own rows. Give each rank's optimizer its own shard.

Why it is exact: inside :meth:`PartialFC.forward` the embeddings pass through an operator that
is the identity forward and all-reduces (SUM) the gradient backward, so the gradient w.r.t. the
global embeddings on every rank equals the full single-process one (all shards' contributions).
The all-gather backward then sums ``W`` identical copies, giving ``W`` times the true gradient
of each rank's local samples, and DDP's averaging divides by ``W`` while summing over ranks'
samples: the backbone gradient equals the single-process gradient. With an all-gather whose
backward merely *slices* the own rows (no sum), the backbone gradient is ``1/W`` of the
single-process one; multiply the loss by ``W`` for the backbone only, or scale its learning rate.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ekd.errors import CheckpointError, ConfigError, DataError
from ekd.functional import unit
from ekd.heads.margin import HEADS, margin_target
from ekd.heads.sharded_ce import (ClassShard, SumGradAcrossRanks, sample_classes, shard_margin_cross_entropy,
                                  shard_range)

__all__ = ["ClassShard", "PartialFC", "gather_global_batch", "init_rows", "shard_range"]

#: Rows per initialisation block; each block has its own seeded generator (see ``_init_shard``).
INIT_BLOCK = 1024


def _block_seed(seed: int, block: int) -> int:
    return (seed * 1_000_003 + block * 7_919 + 12_345) % (2 ** 63 - 1)


def init_rows(start: int, end: int, num_classes: int, embedding_size: int,
              seed: int) -> torch.Tensor:
    """Rows ``[start, end)`` of the deterministic ``N(0, 0.01^2)`` initial centre matrix.

    The full ``[C, d]`` matrix is defined block by block (``INIT_BLOCK`` classes per block, each
    drawn from a CPU generator seeded by ``(seed, block index)``), so any rank can produce its
    rows without the others and the concatenation of the shards does not depend on world size.
    """
    out = torch.empty(end - start, embedding_size)
    gen = torch.Generator()
    first, last = start // INIT_BLOCK, (end - 1) // INIT_BLOCK if end > start else -1
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK
        rows = min(INIT_BLOCK, num_classes - b0)
        gen.manual_seed(_block_seed(seed, block))
        values = torch.randn(rows, embedding_size, generator=gen) * 0.01
        lo, hi = max(start, b0), min(end, b0 + rows)
        out[lo - start:hi - start] = values[lo - b0:hi - b0]
    return out


class PartialFC(nn.Module):
    """Class-parallel ArcFace/CosFace cross-entropy with Partial FC negative-centre sampling.

    Each rank stores only ``weight`` = centres ``[shard_start, shard_end)`` (see
    :func:`shard_range`). :meth:`forward` takes the GLOBAL batch (already all-gathered) and
    returns the global mean cross-entropy, identical on every rank. See the module docstring
    for the gradient-scale rule. Sampling happens only in training mode with
    ``sample_rate < 1`` and uses torch's global RNG; ``last_index`` holds the kept local rows.
    It offers the trainer the interface of a plain head (:class:`ekd.heads.margin.MarginHead`:
    ``loss``, ``shard``, ``sharded``, ``class_cosine``).
    """

    sharded = True  # each rank holds its own class rows

    def __init__(self, margin_head_kind: str, embedding_size: int, num_classes: int,
                 scale: float = 64.0, margin: float = 0.5, sample_rate: float = 1.0,
                 rank: int = 0, world_size: int = 1, process_group: Any = None,
                 seed: int = 0) -> None:
        super().__init__()
        if margin_head_kind not in HEADS:
            raise ConfigError(f"partial_fc: unknown margin head '{margin_head_kind}'; valid: "
                              f"{', '.join(HEADS)}")
        if embedding_size < 1 or num_classes < 1:
            raise ConfigError(f"partial_fc: need num_classes >= 1 and embedding_size >= 1, got "
                              f"{num_classes}, {embedding_size}")
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"partial_fc: sample_rate must be in (0, 1], got {sample_rate}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"partial_fc: need 0 <= rank < world_size, got rank {rank}, "
                              f"world_size {world_size}")
        if num_classes < world_size:
            raise ConfigError(f"partial_fc: num_classes {num_classes} < world_size {world_size}:"
                              " every rank needs at least one class")
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            actual = dist.get_world_size(process_group), dist.get_rank(process_group)
            if actual != (world_size, rank):
                raise ConfigError(f"partial_fc: rank/world_size ({rank}, {world_size}) differ "
                                  f"from the process group's ({actual[1]}, {actual[0]})")
        self.kind = margin_head_kind
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.scale, self.margin = float(scale), float(margin)
        self.sample_rate = float(sample_rate)
        self.rank, self.world_size, self.process_group = int(rank), int(world_size), process_group
        self.seed = int(seed)
        self.shard_start, self.shard_end = shard_range(num_classes, rank, world_size)
        self.shard_size = self.shard_end - self.shard_start
        # ceil with a guard against float noise (0.1 * 30 = 3.0000000000000004)
        self.num_sample = min(self.shard_size,
                              max(1, math.ceil(round(self.sample_rate * self.shard_size, 9))))
        self.weight = nn.Parameter(init_rows(self.shard_start, self.shard_end, num_classes,
                                             embedding_size, seed))
        self.last_index: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"{self.kind}, classes [{self.shard_start}, {self.shard_end}) of "
                f"{self.num_classes}, d={self.embedding_size}, s={self.scale}, m={self.margin}, "
                f"sample_rate={self.sample_rate}, rank {self.rank}/{self.world_size}")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self) -> ClassShard:
        """This rank's class range (the same ranges the sharded distillers use)."""
        return ClassShard(self.num_classes, self.rank, self.world_size, self.sample_rate,
                          self.process_group)

    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept local centre indices and each row's column among them (see
        :func:`ekd.heads.sharded_ce.sample_classes`)."""
        return sample_classes(labels, self.shard, self.training)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The margin applied to target cosines (ArcFace or CosFace, as configured)."""
        return margin_target(cos_target, self.margin, self.kind)

    def shard_cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Margin-free cosines ``[B, shard_size]`` of the global batch against this rank's
        centres (every shard's gradient reaches the embeddings)."""
        emb = embeddings.float()
        if self.distributed:
            emb = SumGradAcrossRanks.apply(emb, self.process_group)
        return F.linear(unit(emb), unit(self.weight.float())).clamp(-1, 1)

    def class_cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The head interface's margin-free cosines: this rank's classes (:meth:`shard_cosine`)."""
        return self.shard_cosine(embeddings)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The head interface's cross-entropy: :meth:`forward` on the global batch."""
        return self(embeddings, labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax cross-entropy over the global batch (same value on every rank)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise DataError(f"partial_fc: embeddings must be [B, {self.embedding_size}], got "
                            f"{tuple(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise DataError(f"partial_fc: labels must be [{embeddings.shape[0]}], got "
                            f"{tuple(labels.shape)}")
        if labels.numel() == 0:
            raise DataError("partial_fc: empty batch")
        labels = labels.long()
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise DataError(f"partial_fc: labels must be in [0, {self.num_classes}), got "
                            f"[{int(labels.min())}, {int(labels.max())}]")
        loss, index = shard_margin_cross_entropy(embeddings.float(), self.weight.float(), labels,
                                                 self.shard, lambda cos, rows: self.target_logit(cos),
                                                 self.scale, self.training)
        self.last_index = index
        return loss

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """All-gather the shards into the full ``[C, d]`` centres (a collective: call it on
        every rank). Save this in checkpoints to resume under any world size."""
        local = self.weight.detach()
        if not self.distributed:
            return local.clone()
        largest = shard_range(self.num_classes, 0, self.world_size)
        pad = largest[1] - largest[0]
        padded = local.new_zeros(pad, self.embedding_size)
        padded[:self.shard_size] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.process_group)
        sizes = [e - s for s, e in (shard_range(self.num_classes, r, self.world_size)
                                    for r in range(self.world_size))]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Copy this rank's rows of a full ``[C, d]`` centre matrix into ``weight`` (local,
        no collective)."""
        expected = (self.num_classes, self.embedding_size)
        if tuple(full.shape) != expected:
            raise CheckpointError(f"partial_fc: full weight must be {list(expected)}, got "
                                  f"{list(full.shape)}")
        self.weight.copy_(full[self.shard_start:self.shard_end])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        """Accept either this rank's shard or the full ``[C, d]`` matrix under ``weight``, so a
        state dict holding :meth:`full_weight` loads under any world size."""
        key = prefix + "weight"
        value = state_dict.get(key)
        if (isinstance(value, torch.Tensor) and self.distributed
                and tuple(value.shape) == (self.num_classes, self.embedding_size)):
            state_dict[key] = value[self.shard_start:self.shard_end]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _AllGatherSumGrad(torch.autograd.Function):
    """All-gather of equal-sized ``[b, d]`` tensors along dim 0; backward all-reduces (SUM) the
    ``[W * b, d]`` gradient and returns this rank's rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group, ctx.rows = group, x.shape[0]
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_global_batch(embeddings: torch.Tensor, labels: torch.Tensor,
                        group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable all-gather of equal-sized local batches into the global batch.

    The embedding gather's backward sums the gradients over ranks, as the gradient-scale rule
    in the module docstring requires (like ``torch.distributed.nn.functional.all_gather``);
    labels are gathered without gradient. Without an initialised process group (or with one
    rank) the inputs are returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return embeddings, labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return _AllGatherSumGrad.apply(embeddings, group), torch.cat(parts)
