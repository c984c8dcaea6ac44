"""AdaDistill (Boutros, Struc & Damer, ECCV 2024, Sec. 3): adaptive class-centre distillation.

The student is trained with a margin-penalty softmax (ArcFace or CosFace) whose class centres
are not learned by gradient but distilled from the teacher's embeddings. Before the loss of a
step, the centre of each sample's class moves towards the teacher's normalised embedding by an
exponential moving average whose momentum adapts to the student's progress (Sec. 3):
``alpha_i = clip(cos(f_s,i, f_t,i) * lambda_i, 1e-6, 1)`` with the hard-sample weight
``lambda_i = clip(cos(W_{y_i}, f_t,i), 1e-6, 1)``, and ``W_{y_i} <- alpha_i W_{y_i} + (1 - alpha_i)
f_t,i / ||f_t,i||``. Early on the student disagrees with the teacher (small alpha): the centres
follow the individual teacher embeddings (simple, sample-level knowledge); as the student
improves, alpha grows and the centres integrate many samples (class-level knowledge).
The loss is then ``CE(s * margin(cos(f_s, W)), y)`` (paper: ArcFace m = 0.45, s = 64).

Differences from the authors' code, all deliberate (their training script also fails at start:
it passes ``adaptive_alpha=`` to a header that only accepts ``adaptive_weighted_alpha``):
- samples of the same class in one batch update the centre one after the other in batch order
  (their ``kernel[:, label] = ...`` keeps an arbitrary one of the duplicates);
- under ``torch.distributed`` the update uses the samples of every rank (all-gathered, in rank
  order), and the centres are broadcast from rank 0 on the first step, so the centres stay
  identical across ranks (theirs diverge: each rank updates its copy with its own batch);
- the centres are a buffer (checkpointed, no weight decay); they never receive gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ekd.functional import cosine, unit
from ekd.distill._utils import check_dims, check_positive, margin_cross_entropy, pair
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError


def sequential_ema(centres: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                   alpha: torch.Tensor) -> None:
    """In place: ``W_y <- a W_y + (1 - a) t`` for each sample, in order, vectorised.

    For a class with samples ``i_1 < ... < i_k`` the result is
    ``prod(a) W + sum_r (1 - a_r) prod_{q > r} a_q t_r``; products are taken in log space.
    """
    if labels.numel() == 0:
        return
    order = torch.argsort(labels, stable=True)
    y, t = labels[order], targets[order].to(centres.dtype)
    a = alpha[order].double()
    log_a = a.log()
    cum = log_a.cumsum(0)
    classes, counts = torch.unique_consecutive(y, return_counts=True)
    ends = counts.cumsum(0) - 1
    starts = ends - counts + 1
    segment = torch.repeat_interleave(torch.arange(len(classes), device=y.device), counts)
    later = cum[ends][segment] - cum  # sum of log a over the later samples of the same class
    coef = ((1.0 - a) * later.exp()).to(centres.dtype)
    keep = (cum[ends] - cum[starts] + log_a[starts]).exp().to(centres.dtype)
    new = centres[classes] * keep[:, None]
    new.index_add_(0, segment, coef[:, None] * t)
    centres[classes] = new


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Concatenate each tensor's rows from every rank, in rank order (sizes may differ)."""
    if not _distributed():
        return list(tensors)
    world = dist.get_world_size()
    size = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(k) for k in sizes]
    out = []
    for x in tensors:
        padded = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:k] for p, k in zip(parts, counts)]))
    return out


@register_distiller("adadistill")
class AdaDistillLoss(Distiller):
    """Margin softmax on class centres distilled from the teacher with adaptive momentum.

    Args:
        num_classes, student_dim, teacher_dim: filled in by the trainer (widths must match).
        kind: ``arcface`` or ``cosface`` margin; scale, margin: s and m (paper: 64, 0.45).
        hard_weighting: multiply alpha by ``lambda = cos(W_y, f_t)`` (paper: on).
        replace_ce: the student's own margin-softmax term is dropped (paper: AdaDistill alone).
        seed: seed of the initial centres (normal, std 0.01), identical on every rank.
    """

    def __init__(self, weight: float = 1.0, num_classes: int | None = None,
                 student_dim: int | None = None, teacher_dim: int | None = None,
                 kind: str = "arcface", scale: float = 64.0, margin: float = 0.45,
                 hard_weighting: bool = True, replace_ce: bool = True, seed: int = 0) -> None:
        super().__init__(weight)
        check_dims("adadistill", student_dim, teacher_dim, must_match=True)
        check_positive("adadistill", scale=scale)
        if kind not in ("arcface", "cosface"):
            raise ConfigError(f"distiller 'adadistill': kind must be 'arcface' or 'cosface', got {kind!r}")
        if margin < 0:
            raise ConfigError(f"distiller 'adadistill': margin must be >= 0, got {margin}")
        dim = teacher_dim or student_dim
        if num_classes is None or dim is None:
            raise ConfigError("distiller 'adadistill' needs num_classes and the embedding width "
                              "(teacher_dim); the trainer sets them from the data and the teacher")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"distiller 'adadistill': num_classes must be a positive integer, "
                              f"got {num_classes!r}")
        self.kind, self.scale, self.margin = kind, float(scale), float(margin)
        self.hard_weighting = bool(hard_weighting)
        self.replaces_ce = bool(replace_ce)
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("centres", torch.randn(num_classes, dim, generator=gen) * 0.01)
        self._synced = False

    @torch.no_grad()
    def alphas(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The adaptive EMA momentum of each sample (student detached)."""
        agree = cosine(student, teacher).clamp(-1.0, 1.0)
        if self.hard_weighting:
            lam = cosine(self.centres[labels].to(teacher.dtype), teacher)
            agree = agree * lam.clamp(1e-6, 1.0)
        return agree.clamp(1e-6, 1.0)

    @torch.no_grad()
    def update(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Move the centres of the batch's classes towards the teacher (all ranks' samples)."""
        if _distributed() and not self._synced:
            dist.broadcast(self.centres, 0)
        self._synced = True
        t_hat = unit(teacher)
        alpha = self.alphas(student, t_hat, labels)
        g_t, g_y, g_a = all_gather_rows(t_hat, labels, alpha)
        sequential_ema(self.centres, g_t, g_y, g_a)
        return alpha

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        if s.shape[1] != self.centres.shape[1] or t.shape[1] != self.centres.shape[1]:
            raise ConfigError(f"adadistill: embedding widths (student {s.shape[1]}, teacher "
                              f"{t.shape[1]}) must equal the centres' width {self.centres.shape[1]}")
        if labels.numel() and int(labels.max()) >= self.centres.shape[0]:
            raise ConfigError(f"adadistill: label {int(labels.max())} outside the "
                              f"{self.centres.shape[0]} classes (num_classes)")
        self.update(s.detach(), t, labels)
        loss = margin_cross_entropy(s, self.centres, labels, self.scale, self.margin, self.kind)
        return {"adadistill": loss}
