"""MarginDistillation (Svitov & Alyamkin, arXiv 2003.02586, Sec. 3).

The student inherits the teacher's class centres ``W`` (frozen) as its classifier and is trained
with ArcFace whose margin is class- and sample-specific, taken from the teacher: the cosine
between the teacher's embedding and its class centre, ``c_i = cos(t_i, W_{y_i})``, is mapped
linearly onto ``[m_min, m_max]`` relative to the batch maximum,
``m_i = m_min + (m_max - m_min) * c_i / max_j c_j`` (the authors' public implementation), and
``L = CE(s * [cos(theta_{y_i} + m_i) on the target, cos(theta_j) elsewhere], y_i)``.
Samples the teacher places close to their centre get the large margin; hard ones a small one.
Defaults: s = 64, m_min = 0.2, m_max = 0.5 (authors' configuration).

Needs ``teacher_centers`` (the teacher checkpoint's classifier, trained on the same identities),
and equal student and teacher widths. Negative cosines are clamped to 0 before the mapping (the
formula assumes a trained teacher, where they are positive). As in the paper, this loss replaces
the student's own margin-softmax term (``replace_ce: true``). Under several processes
(``class_shard``) the centres are held per rank as Partial FC class shards and the softmax is
completed across ranks (negatives sampled when ``head.sample_rate < 1``).
"""

from __future__ import annotations

import torch

from ekd.functional import unit
from ekd.distill._utils import check_dims, check_positive, margin_as_tensor, margin_cross_entropy, pair
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError
from ekd.heads.margin import margin_target
from ekd.heads.sharded_ce import ClassShard, shard_margin_cross_entropy


@register_distiller("margin_distill")
class MarginDistillLoss(Distiller):
    """ArcFace on the teacher's frozen class centres with teacher-derived per-sample margins."""

    requires = frozenset({"teacher_centers"})
    optional = frozenset({"class_shard"})

    def __init__(self, weight: float = 1.0, scale: float = 64.0, m_min: float = 0.2,
                 m_max: float = 0.5, replace_ce: bool = True, student_dim: int | None = None,
                 teacher_dim: int | None = None) -> None:
        super().__init__(weight)
        check_positive("margin_distill", scale=scale)
        if not 0 <= m_min <= m_max:
            raise ConfigError(f"distiller 'margin_distill': need 0 <= m_min <= m_max, got {m_min}, {m_max}")
        check_dims("margin_distill", student_dim, teacher_dim, must_match=True)
        self.scale, self.m_min, self.m_max = float(scale), float(m_min), float(m_max)
        self.replaces_ce = bool(replace_ce)

    def margins(self, teacher: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor,
                shard: ClassShard | None = None) -> torch.Tensor:
        """Per-sample margins from the teacher's cosine to its own class centre (``centres``:
        this rank's rows when ``shard`` is given)."""
        own = centres[labels] if shard is None else shard.lookup(centres, labels)
        c = (unit(teacher) * unit(own)).sum(dim=1).clamp_min(0.0)
        top = c.max() if c.numel() else c.new_zeros(())
        if top <= 0:
            return torch.full_like(c, self.m_min)
        return self.m_min + (self.m_max - self.m_min) * c / top

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: torch.Tensor) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        centres = extras["teacher_centers"].detach().to(s.dtype)
        shard = extras.get("class_shard")
        with torch.no_grad():
            m = self.margins(t, centres, labels, shard)  # type: ignore[arg-type]
        if shard is not None:
            loss, _ = shard_margin_cross_entropy(
                s, centres, labels, shard, lambda cos, rows: margin_target(cos, margin_as_tensor(m[rows], cos), "arcface"),
                self.scale, self.training)
            return {"margin_distill": loss}
        return {"margin_distill": margin_cross_entropy(s, centres, labels, self.scale, m, "arcface")}
