"""Knowledge distillation of class probabilities (Hinton et al., NIPS-W 2015, Sec. 2).

``L = T^2 / N * sum_i KL(softmax(z_t,i / T) || softmax(z_s,i / T))`` over the batch, the EKD
authors' baseline convention (summed KL divided by the batch, times ``T^2`` so that the gradient
scale does not depend on T). Default T = 4 as in their baseline.

Logits: the trainer provides ``student_logits`` and ``teacher_logits``, each model's margin-free
scaled cosines ``s * cos(x, W_c)`` against its own class centres (student: its margin head;
teacher: the classifier stored in its checkpoint), so the teacher must have been trained on the
same identities. A teacher file without a classifier is refused at start.

Under several processes or Partial FC sampling (``class_shard``) both logit matrices hold only
this rank's class range (the student's from its Partial FC shard, all classes of the shard, no
sampling) and the two softmaxes and the KL are completed by all-reduce, equal to the full KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ekd.distill._utils import HALF_DTYPES, check_positive
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError
from ekd.heads.sharded_ce import shard_kl_div


@register_distiller("kd")
class KDLoss(Distiller):
    """Hinton KD on logits at temperature ``temperature`` (paper baseline: 4)."""

    requires = frozenset({"student_logits", "teacher_logits"})
    optional = frozenset({"class_shard"})

    def __init__(self, weight: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__(weight)
        check_positive("kd", temperature=temperature)
        self.temperature = float(temperature)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: torch.Tensor) -> dict[str, torch.Tensor]:
        zs, zt = extras["student_logits"], extras["teacher_logits"].detach()
        if zs.dtype in HALF_DTYPES:
            zs = zs.float()
        if zs.shape != zt.shape:
            raise ConfigError(f"kd: student logits {tuple(zs.shape)} and teacher logits "
                              f"{tuple(zt.shape)} differ; the teacher must be trained on the same "
                              "identities as the student")
        t = self.temperature
        shard = extras.get("class_shard")
        if shard is not None:
            kl = shard_kl_div(zs / t, zt.to(zs.dtype) / t, shard)  # type: ignore[arg-type]
            return {"kd": kl * (t * t) / max(zs.shape[0], 1)}
        log_ps = F.log_softmax(zs / t, dim=1)
        pt = F.softmax(zt.to(zs.dtype) / t, dim=1)
        kl = F.kl_div(log_ps, pt, reduction="sum")
        return {"kd": kl * (t * t) / max(zs.shape[0], 1)}
