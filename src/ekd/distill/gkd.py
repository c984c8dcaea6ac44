"""Grouped Knowledge Distillation (Zhao et al., AAAI 2023): KD on grouped logits.

The softened predictions ``p = softmax(z / T)`` of student and teacher over the C identities are
split, per sample, into a *primary* group ``P_i`` (the target identity and the identities with the
largest grouping logits) and a *secondary* group ``S_i`` (the rest). The KL divergence of KD then
decomposes into three parts:

- Binary-KD: ``KL(b_t || b_s)`` of the two-bin distributions ``b = (sum_P p, sum_S p)``;
- Primary-KD: ``KL(p^P_t || p^P_s)`` of the predictions renormalised inside ``P_i``;
- Secondary-KD: the same inside ``S_i``.

GKD keeps Binary-KD and Primary-KD and drops Secondary-KD (the paper's finding that the tail
group restricts KD):
``L = T^2 / N * sum_i (alpha KL(b_t,i || b_s,i) + beta KL(p^P_t,i || p^P_s,i)
+ lambda KL(p^S_t,i || p^S_s,i))`` with ``beta = 8, alpha = 1, lambda = 0, T = 4`` (the paper's best weights, Tab. 3: lambda_1 = 8
on Primary-KD, lambda_2 = 1 on Binary-KD; the authors' code also uses T = 4; their later
``gkd_adaptive.py`` uses beta = 4).

Primary group size (the cumulative-probability threshold): the per-class probabilities
``softmax(z_g)`` (T = 1) of the grouping model are summed over the batch and sorted; the group
has the smallest size ``k`` whose top-k sum reaches ``rate * N`` (``rate = 0.93``, the paper's
best threshold, Tab. 2). Each sample's primary group is its target plus its top ``k - 1`` other
identities by the grouping logits ``z_g``; the grouping model is the student (``group_by:
student``: the paper's Fig. 2 ranks by the student's output, as does the authors' training code)
or the teacher. The grouping is not differentiated.

Only the paper's abstract and secondary notes on it could be read here (Binary-KD is its Eq. 6;
the other equation numbers are unverified, and its Eq. 3 may place the group boundary where the
cumulative sum is *closest* to the threshold rather than first reaching it); the formulas follow
the abstract and the authors' released code (github.com/WisonZ/GKD). Deviations: ``k`` is
searched with step 1 (the authors step by 100 classes and fail when the threshold is not reached);
groups are exact (the authors subtract 1000 from out-of-group logits); the authors' 10-epoch linear
warm-up of the KD weight is left to ``weight``; logits are margin-free (theirs carry CosFace's
margin on the target).

Logits (``logits``): ``heads`` uses each model's own classifier (``student_logits``,
``teacher_logits``; the student's full head, so one process without Partial FC);
``teacher_centers`` scores both models' embeddings against the teacher's class centres,
``scale * cos(x, W_t)`` (equal widths; works with several processes and with cached teachers via
``teacher.centers: mean_embedding``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ekd.functional import unit
from ekd.distill._utils import HALF_DTYPES, check_dims, check_positive, pair
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError

LOGIT_SOURCES = {"heads": frozenset({"student_logits", "teacher_logits"}),
                 "teacher_centers": frozenset({"teacher_centers"})}


def primary_size(grouping_logits: torch.Tensor, rate: float) -> int:
    """Smallest ``k`` whose top-k batch-summed probabilities (T = 1) reach ``rate * N``."""
    n, c = grouping_logits.shape
    mass = torch.softmax(grouping_logits, dim=1).sum(0, dtype=torch.float64)
    cum = torch.sort(mass, descending=True).values.cumsum(0)
    k = int(torch.searchsorted(cum, torch.tensor([rate * n], dtype=cum.dtype)).item()) + 1
    return max(1, min(k, c))


def primary_mask(grouping_logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, C]`` bool: each sample's target plus its ``k - 1`` largest other logits (ties to the
    lower class index). A per-row k-th-value threshold: ``topk``/``sort`` with k of thousands of
    classes cost several times more on CPU."""
    ranked = grouping_logits.detach().clone()
    n, c = ranked.shape
    if k >= c:
        return torch.ones_like(ranked, dtype=torch.bool)
    ranked[torch.arange(n, device=labels.device), labels] = float("inf")
    kth = torch.kthvalue(ranked, c - k + 1, dim=1, keepdim=True).values  # the k-th largest
    above, ties = ranked > kth, ranked == kth
    need = k - above.sum(1, keepdim=True)
    return above | (ties & (ties.cumsum(1) <= need))


def _log_mass(log_p: torch.Tensor, group: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
    """``log sum_{c in group} p_c`` per row; rows with an empty group get 0 (and are discarded)."""
    m = group | ~nonempty[:, None]  # a finite stand-in whose gradient is multiplied by 0
    return torch.logsumexp(log_p.masked_fill(~m, float("-inf")), dim=1)


def grouped_kd(x_s: torch.Tensor, x_t: torch.Tensor, primary: torch.Tensor,
               secondary: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: Binary-KD ``KL(b_t || b_s)``, Primary-KD and Secondary-KD (the KL of the
    predictions renormalised inside each group, ``log p^G = log p - log b^G``; 0 for an empty
    group), from softened logits ``x = z / T``. ``secondary=False`` skips (zeros) the last."""
    ls, lt = F.log_softmax(x_s, dim=1), F.log_softmax(x_t, dim=1)
    zeros = torch.zeros_like(ls[:, 0])
    binary, inside = zeros, []
    for group in (primary, ~primary):
        nonempty = group.any(1)
        bs, bt = _log_mass(ls, group, nonempty), _log_mass(lt, group, nonempty)
        binary = binary + torch.where(nonempty, bt.exp() * (bt - bs), zeros)
        if inside and not secondary:
            inside.append(zeros)
            break
        gt, gs = lt - bt[:, None], ls - bs[:, None]
        kl = torch.where(group, gt.exp() * (gt - gs), torch.zeros_like(gt)).sum(1)
        inside.append(torch.where(nonempty, kl, zeros))
    return binary, inside[0], inside[1]


@register_distiller("gkd")
class GKDLoss(Distiller):
    """Binary-KD + Primary-KD (+ optional Secondary-KD) of grouped logits.

    Args:
        temperature: T of the softened predictions (authors: 4).
        rate: cumulative-probability threshold of the primary group (authors: 0.93).
        binary_weight, primary_weight, secondary_weight: alpha, beta, lambda (1, 8, 0).
        group_by: ``student`` (paper's Fig. 2, authors' code) or ``teacher`` logits choose the groups.
        logits: ``heads`` (each model's own classifier) or ``teacher_centers`` (see module doc);
            it sets this instance's ``requires``.
        scale: s of ``s * cos(x, W_t)`` for ``logits: teacher_centers`` (authors' CosFace: 64).
        student_dim, teacher_dim: widths (filled in by the trainer), checked for teacher_centers.
    """

    requires = LOGIT_SOURCES["heads"]

    def __init__(self, weight: float = 1.0, temperature: float = 4.0, rate: float = 0.93,
                 binary_weight: float = 1.0, primary_weight: float = 8.0,
                 secondary_weight: float = 0.0, group_by: str = "student", logits: str = "heads",
                 scale: float = 64.0, student_dim: int | None = None,
                 teacher_dim: int | None = None) -> None:
        super().__init__(weight)
        check_positive("gkd", temperature=temperature, scale=scale)
        if not 0 < rate <= 1:
            raise ConfigError(f"distiller 'gkd': rate must be in (0, 1], got {rate!r}")
        for key, value in (("binary_weight", binary_weight), ("primary_weight", primary_weight),
                           ("secondary_weight", secondary_weight)):
            if not value >= 0:
                raise ConfigError(f"distiller 'gkd': {key} must be >= 0, got {value!r}")
        if group_by not in ("student", "teacher"):
            raise ConfigError(f"distiller 'gkd': group_by must be 'student' or 'teacher', got {group_by!r}")
        if logits not in LOGIT_SOURCES:
            raise ConfigError(f"distiller 'gkd': logits must be one of {', '.join(LOGIT_SOURCES)}, "
                              f"got {logits!r}")
        if logits == "teacher_centers":
            check_dims("gkd", student_dim, teacher_dim, must_match=True)
        self.requires = LOGIT_SOURCES[logits]
        self.temperature, self.rate, self.scale = float(temperature), float(rate), float(scale)
        self.alpha, self.beta = float(binary_weight), float(primary_weight)
        self.lam = float(secondary_weight)
        self.group_by, self.logits = group_by, logits

    def _logits(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                extras: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.logits == "heads":
            zs, zt = extras["student_logits"], extras["teacher_logits"].detach()
            zs = zs.float() if zs.dtype in HALF_DTYPES else zs
            return zs, zt.to(zs.dtype)
        s, t = pair(student_emb, teacher_emb)
        centres = extras["teacher_centers"].detach().to(s.dtype)
        if s.shape[1] != centres.shape[1]:
            raise ConfigError(f"gkd: student width {s.shape[1]} != teacher centres' width "
                              f"{centres.shape[1]} (logits: teacher_centers needs equal widths)")
        w = unit(centres)
        zs = F.linear(unit(s), w).clamp(-1.0, 1.0) * self.scale
        with torch.no_grad():
            zt = F.linear(unit(t), w).clamp(-1.0, 1.0) * self.scale
        return zs, zt

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: torch.Tensor) -> dict[str, torch.Tensor]:
        zs, zt = self._logits(student_emb, teacher_emb, extras)
        if zs.shape != zt.shape or zs.dim() != 2 or zs.shape[0] != labels.shape[0]:
            raise ConfigError(f"gkd: student logits {tuple(zs.shape)}, teacher logits {tuple(zt.shape)} "
                              f"and {labels.shape[0]} labels do not match; the teacher must be "
                              "trained on the same identities as the student")
        n = max(zs.shape[0], 1)
        if labels.numel() and int(labels.max()) >= zs.shape[1]:
            raise ConfigError(f"gkd: label {int(labels.max())} outside the {zs.shape[1]} classes")
        with torch.no_grad():
            grouping = (zs if self.group_by == "student" else zt).detach()
            k = primary_size(grouping, self.rate)
            primary = primary_mask(grouping, labels, k)
        t = self.temperature
        scale = t * t / n
        binary, primary_kd, secondary_kd = grouped_kd(zs / t, zt / t, primary, secondary=bool(self.lam))
        terms = {"gkd_binary": self.alpha * scale * binary.sum(),
                 "gkd_primary": self.beta * scale * primary_kd.sum()}
        if self.lam:
            terms["gkd_secondary"] = self.lam * scale * secondary_kd.sum()
        return terms
