"""FitNets (Romero et al., ICLR 2015): hint learning on the embedding.

Eq. 3 of the paper, ``L_HT = 1/2 || u_h(x) - r(v_g(x)) ||^2``, applied to the final embeddings:
the student's embedding, passed through a learnable regressor ``r`` when its width differs from
the teacher's, regresses the teacher's embedding. As in the EKD authors' baseline the loss is
the plain mean squared error over all elements (``nn.MSELoss``), without the 1/2.

When both widths are equal there is no regressor (``r`` = identity, the authors' setting). The
trainer passes ``student_dim``/``teacher_dim`` automatically; the regressor's parameters are
then optimised together with the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ekd.distill._utils import check_dims, pair
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError


@register_distiller("fitnet")
class FitNetLoss(Distiller):
    """Feature regression (MSE) of the teacher's embedding.

    Args:
        student_dim, teacher_dim: embedding widths; when both are given and differ, a linear
            regressor ``student_dim -> teacher_dim`` is learned (FitNets' ``r``).
        bias: whether the regressor has a bias.
    """

    def __init__(self, weight: float = 1.0, student_dim: int | None = None,
                 teacher_dim: int | None = None, bias: bool = True) -> None:
        super().__init__(weight)
        check_dims("fitnet", student_dim, teacher_dim, must_match=False)
        self.regressor: nn.Linear | None = None
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.regressor = nn.Linear(student_dim, teacher_dim, bias=bool(bias))

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        if self.regressor is not None:
            s = self.regressor(s.to(self.regressor.weight.dtype)).to(t.dtype)
        if s.shape[1] != t.shape[1]:
            raise ConfigError(f"fitnet: student width {s.shape[1]} != teacher width {t.shape[1]}; "
                              "set params student_dim and teacher_dim so that a regressor is "
                              "learned (the trainer does this automatically)")
        return {"fitnet": F.mse_loss(s, t)}
