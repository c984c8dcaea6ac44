"""CoupleFace (Liu et al., ECCV 2022): feature consistency + mutual relation distillation.

CoupleFace adds Mutual Relation Distillation (MRD) to the usual Feature Consistency Distillation
(FCD). A mutual relation is the cosine similarity of two samples' embeddings,
``MR(i, j) = <f_i / ||f_i||, f_j / ||f_j||>``. Most relations of a batch are uninformative
(two random identities are far apart in both models), so MRD first mines the *informative*
ones, the pairs of different identities the teacher finds similar, and its Relation-Aware
Distillation (RAD) loss makes the student's relations on them equal the teacher's:

- FCD: ``L_FCD = 1/N sum_i || f^s_i / ||f^s_i|| - f^t_i / ||f^t_i|| ||^2``;
- mining: for each anchor ``i``, ``M_i`` = the ``top_k`` samples ``j`` with ``y_j != y_i`` of
  largest teacher relation ``MR^t(i, j)`` in the (global) batch;
- RAD: ``L_RAD = 1/|M| sum_i sum_{j in M_i} (MR^s(i, j) - MR^t(i, j))^2``;
- ``L = fcd_weight * L_FCD + rad_weight * L_RAD``.

**Best available description, not the paper's equations.** Only the paper's abstract could be
read here and the authors published no code; the formulas above follow the abstract (FCD "e.g.
L2 distance" on embeddings; MRD = mining informative mutual relations + RAD loss). The paper
mines informative relations over the training set with the teacher (beyond one batch) and its
exact RAD weighting, equation numbers and default weights are unverified; here mining is inside
the global batch and the weights (1, 1, top-k 10) are ours.

Needs only embeddings (any teacher, cached ones included); FCD compares student and teacher
embeddings directly, so it needs equal widths (set ``fcd_weight: 0`` to use RAD alone across
widths).
"""

from __future__ import annotations

import torch

from ekd.functional import unit
from ekd.distill._utils import check_dims, check_instance_dims, pair, unit_sq_distance, zero
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError


def mutual_relations(emb: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` cosine similarities of every pair of rows."""
    u = unit(emb, dim=1)
    return u @ u.t()


def informative_pairs(teacher_relations: torch.Tensor, labels: torch.Tensor,
                      top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of each anchor's ``top_k`` most teacher-similar other-identity samples."""
    n = labels.shape[0]
    negative = labels[:, None] != labels[None, :]
    k = min(top_k, n - 1)
    if k <= 0 or not bool(negative.any()):
        empty = labels.new_zeros(0)
        return empty, empty
    ranked = teacher_relations.masked_fill(~negative, float("-inf"))
    cols = torch.topk(ranked, k, dim=1).indices
    rows = torch.arange(n, device=labels.device)[:, None].expand(n, k)
    keep = negative[rows, cols]
    return rows[keep], cols[keep]


@register_distiller("coupleface")
class CoupleFaceLoss(Distiller):
    """FCD (``coupleface_fcd``) and RAD on mined informative relations (``coupleface_rad``).

    Args:
        fcd_weight: weight of the feature consistency term (0 disables it).
        rad_weight: weight of the relation-aware distillation term.
        top_k: informative relations mined per anchor (other identities, teacher-nearest).
        student_dim, teacher_dim: widths (filled in by the trainer); FCD needs them equal.
    """

    def __init__(self, weight: float = 1.0, fcd_weight: float = 1.0, rad_weight: float = 1.0,
                 top_k: int = 10, student_dim: int | None = None,
                 teacher_dim: int | None = None) -> None:
        super().__init__(weight)
        for key, value in (("fcd_weight", fcd_weight), ("rad_weight", rad_weight)):
            if not value >= 0:
                raise ConfigError(f"distiller 'coupleface': {key} must be >= 0, got {value!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"distiller 'coupleface': top_k must be a positive integer, got {top_k!r}")
        check_dims("coupleface", student_dim, teacher_dim, must_match=False)
        check_instance_dims("coupleface", "FCD", "fcd_weight", fcd_weight, student_dim, teacher_dim)
        self.fcd_weight, self.rad_weight = float(fcd_weight), float(rad_weight)
        self.top_k = int(top_k)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        terms: dict[str, torch.Tensor] = {}
        if self.fcd_weight > 0:
            d = unit_sq_distance("coupleface", "FCD", "fcd_weight", s, t)
            fcd = d.mean() if s.shape[0] else zero(s)
            terms["coupleface_fcd"] = self.fcd_weight * fcd
        with torch.no_grad():
            rel_t = mutual_relations(t)
            rows, cols = informative_pairs(rel_t, labels, self.top_k)
        if rows.numel() == 0:  # one identity (or one sample): no relation to mine
            terms["coupleface_rad"] = zero(s)
            return terms
        rel_s = mutual_relations(s)
        rad = (rel_s[rows, cols] - rel_t[rows, cols]).pow(2).mean()
        terms["coupleface_rad"] = self.rad_weight * rad
        return terms
