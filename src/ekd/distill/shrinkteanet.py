"""Angular distillation of ShrinkTeaNet (Duong et al., arXiv 1905.10620, Sec. 3.2).

The paper's Angular Distillation Loss distils the direction of the teacher's features:
``L_a = 1/N * sum_i || 1 - <F_t,i / ||F_t,i||, F_s,i / ||F_s,i||> ||_2^2``, the mean *squared*
cosine distance (the same equation is quoted as Eq. 4 by VarGFaceNet, Yan et al., ICCVW 2019,
which adopts it). ``squared: true`` (default) follows the paper; ``squared: false`` gives the
mean cosine distance ``1/N sum_i (1 - cos)`` of the public re-implementation. Applied to the final
embeddings only (the paper also distils intermediate stages through bridge layers, which needs
architecture-specific features that the distiller contract does not carry).
"""

from __future__ import annotations

import torch

from ekd.functional import unit
from ekd.distill._utils import pair
from ekd.distill.base import Distiller, register_distiller


@register_distiller("shrinkteanet")
class ShrinkTeaNetLoss(Distiller):
    """Mean of ``(1 - cos(f_s, f_t))^2`` over the batch (``squared: false``: of ``1 - cos``)."""

    def __init__(self, weight: float = 1.0, squared: bool = True) -> None:
        super().__init__(weight)
        self.squared = bool(squared)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        distance = 1.0 - (unit(s) * unit(t)).sum(dim=1)
        return {"shrinkteanet": (distance.pow(2) if self.squared else distance).mean()}
