"""ICD-Face: intra-class compactness distillation (Yu et al., ICCV 2023).

The paper observes that feature-consistency distillation (FCD, an L2 distance between the two
models' embeddings) leaves the student's intra-class similarities far below the teacher's, and
adds a Similarity Distribution Consistency (SDC) loss: the distribution of positive-pair
(same identity) similarities of each model is estimated, with feature banks of past embeddings
supplying enough positive pairs, and the student's distribution is pulled to the teacher's.

Only the abstract of the paper was available to us (no full text, no authors' code), so the
equations below are our reading of it, not the paper's numbered equations (docs/methods.md says
the same):

- FCD: ``L_fcd = 1/N sum_i ||f_s,i/||f_s,i|| - f_t,i/||f_t,i||||^2`` (needs equal widths);
- positive pairs ``P``: every same-identity pair ``i < j`` of the batch and every pair of a batch
  sample with a same-identity entry of the feature bank (the last ``memory_size`` detached,
  unit embeddings of each model); each model's pairs use its own batch and bank;
- distribution: a soft histogram of the pairs' cosines with ``R`` triangular kernels on
  ``[-1, 1]`` (nodes ``t_r = -1 + r Delta``, ``Delta = 2 / (R - 1)``), as in the histogram loss
  (Ustinova & Lempitsky, NeurIPS 2016) and DDL (Huang et al., ECCV 2020):
  ``p_r = 1/|P| sum_{(i,j) in P} max(0, 1 - |s_ij - t_r| / Delta)``;
- SDC: ``KL(p_t || p_s) = sum_r p_t,r (log(p_t,r + eps) - log(p_s,r + eps))``;
- ``L = fcd_weight * L_fcd + sdc_weight * L_sdc``.

The bank is pushed after the loss of a step, so a batch is paired with earlier batches only.
"""

from __future__ import annotations

import torch

from ekd.distill._memory import EmbeddingMemory
from ekd.distill._utils import check_dims, check_instance_dims, pair, unit_sq_distance, zero
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError
from ekd.functional import unit


def soft_histogram(sims: torch.Tensor, bins: int) -> torch.Tensor:
    """Triangular-kernel histogram of ``sims`` (clamped to [-1, 1]) on ``bins`` nodes; sums to 1."""
    nodes = torch.linspace(-1.0, 1.0, bins, dtype=sims.dtype, device=sims.device)
    delta = 2.0 / (bins - 1)
    weights = (1.0 - (sims.clamp(-1.0, 1.0)[:, None] - nodes[None, :]).abs() / delta).clamp_min(0.0)
    return weights.sum(0) / sims.shape[0]


def positive_similarities(emb: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor,
                          bank_labels: torch.Tensor) -> torch.Tensor:
    """Cosines of the same-identity pairs ``i < j`` of the batch, then batch x bank (row-major)."""
    e = unit(emb, dim=1)
    n = labels.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=labels.device), diagonal=1)
    same = upper & (labels[:, None] == labels[None, :])
    within = (e @ e.t())[same]
    if bank.shape[0] == 0:
        return within
    cross = (e @ bank.t())[labels[:, None] == bank_labels[None, :]]
    return torch.cat([within, cross])


@register_distiller("icd_face")
class ICDFaceLoss(Distiller):
    """FCD plus the KL between the teacher's and the student's positive-pair similarity histograms.

    Args:
        fcd_weight, sdc_weight: weights of the two terms (ours: 1 and 1; not in the abstract).
        memory_size: rows of each feature bank (ours: 4096); 0 uses in-batch positives only.
        bins: histogram nodes R on [-1, 1] (ours: 101, i.e. a bin width of 0.02).
        eps: added to each bin before the logarithm (ours: 1e-6).
        student_dim, teacher_dim: embedding widths (filled in by the trainer).
    """

    def __init__(self, weight: float = 1.0, fcd_weight: float = 1.0, sdc_weight: float = 1.0,
                 memory_size: int = 4096, bins: int = 101, eps: float = 1e-6,
                 student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__(weight)
        check_dims("icd_face", student_dim, teacher_dim, must_match=False)
        if fcd_weight < 0 or sdc_weight < 0 or not eps > 0:
            raise ConfigError(f"distiller 'icd_face': need fcd_weight >= 0, sdc_weight >= 0 and eps > 0, "
                              f"got {fcd_weight}, {sdc_weight}, {eps}")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ConfigError(f"distiller 'icd_face': bins must be an integer >= 2, got {bins!r}")
        check_instance_dims("icd_face", "FCD", "fcd_weight", fcd_weight, student_dim, teacher_dim)
        self.fcd_weight, self.sdc_weight = float(fcd_weight), float(sdc_weight)
        self.bins, self.eps = int(bins), float(eps)
        self.memory = EmbeddingMemory("icd_face", memory_size, student_dim, teacher_dim)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        terms: dict[str, torch.Tensor] = {}
        if self.fcd_weight:
            fcd = unit_sq_distance("icd_face", "FCD", "fcd_weight", s, t).mean()
            terms["icd_face_fcd"] = self.fcd_weight * fcd
        bank_s, bank_t, bank_y = self.memory.contents(s.dtype)
        sim_s = positive_similarities(s, labels, bank_s, bank_y)
        with torch.no_grad():
            sim_t = positive_similarities(t, labels, bank_t, bank_y)
        if sim_s.numel() == 0:  # no positive pair in the batch nor the bank (yet)
            sdc = zero(s)
        else:
            p_s = soft_histogram(sim_s, self.bins)
            p_t = soft_histogram(sim_t, self.bins)
            sdc = (p_t * (torch.log(p_t + self.eps) - torch.log(p_s + self.eps))).sum()
        terms["icd_face_sdc"] = self.sdc_weight * sdc
        self.memory.push(s, t, labels)
        return terms
