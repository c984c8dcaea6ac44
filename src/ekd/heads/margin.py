"""Margin-based softmax heads producing logits for cross-entropy.

- ArcFace (Deng et al., CVPR 2019, Eq. 3): target logit ``s * cos(theta + m)``. When
  ``theta + m > pi`` the cosine stops decreasing; as in InsightFace, the target logit is then
  ``cos(theta) - sin(pi - m) * m`` for
  ``cos(theta) <= cos(pi - m)``, which keeps it monotonic and differentiable.
- CosFace (Wang et al., CVPR 2018, Eq. 4): target logit ``s * (cos(theta) - m)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ekd.functional import unit
from ekd.errors import ConfigError


class MarginHead(nn.Module):
    """Normalised class centres ``W`` [C, d]; subclasses apply the margin to the target."""

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
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb)
        idx = torch.arange(cos.shape[0], device=cos.device)
        target = self.target_logit(cos[idx, labels])
        logits = cos.clone()
        logits[idx, labels] = target
        return logits * self.scale


class ArcFace(MarginHead):
    """Additive angular margin: ``cos(theta + m)`` on the target class."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0,
                 margin: float = 0.5) -> None:
        super().__init__(embedding_size, num_classes, scale, margin)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        sin_target = torch.sqrt((1.0 - cos_target * cos_target).clamp_min(1e-12))
        phi = cos_target * self.cos_m - sin_target * self.sin_m
        return torch.where(cos_target > self.threshold, phi, cos_target - self.fallback)


class CosFace(MarginHead):
    """Additive cosine margin: ``cos(theta) - m`` on the target class."""

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin
