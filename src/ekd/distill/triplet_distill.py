"""Triplet Distillation (Feng et al., ICIP 2020, arXiv 1905.04457, Sec. 3).

A triplet loss on the student's L2-normalised embeddings whose margin is not fixed but set per
triplet from the teacher: the more the teacher separates the negative from the positive, the
larger the margin the student must reach,
``m(a, p, n) = m_min + (m_max - m_min) * max(0, d_t(a, n) - d_t(a, p)) / D_max``
with ``D_max`` the largest such teacher gap in the batch, and
``L = mean max(0, d_s(a, p) - d_s(a, n) + m(a, p, n))``. Distances are squared Euclidean on
normalised embeddings (``distance: l2``, the paper's main variant) or angles (``cos``);
m_min = 0.2 and m_max = 0.5 as in the public MarginDistillation re-implementation.

Triplets are formed inside the batch (the EKD batch has a P x K identity-balanced part): every
(anchor, positive, negative) with ``label(a) == label(p) != label(n)``, ``a != p``, averaged
(``mining: all``), or for each anchor-positive pair only the negative with the largest loss
(``mining: hard``). The paper selects triplets offline, FaceNet-style; that is not reproducible
inside a fixed batch. Batches without a positive or a negative pair give a zero loss.
"""

from __future__ import annotations

import torch

from ekd.functional import unit
from ekd.distill._utils import pair, zero
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError


def pair_distances(x: torch.Tensor, kind: str) -> torch.Tensor:
    """All-pairs squared L2 (``l2``) or angle (``cos``) between L2-normalised rows."""
    x = unit(x)
    cos = x @ x.t()
    if kind == "l2":
        return (2.0 - 2.0 * cos).clamp_min(0.0)
    return torch.acos(cos.clamp(-1.0 + 1e-6, 1.0 - 1e-6))


@register_distiller("triplet_distill")
class TripletDistillLoss(Distiller):
    """Triplet loss with teacher-derived, per-triplet margins in ``[m_min, m_max]``."""

    needs_positive_pairs = True  # every triplet needs an anchor-positive pair

    def __init__(self, weight: float = 1.0, m_min: float = 0.2, m_max: float = 0.5,
                 distance: str = "l2", mining: str = "all") -> None:
        super().__init__(weight)
        if not 0 <= m_min <= m_max:
            raise ConfigError(f"distiller 'triplet_distill': need 0 <= m_min <= m_max, got "
                              f"{m_min}, {m_max}")
        if distance not in ("l2", "cos"):
            raise ConfigError(f"distiller 'triplet_distill': distance must be 'l2' or 'cos', "
                              f"got {distance!r}")
        if mining not in ("all", "hard"):
            raise ConfigError(f"distiller 'triplet_distill': mining must be 'all' or 'hard', "
                              f"got {mining!r}")
        self.m_min, self.m_max = float(m_min), float(m_max)
        self.distance, self.mining = distance, mining

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        n = s.shape[0]
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(n, dtype=torch.bool, device=labels.device)
        anchor, positive = pos.nonzero(as_tuple=True)  # every anchor-positive pair
        if anchor.numel() == 0 or bool(same.all()):
            return {"triplet_distill": zero(s)}
        neg = ~same[anchor]  # [P, N]: valid negatives of each pair
        d_s = pair_distances(s, self.distance)
        with torch.no_grad():
            d_t = pair_distances(t, self.distance)
            gap = (d_t[anchor] - d_t[anchor, positive][:, None]).clamp_min(0.0)
            gap = torch.where(neg, gap, torch.zeros_like(gap))
            d_max = gap.max()
            scale = (self.m_max - self.m_min) / d_max if d_max > 0 else 0.0
            margin = self.m_min + scale * gap
        loss = (d_s[anchor, positive][:, None] - d_s[anchor] + margin).clamp_min(0.0)
        loss = torch.where(neg, loss, torch.zeros_like(loss))
        if self.mining == "hard":
            has_neg = neg.any(dim=1)
            return {"triplet_distill": loss.max(dim=1).values[has_neg].mean()}
        return {"triplet_distill": loss.sum() / neg.sum()}
