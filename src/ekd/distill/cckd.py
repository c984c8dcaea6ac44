"""Correlation congruence KD (Peng et al., ICCV 2019, Eq. 6-9).

Instance correlations with the Gaussian RBF kernel approximated by its Taylor series
(Eq. 9): ``k(x, y) = exp(-2 gamma) * sum_{p=0}^{P} (2 gamma)^p / p! * (x . y)^p`` on
L2-normalised embeddings; the loss is the mean squared difference between the student's and
the teacher's ``N x N`` correlation matrices. Defaults: the paper's gamma = 0.4 and P = 2.

Note: the EKD authors' released baseline (``CC(gamma=0.4, p=2)``) sums ``range(p)``, i.e. the
powers 0 and 1 only; their numbers (``shared/testvectors``) are reproduced by ``order=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ekd.functional import unit
from ekd.distill._utils import check_positive, pair
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError


@register_distiller("cckd")
class CCKDLoss(Distiller):
    """MSE between Taylor-expanded Gaussian-kernel correlation matrices.

    Args:
        gamma: kernel parameter (paper: 0.4).
        order: highest power P kept in the expansion (paper: 2; EKD authors' code: 1).
    """

    def __init__(self, weight: float = 1.0, gamma: float = 0.4, order: int = 2) -> None:
        super().__init__(weight)
        check_positive("cckd", gamma=gamma)
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ConfigError(f"distiller 'cckd': order must be an integer >= 0, got {order!r}")
        self.gamma = float(gamma)
        self.order = order

    def correlation(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 9: the P-th order Taylor expansion of the Gaussian kernel on cosine similarity."""
        sim = unit(x) @ unit(x).t()
        g2 = 2.0 * self.gamma
        out = torch.full_like(sim, math.exp(-g2))  # p = 0: a constant, no gradient
        for p in range(1, self.order + 1):
            out = out + math.exp(-g2) * g2 ** p / math.factorial(p) * sim.pow(p)
        return out

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        return {"cckd": F.mse_loss(self.correlation(s), self.correlation(t))}
