"""Margin-based softmax heads producing logits for cross-entropy.

- ArcFace (Deng et al., CVPR 2019, Eq. 3): target logit ``s * cos(theta + m)``. When
  ``theta + m > pi`` the cosine stops decreasing; as in InsightFace, the target logit is then
  ``cos(theta) - sin(pi - m) * m`` for
  ``cos(theta) <= cos(pi - m)``, which keeps it monotonic and differentiable.
- CosFace (Wang et al., CVPR 2018, Eq. 4): target logit ``s * (cos(theta) - m)``.

The trainer sees every head through one interface, shared with Partial FC
(:class:`ekd.heads.partial_fc.PartialFC`): :meth:`MarginHead.loss` (the mean margin-softmax
cross-entropy of the global batch), :attr:`MarginHead.shard` (the class range this process holds,
``None``: all of them), :attr:`MarginHead.sharded` (its parameters are per-rank shards) and
:meth:`MarginHead.class_cosine` (margin-free cosines against the classes this process holds).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ekd.errors import ConfigError
from ekd.functional import unit
from ekd.heads.sharded_ce import ClassShard


def margin_target(cos_target: torch.Tensor, margin: torch.Tensor | float, kind: str) -> torch.Tensor:
    """Target-class cosine after the margin of ``kind`` (the one implementation: the heads, Partial
    FC and the margin-based distillers all call it).

    ``margin`` is a number (the heads: its sine and cosine are taken in double precision) or a
    tensor, a scalar or one per sample (the distillers: taken in the tensor's dtype). ArcFace:
    ``cos(theta + m)``, continued by ``cos(theta) - sin(pi - m) * m`` once ``theta + m > pi``;
    CosFace: ``cos(theta) - m``.
    """
    if kind == "cosface":
        return cos_target - margin
    if kind != "arcface":
        raise ConfigError(f"margin kind must be 'arcface' or 'cosface', got {kind!r}")
    if isinstance(margin, torch.Tensor):
        cos_m, sin_m = torch.cos(margin), torch.sin(margin)
        threshold, fallback = torch.cos(math.pi - margin), torch.sin(math.pi - margin) * margin
    else:
        cos_m, sin_m = math.cos(margin), math.sin(margin)
        threshold, fallback = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
    sin_target = torch.sqrt((1.0 - cos_target * cos_target).clamp_min(1e-12))
    phi = cos_target * cos_m - sin_target * sin_m
    return torch.where(cos_target > threshold, phi, cos_target - fallback)


class MarginHead(nn.Module):
    """Normalised class centres ``W`` [C, d]; subclasses apply the margin to the target."""

    #: The name in :data:`HEADS` (``head.kind``).
    kind: ClassVar[str] = ""
    #: Whether the parameters are this rank's shard of the classes (Partial FC): not averaged
    #: over ranks, and their gradient norm summed over ranks when clipping.
    sharded: ClassVar[bool] = False

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0,
                 margin: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ConfigError(f"head: need num_classes >= 1 and embedding_size >= 1, got "
                              f"{num_classes}, {embedding_size}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Cosine between each embedding and each class centre, clamped to [-1, 1]."""
        return F.linear(unit(emb.float()), unit(self.weight.float())).clamp(-1, 1)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The margin of :attr:`kind` applied to the target cosines."""
        return margin_target(cos_target, self.margin, self.kind)

    @property
    def shard(self) -> ClassShard | None:
        """The class range this process holds: ``None``, every class."""
        return None

    def class_cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Margin-free cosines against the classes this process holds (all of them here)."""
        return self.cosine(emb)

    def loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax cross-entropy of the (global) batch."""
        return F.cross_entropy(self(emb, labels), labels)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin logits ``s * cos`` [B, C], the margin applied to each row's target class."""
        cos = self.cosine(emb)
        idx = torch.arange(cos.shape[0], device=cos.device)
        target = self.target_logit(cos[idx, labels])
        logits = cos.clone()
        logits[idx, labels] = target
        return logits * self.scale


class ArcFace(MarginHead):
    """Additive angular margin: ``cos(theta + m)`` on the target class."""

    kind = "arcface"


class CosFace(MarginHead):
    """Additive cosine margin: ``cos(theta) - m`` on the target class."""

    kind = "cosface"


#: The margin heads by ``head.kind``: the one head registry (plain heads and Partial FC use it).
HEADS: dict[str, type[MarginHead]] = {"arcface": ArcFace, "cosface": CosFace}
