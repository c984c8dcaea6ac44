"""Similarity-preserving KD (Tung & Mori, ICCV 2019, Eq. 2-4), on embeddings.

``G = Q Q^T`` of the row-normalised features of the batch (the paper normalises each row of the
activation Gram matrix; on L2-normalised embeddings this is the cosine-similarity matrix, the
EKD authors' variant), and ``L = || G_s - G_t ||_F^2 / N^2``.
"""

from __future__ import annotations

import torch

from ekd.functional import unit
from ekd.distill._utils import pair
from ekd.distill.base import Distiller, register_distiller


@register_distiller("sp")
class SPLoss(Distiller):
    """Squared Frobenius distance of the batch cosine-similarity matrices over ``N^2``."""

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        n = s.shape[0]
        s, t = unit(s), unit(t)
        diff = s @ s.t() - t @ t.t()
        return {"sp": diff.pow(2).sum() / (n * n)}
