"""Unified KD: ILED + RPSD with a memory bank (Mishra & Uikey, IJCB 2025, arXiv 2508.11376).

Two terms: Instance-Level Embedding Distillation (ILED) aligns each student embedding with its
teacher embedding, with a dynamic hard mining that emphasises the samples the student matches
worst; Relation-based Pairwise Similarity Distillation (RPSD) matches the two models' pairwise
cosine similarities over the batch and a memory bank of past embeddings, with a pair mining of
the same kind.

Only the abstract of the paper was available to us (no full text, no authors' code), so the
equations below are our reading of it, not the paper's numbered equations (docs/methods.md says
the same):

- ILED: ``d_i = ||f_s,i/||f_s,i|| - f_t,i/||f_t,i||||^2``; samples with ``d_i`` at or above the
  batch mean (a threshold that moves with the student's progress, no gradient) are hard and get
  weight ``1 + hard_weight``, the others 1: ``L_iled = 1/N sum_i w_i d_i`` (needs equal widths);
- RPSD: for every pair ``i < j`` of the batch and every pair of a batch sample with a memory
  entry, ``e = (cos_s - cos_t)^2`` where each model's cosines use its own batch and memory (the
  last ``memory_size`` detached, unit embeddings); pairs with ``e`` at or above the mean are hard
  (weight ``1 + hard_weight``): ``L_rpsd = 1/|pairs| sum w e``;
- ``L = iled_weight * L_iled + rpsd_weight * L_rpsd``.

The memory is pushed after the loss of a step, so a batch is paired with earlier batches only.
"""

from __future__ import annotations

import torch

from ekd.distill._memory import EmbeddingMemory
from ekd.distill._utils import check_dims, check_instance_dims, pair, unit_sq_distance, zero
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError
from ekd.functional import unit


def hard_weighted_mean(values: torch.Tensor, hard_weight: float) -> torch.Tensor:
    """``mean(w * values)`` with ``w = 1 + hard_weight`` where ``values >= mean(values)`` (detached)."""
    if values.numel() == 0:
        return zero(values)
    hard = values.detach() >= values.detach().mean()
    return (values * (1.0 + hard_weight * hard.to(values.dtype))).mean()


def relation_similarities(emb: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Cosines of the pairs ``i < j`` of the batch, then of batch x memory (row-major)."""
    e = unit(emb, dim=1)
    n = e.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=e.device), diagonal=1)
    within = (e @ e.t())[upper]
    if bank.shape[0] == 0:
        return within
    return torch.cat([within, (e @ bank.t()).reshape(-1)])


@register_distiller("unified_kd")
class UnifiedKDLoss(Distiller):
    """ILED (hard-mined instance alignment) + RPSD (hard-mined pair relations with a memory).

    Args:
        iled_weight, rpsd_weight: weights of the two terms (ours: 1 and 1).
        hard_weight: extra weight of the hard samples / pairs (ours: 1, i.e. hard counts twice).
        memory_size: rows of the memory bank (ours: 4096); 0 uses in-batch pairs only.
        student_dim, teacher_dim: embedding widths (filled in by the trainer).
    """

    def __init__(self, weight: float = 1.0, iled_weight: float = 1.0, rpsd_weight: float = 1.0,
                 hard_weight: float = 1.0, memory_size: int = 4096, student_dim: int | None = None,
                 teacher_dim: int | None = None) -> None:
        super().__init__(weight)
        check_dims("unified_kd", student_dim, teacher_dim, must_match=False)
        if iled_weight < 0 or rpsd_weight < 0 or hard_weight < 0:
            raise ConfigError(f"distiller 'unified_kd': iled_weight, rpsd_weight and hard_weight must "
                              f"be >= 0, got {iled_weight}, {rpsd_weight}, {hard_weight}")
        check_instance_dims("unified_kd", "ILED", "iled_weight", iled_weight, student_dim, teacher_dim)
        self.iled_weight, self.rpsd_weight = float(iled_weight), float(rpsd_weight)
        self.hard_weight = float(hard_weight)
        self.memory = EmbeddingMemory("unified_kd", memory_size, student_dim, teacher_dim)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        terms: dict[str, torch.Tensor] = {}
        if self.iled_weight:
            d = unit_sq_distance("unified_kd", "ILED", "iled_weight", s, t)
            terms["unified_kd_iled"] = self.iled_weight * hard_weighted_mean(d, self.hard_weight)
        bank_s, bank_t, _ = self.memory.contents(s.dtype)
        sim_s = relation_similarities(s, bank_s)
        with torch.no_grad():
            sim_t = relation_similarities(t, bank_t)
        rpsd = hard_weighted_mean((sim_s - sim_t).pow(2), self.hard_weight)
        terms["unified_kd_rpsd"] = self.rpsd_weight * rpsd
        self.memory.push(s, t, labels)
        return terms
