"""ProxylessKD (Shi et al., arXiv 2011.00265, Sec. 3): direct KD with an inherited classifier.

Instead of a proxy task (mimicking features or relations), the student is trained for the
target task itself, with the teacher's classifier ``W_t`` inherited and frozen as its own:
``L = CE(s * margin(cos(theta_{y_i})) on the target, s * cos(theta_j) elsewhere)`` where
``cos(theta_j) = <f_s(x_i), W_t,j> / (||f_s(x_i)|| ||W_t,j||)`` (the paper's loss, with the
margin softmax of the student's head). Training the student's embeddings against the teacher's
fixed centres places them in the teacher's embedding space.

Uses the student head's margin and scale (``student_head``: ArcFace or CosFace as configured in
``head``) with ``teacher_centers``; the widths must match. As in the paper the student's own
classifier is then not trained (``replace_ce: true``).

Only the target logit's margin and the scale of the head are used, so it runs with Partial FC as
the student's head too. Under several processes (``class_shard``) each rank holds its class range
of the teacher's classifier and the margin softmax is completed across ranks (Partial FC with
the teacher's centres, frozen; negatives sampled when ``head.sample_rate < 1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ekd.functional import unit
from ekd.distill._utils import check_dims, pair
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError
from ekd.heads.sharded_ce import shard_margin_cross_entropy


@register_distiller("proxylesskd")
class ProxylessKDLoss(Distiller):
    """Margin softmax of the student's embeddings on the teacher's frozen classifier."""

    requires = frozenset({"teacher_centers", "student_head"})
    optional = frozenset({"class_shard"})

    def __init__(self, weight: float = 1.0, replace_ce: bool = True,
                 student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__(weight)
        check_dims("proxylesskd", student_dim, teacher_dim, must_match=True)
        self.replaces_ce = bool(replace_ce)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, _ = pair(student_emb, teacher_emb)
        head = extras["student_head"]
        centres = extras["teacher_centers"].detach().to(s.dtype)  # type: ignore[union-attr]
        if s.shape[1] != centres.shape[1]:
            raise ConfigError(f"proxylesskd: student width {s.shape[1]} != teacher classifier "
                              f"width {centres.shape[1]}")
        shard = extras.get("class_shard")
        if shard is not None:
            loss, _ = shard_margin_cross_entropy(
                s, centres, labels, shard, lambda cos, rows: head.target_logit(cos),  # type: ignore[union-attr]
                head.scale, self.training)  # type: ignore[union-attr]
            return {"proxylesskd": loss}
        cos = F.linear(unit(s), unit(centres)).clamp(-1.0, 1.0)
        idx = torch.arange(cos.shape[0], device=cos.device)
        logits = cos.clone()
        logits[idx, labels] = head.target_logit(cos[idx, labels])  # type: ignore[union-attr]
        return {"proxylesskd": F.cross_entropy(logits * head.scale, labels)}  # type: ignore[union-attr]
