"""Cosine-distance distillation: ``1 - mean_i cos(f_s,i, f_t,i)``.

The feature-to-feature cosine distance used as a baseline by the EKD authors (Huang et al.,
CVPR 2022, Tab. 2 "cosine"); both embeddings are L2-normalised first, as in their code.
"""

from __future__ import annotations

import torch

from ekd.functional import cosine
from ekd.distill._utils import pair
from ekd.distill.base import Distiller, register_distiller


@register_distiller("cosine")
class CosineLoss(Distiller):
    """One minus the mean cosine similarity between each student and teacher embedding."""

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        cos = cosine(s, t)
        return {"cosine": 1.0 - cos.mean()}
