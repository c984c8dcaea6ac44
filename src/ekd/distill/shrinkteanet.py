"""Angular distillation of ShrinkTeaNet (Duong et al., arXiv 1905.10620, Sec. 3.2).

The Angular Distillation Loss distils the direction of the teacher's features:
``L_a = 1/N * sum_i || 1 - <F_t,i / ||F_t,i||, F_s,i / ||F_s,i||> ||_2^2`` (the paper's loss),
i.e. the mean squared cosine distance. Here it is applied to the final embeddings only (the
paper also distils intermediate stages through bridge layers, which needs architecture-specific
features that the distiller contract does not carry).
"""

from __future__ import annotations

import torch

from ekd.functional import unit
from ekd.distill._utils import pair
from ekd.distill.base import Distiller, register_distiller


@register_distiller("shrinkteanet")
class ShrinkTeaNetLoss(Distiller):
    """Mean of ``(1 - cos(f_s, f_t))^2`` over the batch."""

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        cos = (unit(s) * unit(t)).sum(dim=1)
        return {"shrinkteanet": (1.0 - cos).pow(2).mean()}
