"""Evaluation-oriented Knowledge Distillation (Huang et al., CVPR 2022, Sec. 3).

Per batch: cosine similarities of all pairs (upper triangle) for student and teacher, split into
positive (same identity) and negative pairs. Each model's negatives, sorted descending, give its
thresholds at FPR 1e-1 ... 1e-6 (the similarity at rank ``len // (1/FPR)``), smoothed by an EMA
(Eq. 3). A pair's soft rank is ``sum_k sigmoid((sim - threshold_k) / T)`` (Eq. 4-5); the loss is
the MSE between student and teacher soft ranks over all positive pairs and over the top-k
negatives with the highest *student* similarity (Eq. 6-7), weighted 0.02 and 0.01.

Defaults reproduce the authors' implementation exactly, including the order of operations (the
EMA is updated before the loss of the same step) and the clamped sigmoid. Deviations are opt-in
options, off by default.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ekd.functional import unit
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError

PAPER_FPRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def pair_similarities(emb: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair ``i < j`` (row-major upper triangle) of ``emb``."""
    emb = unit(emb.reshape(emb.shape[0], -1), dim=1)
    return (emb @ emb.t())[upper]


def clamped_sigmoid(x: torch.Tensor, temperature: float, clamp: float = 50.0) -> torch.Tensor:
    """``1 / (1 + exp(-x / T))`` with the exponent clamped to ``[-clamp, clamp]`` (authors')."""
    return 1.0 / (1.0 + torch.exp(torch.clamp(-x / temperature, min=-clamp, max=clamp)))


@register_distiller("ekd")
class EKDLoss(Distiller):
    """Rank-based relation distillation at the evaluation thresholds (EKD, CVPR 2022).

    Args:
        fprs: FPR levels whose thresholds serve as rank anchors (paper: 1e-1 ... 1e-6).
        temperature: sigmoid temperature T of the soft rank (paper: 0.01).
        momentum: EMA momentum of the thresholds (paper: 0.01; buffers start at 0).
        top_k: number of hardest student negatives distilled (paper: 2000).
        pos_weight, neg_weight: weights of the positive and negative terms (0.02, 0.01).
        clamp: bound of the sigmoid exponent (authors' code: 50).
        bias_correction: divide the EMA by ``1 - (1 - momentum)^step`` (Adam-style) so that
            the early thresholds are not pulled towards 0. Off by default (authors: off).
        memory_size: when > 0, the thresholds are read from the negatives of the batch *and*
            of the batch against a FIFO memory of the last ``memory_size`` (detached, unit)
            embeddings of each model, as in cross-batch memory (XBM, Wang et al., CVPR 2020).
            A batch of 128 has ~8k negatives, so its FPR 1e-4 ... 1e-6 "thresholds" are all
            its single hardest negative; with a memory of 4096 the batch sees ~500k negatives
            and those anchors become real. The loss itself still uses the batch's pairs.
            Off (0) by default (authors: batch only).
        student_dim, teacher_dim: embedding sizes (filled in by the trainer), needed for the
            memory.

    Variants (``docs/methods.md``, "EKD variants"; each off by default, chosen on a validation
    split by ``bench/ekd_ablation.py``):
        temperature_mode: ``"fixed"`` (T = ``temperature``) or ``"spread"``: each model's T is
            ``temperature_scale`` x the standard deviation of its batch negative similarities,
            so the sigmoid band covers the same share of each model's distribution.
        anchor_source: ``"own"`` (each model's soft rank against its own thresholds, the paper)
            or ``"teacher"``: both against the teacher's, so the student is asked for the
            teacher's *similarities* at the evaluation thresholds, not only its ranks.
        hard_negatives: the top-k negatives by ``"student"`` (paper) or ``"teacher"`` similarity.
        memory_pairs: with a memory, also distil the batch-vs-memory pairs (gradient through
            the batch side), not only use them for the thresholds.
        focus_fpr, focus_width: weight each pair by ``exp(-((t - a)/w)^2 / 2)`` (mean 1 per term),
            ``t`` its teacher similarity, ``a`` the teacher anchor at ``focus_fpr``: the pairs near
            the evaluation threshold that matters count most.
        reduction: ``"mean"`` over all distilled pairs (paper) or ``"active"``: the sum divided by
            the number of pairs within ``5T`` of an anchor on either side, so flat pairs do not
            dilute the gradient.
        one_sided: penalise only the errors that cost the student at evaluation: a positive pair
            whose student soft rank is *below* the teacher's, a negative pair whose student soft
            rank is *above* it (``relu(r_t - r_s)^2`` / ``relu(r_s - r_t)^2``). The paper's MSE
            also pulls a positive down (a negative up) where the student already beats the
            teacher; ``ekd diagnose`` reports that share of the loss as "against".
    """

    needs_positive_pairs = True  # its positive term ranks same-identity pairs

    def __init__(self, weight: float = 1.0, fprs: Sequence[float] = PAPER_FPRS,
                 temperature: float = 0.01, momentum: float = 0.01, top_k: int = 2000,
                 pos_weight: float = 0.02, neg_weight: float = 0.01, clamp: float = 50.0,
                 bias_correction: bool = False, memory_size: int = 0, student_dim: int | None = None,
                 teacher_dim: int | None = None, temperature_mode: str = "fixed",
                 temperature_scale: float = 0.1, anchor_source: str = "own",
                 hard_negatives: str = "student", memory_pairs: bool = False,
                 focus_fpr: float | None = None, focus_width: float = 0.05,
                 reduction: str = "mean", one_sided: bool = False) -> None:
        super().__init__(weight)
        _choice("temperature_mode", temperature_mode, ("fixed", "spread"))
        _choice("anchor_source", anchor_source, ("own", "teacher"))
        _choice("hard_negatives", hard_negatives, ("student", "teacher"))
        _choice("reduction", reduction, ("mean", "active"))
        if temperature_scale <= 0 or focus_width <= 0:
            raise ConfigError(f"distill ekd: temperature_scale and focus_width must be > 0, got "
                              f"{temperature_scale}, {focus_width}")
        if focus_fpr is not None and focus_fpr not in tuple(fprs):
            raise ConfigError(f"distill ekd: focus_fpr {focus_fpr} is not one of fprs {list(fprs)}")
        if memory_pairs and not memory_size:
            raise ConfigError("distill ekd: memory_pairs needs memory_size > 0")
        self.temperature_mode, self.temperature_scale = temperature_mode, float(temperature_scale)
        self.anchor_source, self.hard_negatives = anchor_source, hard_negatives
        self.memory_pairs, self.reduction = bool(memory_pairs), reduction
        self.one_sided = bool(one_sided)
        self.focus = None if focus_fpr is None else list(fprs).index(focus_fpr)
        self.focus_width = float(focus_width)
        if not fprs or any(not 0 < f < 1 for f in fprs):
            raise ConfigError(f"distill ekd: fprs must be in (0, 1), got {list(fprs)}")
        if temperature <= 0 or not 0 < momentum <= 1 or top_k < 0:
            raise ConfigError(f"distill ekd: need temperature > 0, 0 < momentum <= 1 and top_k >= 0, got "
                              f"{temperature}, {momentum}, {top_k}")
        self.fprs = tuple(float(f) for f in fprs)
        self.divisors = [int(round(1.0 / f)) for f in fprs]
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.top_k = int(top_k)
        self.pos_weight = float(pos_weight)
        self.neg_weight = float(neg_weight)
        self.clamp = float(clamp)
        self.bias_correction = bool(bias_correction)
        self.register_buffer("student_anchor", torch.zeros(len(self.divisors)))
        self.register_buffer("teacher_anchor", torch.zeros(len(self.divisors)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.memory_size = int(memory_size)
        if self.memory_size < 0:
            raise ConfigError(f"distill ekd: memory_size must be >= 0, got {memory_size}")
        if self.memory_size:
            if not student_dim or not teacher_dim:
                raise ConfigError("distill ekd: memory_size > 0 needs student_dim and teacher_dim "
                                  f"(got {student_dim}, {teacher_dim})")
            self.register_buffer("memory_student", torch.zeros(self.memory_size, int(student_dim)))
            self.register_buffer("memory_teacher", torch.zeros(self.memory_size, int(teacher_dim)))
            self.register_buffer("memory_labels", torch.full((self.memory_size,), -1, dtype=torch.long))
            self.register_buffer("memory_next", torch.zeros((), dtype=torch.long))

    # -- thresholds -------------------------------------------------------------------
    def _thresholds(self, sorted_neg: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Similarity at rank ``n // divisor`` of ``n`` negatives sorted descending (FPR anchor);
        ``sorted_neg`` may hold only the top ranks of them."""
        n = sorted_neg.shape[0] if n is None else n
        return sorted_neg[[n // d for d in self.divisors]]

    def _memory_thresholds(self, neg: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor,
                           memory: torch.Tensor) -> torch.Tensor | None:
        """Thresholds over the batch negatives ``neg`` plus batch-vs-memory negatives."""
        valid = self.memory_labels >= 0
        cross = unit(emb.reshape(emb.shape[0], -1).to(memory.dtype), dim=1) @ memory[valid].t()
        cross = cross[labels[:, None] != self.memory_labels[valid][None, :]]
        pool = torch.cat([neg.to(cross.dtype), cross])
        if pool.numel() == 0:  # a one-identity batch and an empty memory: no negatives yet
            return None
        deepest = pool.shape[0] // min(self.divisors)
        return self._thresholds(torch.topk(pool, deepest + 1).values, pool.shape[0])

    @torch.no_grad()
    def _enqueue(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor) -> None:
        n = min(labels.shape[0], self.memory_size)
        slots = (self.memory_next + torch.arange(n, device=labels.device)) % self.memory_size
        self.memory_student[slots] = unit(student_emb[-n:].reshape(n, -1).float(), dim=1)
        self.memory_teacher[slots] = unit(teacher_emb[-n:].reshape(n, -1).float(), dim=1)
        self.memory_labels[slots] = labels[-n:]
        self.memory_next = (self.memory_next + n) % self.memory_size

    @torch.no_grad()
    def _update_anchors(self, s_thresholds: torch.Tensor, t_thresholds: torch.Tensor) -> None:
        m = self.momentum
        dtype = torch.promote_types(s_thresholds.dtype, self.student_anchor.dtype)
        self.steps += 1
        self.student_anchor = m * s_thresholds.to(dtype) + (1 - m) * self.student_anchor.to(dtype)
        self.teacher_anchor = m * t_thresholds.to(dtype) + (1 - m) * self.teacher_anchor.to(dtype)

    def anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher thresholds used by the loss (bias-corrected if enabled)."""
        if not self.bias_correction or int(self.steps) == 0:
            return self.student_anchor, self.teacher_anchor
        c = 1.0 - (1.0 - self.momentum) ** int(self.steps)
        return self.student_anchor / c, self.teacher_anchor / c

    # -- loss ---------------------------------------------------------------------------
    def soft_rank(self, sims: torch.Tensor, anchor: torch.Tensor,
                  temperature: float | torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 5: number of anchors a pair exceeds, with a temperature-T sigmoid step."""
        temperature = self.temperature if temperature is None else temperature
        return clamped_sigmoid(sims[:, None] - anchor[None, :], temperature, self.clamp).sum(1)

    def _rank_mse(self, s: torch.Tensor, t: torch.Tensor, s_anchor: torch.Tensor,
                  t_anchor: torch.Tensor, temps: tuple | None = None, sign: float = 1.0) -> torch.Tensor:
        """Mean squared soft-rank difference (Eq. 6-7); with ``one_sided`` only where
        ``sign * (r_t - r_s) > 0`` (sign +1: positives, -1: negatives)."""
        if s.numel() == 0:  # e.g. a batch without any positive pair
            return s.sum() * 0.0
        if temps is None:  # the paper's loss, exactly
            return F.mse_loss(self.soft_rank(s, s_anchor), self.soft_rank(t, t_anchor))
        t_s, t_t = temps
        diff = self.soft_rank(t, t_anchor, t_t) - self.soft_rank(s, s_anchor, t_s)
        err = (F.relu(sign * diff) if self.one_sided else diff) ** 2
        if self.focus is not None:
            with torch.no_grad():
                w = torch.exp(-0.5 * ((t - t_anchor[self.focus]) / self.focus_width) ** 2)
                w = w / w.mean().clamp_min(1e-12)
            err = err * w
        if self.reduction == "active":
            with torch.no_grad():
                near_s = ((s[:, None] - s_anchor[None, :]).abs() < 5 * t_s).any(1)
                near_t = ((t[:, None] - t_anchor[None, :]).abs() < 5 * t_t).any(1)
                active = (near_s | near_t).sum().clamp_min(1)
            return err.sum() / active
        return err.mean()

    @property
    def is_paper_loss(self) -> bool:
        """True when no loss variant is on (the authors' code path is used)."""
        return (self.temperature_mode == "fixed" and self.focus is None and self.reduction == "mean"
                and not self.one_sided)

    def _temperatures(self, s_neg: torch.Tensor, t_neg: torch.Tensor) -> tuple:
        if self.temperature_mode == "fixed" or s_neg.numel() < 2:
            return self.temperature, self.temperature
        return (self.temperature_scale * s_neg.detach().std().clamp_min(1e-6),
                self.temperature_scale * t_neg.std().clamp_min(1e-6))

    def _memory_pairs(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``memory_pairs``: similarities of the batch against the memory (before this batch is
        enqueued), student side differentiable; split into positives and negatives."""
        valid = self.memory_labels >= 0
        s = unit(student_emb.reshape(student_emb.shape[0], -1).float(), dim=1) @ self.memory_student[valid].t()
        with torch.no_grad():
            t = unit(teacher_emb.reshape(teacher_emb.shape[0], -1).float(), dim=1) @ self.memory_teacher[valid].t()
        same = labels[:, None] == self.memory_labels[valid][None, :]
        return s[same], t[same], s[~same], t[~same]

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: torch.Tensor) -> dict[str, torch.Tensor]:
        if student_emb.dtype in (torch.float16, torch.bfloat16):
            student_emb = student_emb.float()
        n = labels.shape[0]
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=labels.device), diagonal=1)
        same = (labels[:, None] == labels[None, :])[upper]
        s = pair_similarities(student_emb, upper)
        with torch.no_grad():
            t = pair_similarities(teacher_emb.to(s.dtype), upper)
        s_pos, t_pos = s[same], t[same]
        s_neg, t_neg = s[~same], t[~same]
        s_sorted, order = torch.sort(s_neg, descending=True)
        cross = None
        if self.memory_pairs and bool((self.memory_labels >= 0).any()):
            cross = self._memory_pairs(student_emb, teacher_emb, labels)  # before this batch is stored
        if self.memory_size:
            with torch.no_grad():
                s_thr = self._memory_thresholds(s_neg.detach(), student_emb.detach(), labels, self.memory_student)
                t_thr = self._memory_thresholds(t_neg, teacher_emb, labels, self.memory_teacher)
                if s_thr is not None and t_thr is not None:
                    self._update_anchors(s_thr, t_thr)
                self._enqueue(student_emb.detach(), teacher_emb, labels)
        elif s_neg.numel() > 0:
            t_sorted, _ = torch.sort(t_neg, descending=True)
            self._update_anchors(self._thresholds(s_sorted.detach()), self._thresholds(t_sorted))
        s_anchor, t_anchor = self.anchors()
        s_anchor, t_anchor = s_anchor.to(s.dtype), t_anchor.to(s.dtype)
        if self.anchor_source == "teacher":
            s_anchor = t_anchor
        temps = None if self.is_paper_loss else self._temperatures(s_neg, t_neg)
        if cross is not None:  # batch pairs and batch-vs-memory pairs together
            s_pos, t_pos = torch.cat([s_pos, cross[0]]), torch.cat([t_pos, cross[1]])
            s_neg, t_neg = torch.cat([s_neg, cross[2]]), torch.cat([t_neg, cross[3]])
            order = torch.sort(s_neg.detach(), descending=True)[1]
        if self.hard_negatives == "teacher":
            order = torch.sort(t_neg, descending=True)[1]
        hard = order[: self.top_k]
        pos = self._rank_mse(s_pos, t_pos, s_anchor, t_anchor, temps)
        neg = self._rank_mse(s_neg[hard], t_neg[hard], s_anchor, t_anchor, temps, sign=-1.0)
        if self.record_diagnostics:
            t_s, t_t = temps if temps else (self.temperature, self.temperature)
            self._diagnostics = self._record(s_pos, t_pos, s_neg[hard], t_neg[hard], s_anchor, t_anchor,
                                             float(t_s), float(t_t))
            pool = s_neg.numel() + (int((self.memory_labels >= 0).sum()) * n if self.memory_size else 0)
            self._diagnostics["threshold_negatives"] = float(pool)  # (an upper bound with a memory)
        return {"ekd_pos": self.pos_weight * pos, "ekd_neg": self.neg_weight * neg}

    # -- diagnostics (docs/diagnostics.md) -----------------------------------------------
    @torch.no_grad()
    def _record(self, s_pos: torch.Tensor, t_pos: torch.Tensor, s_neg: torch.Tensor, t_neg: torch.Tensor,
                s_anchor: torch.Tensor, t_anchor: torch.Tensor, temperature: float,
                teacher_temperature: float) -> dict[str, float]:
        """Anchors per FPR, the share of the distilled pairs whose student similarity lies in a
        sigmoid's active band (``|sim - anchor| < 5T``, where its slope is > 1% of the peak), and
        the per-anchor squared difference of the student's and teacher's sigmoid steps, each at
        the temperature the loss gives that model (they differ with ``temperature_mode: spread``)."""
        out: dict[str, float] = {}
        band = 5.0 * temperature
        for name, s, t in (("pos", s_pos, t_pos), ("neg", s_neg, t_neg)):
            s, t = s.detach(), t.to(s.dtype)
            out[f"pairs_{name}"] = float(s.numel())
            if s.numel() == 0:
                continue
            near = (s[:, None] - s_anchor[None, :]).abs() < band  # [pairs, anchors]
            out[f"active_{name}"] = float(near.any(1).float().mean())
            step_s = clamped_sigmoid(s[:, None] - s_anchor[None, :], temperature, self.clamp)
            step_t = clamped_sigmoid(t[:, None] - t_anchor[None, :], teacher_temperature, self.clamp)
            for k, f in enumerate(self.fprs):
                out[f"mse_{name}@{_fpr(f)}"] = float(((step_s[:, k] - step_t[:, k]) ** 2).mean())
            # share of the squared rank error that pulls a positive down / a negative up
            diff = step_t.sum(1) - step_s.sum(1)
            against = diff < 0 if name == "pos" else diff > 0
            total = float((diff ** 2).sum())
            out[f"against_{name}"] = float((diff[against] ** 2).sum()) / total if total > 0 else 0.0
        for k, f in enumerate(self.fprs):
            out[f"anchor_student@{_fpr(f)}"] = float(s_anchor[k])
            out[f"anchor_teacher@{_fpr(f)}"] = float(t_anchor[k])
        return out


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"distill ekd: {key} must be one of {', '.join(valid)}, got {value!r}")


def _fpr(f: float) -> str:
    """``1e-3`` for 0.001: the FPR spelling of every ekd log key."""
    return f"{f:.0e}".replace("e-0", "e-")
