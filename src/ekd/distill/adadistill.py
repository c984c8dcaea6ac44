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

Duplicate labels. All samples of a step compute their momentum against the centres before
the step. The authors' update ``kernel[:, label] = a * kernel[:, label] + (1 - a) * t`` writes
every sample's result into its class column, so of several samples of one class only one write
survives: the last in batch order (the result of an index assignment with repeated indices on
CPU; on CUDA the survivor is unspecified). ``duplicates: last`` (default) keeps that last sample
of each class, ``duplicates: sequential`` applies the samples of a class one after the other in
batch order (``W <- a_k(...(a_1 W + (1 - a_1) t_1)...) + (1 - a_k) t_k``).

Multi-process. The trainer hands every distiller the global batch (all ranks' samples, in rank
order); the centres are updated once per global batch, identically on every rank. Under several
processes (or Partial FC sampling) the centres are held as Partial FC class shards
(:class:`ekd.heads.sharded_ce.ClassShard`): each rank updates and stores its own class range,
and the margin softmax is completed by all-reduce, equal to the unsharded loss at sample rate 1.
The initial centres (normal, std 0.01) are generated block by block as Partial FC's, so they do
not depend on the world size. The centres are a buffer (checkpointed, no weight decay); they
never receive gradients. The authors clip the student's gradient norm at 5
(``optim.clip_grad_norm: 5`` in the zoo configs).
"""

from __future__ import annotations

import torch

from ekd.functional import cosine, unit
from ekd.distill._utils import check_dims, check_positive, margin_as_tensor, margin_cross_entropy, pair
from ekd.distill.base import Distiller, register_distiller
from ekd.errors import ConfigError
from ekd.heads.margin import margin_target
from ekd.heads.partial_fc import init_rows
from ekd.heads.sharded_ce import ClassShard, shard_margin_cross_entropy


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


def last_occurrence(labels: torch.Tensor) -> torch.Tensor:
    """Indices of the last sample of each distinct label, in batch order of those samples."""
    order = torch.arange(labels.numel(), device=labels.device)
    _, inverse = torch.unique(labels, return_inverse=True)
    last = torch.full((int(inverse.max()) + 1 if labels.numel() else 0,), -1, dtype=torch.long,
                      device=labels.device)
    last.scatter_reduce_(0, inverse, order, reduce="amax")
    return last.sort().values


def _local_ema(centres: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
               alpha: torch.Tensor, duplicates: str) -> None:
    """Apply the EMA of the samples (``rows`` into ``centres``) by the ``duplicates`` rule."""
    if rows.numel() == 0:
        return
    if duplicates == "sequential":
        sequential_ema(centres, targets, rows, alpha)
        return
    keep = last_occurrence(rows)
    r, a = rows[keep], alpha[keep].to(centres.dtype)[:, None]
    centres[r] = a * centres[r] + (1.0 - a) * targets[keep].to(centres.dtype)


@register_distiller("adadistill")
class AdaDistillLoss(Distiller):
    """Margin softmax on class centres distilled from the teacher with adaptive momentum.

    Args:
        num_classes, student_dim, teacher_dim: filled in by the trainer (widths must match).
        kind: ``arcface`` or ``cosface`` margin; scale, margin: s and m (paper: 64, 0.45).
        hard_weighting: multiply alpha by ``lambda = cos(W_y, f_t)`` (paper: on).
        replace_ce: the student's own margin-softmax term is dropped (paper: AdaDistill alone).
        duplicates: ``last`` (the authors' update) or ``sequential`` (see the module docstring).
        seed: seed of the initial centres (normal, std 0.01), identical on every rank.
        class_shard: set by the trainer under several processes or Partial FC sampling: this
            rank's class range; the buffer ``centres`` then holds only those rows.
    """

    def __init__(self, weight: float = 1.0, num_classes: int | None = None,
                 student_dim: int | None = None, teacher_dim: int | None = None,
                 kind: str = "arcface", scale: float = 64.0, margin: float = 0.45,
                 hard_weighting: bool = True, replace_ce: bool = True, duplicates: str = "last",
                 seed: int = 0, class_shard: ClassShard | None = None) -> None:
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
        if duplicates not in ("last", "sequential"):
            raise ConfigError(f"distiller 'adadistill': duplicates must be 'last' or 'sequential', "
                              f"got {duplicates!r}")
        if class_shard is not None and not isinstance(class_shard, ClassShard):
            raise ConfigError("distiller 'adadistill': class_shard is set by the trainer, not the config")
        if class_shard is not None and class_shard.num_classes != num_classes:
            raise ConfigError(f"adadistill: class shard of {class_shard.num_classes} classes, "
                              f"num_classes is {num_classes}")
        self.kind, self.scale, self.margin = kind, float(scale), float(margin)
        self.duplicates = duplicates
        self.class_shard = class_shard
        self.hard_weighting = bool(hard_weighting)
        self.replaces_ce = bool(replace_ce)
        start, end = (class_shard.start, class_shard.end) if class_shard else (0, num_classes)
        self.register_buffer("centres", init_rows(start, end, num_classes, dim, int(seed)))

    @property
    def num_classes(self) -> int:
        return self.class_shard.num_classes if self.class_shard else self.centres.shape[0]

    @torch.no_grad()
    def target_centres(self, labels: torch.Tensor) -> torch.Tensor:
        """``W_{y_i}`` of every sample (collected from the owning shards)."""
        if self.class_shard is None:
            return self.centres[labels]
        return self.class_shard.lookup(self.centres, labels)

    @torch.no_grad()
    def alphas(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The adaptive EMA momentum of each sample (student detached), from the centres
        before the update."""
        agree = cosine(student, teacher).clamp(-1.0, 1.0)
        if self.hard_weighting:
            lam = cosine(self.target_centres(labels).to(teacher.dtype), teacher)
            agree = agree * lam.clamp(1e-6, 1.0)
        return agree.clamp(1e-6, 1.0)

    @torch.no_grad()
    def update(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Move the centres of the global batch's classes towards the teacher (once per step;
        each rank its own shard)."""
        t_hat = unit(teacher)
        alpha = self.alphas(student, t_hat, labels)
        if self.class_shard is None:
            _local_ema(self.centres, t_hat, labels, alpha, self.duplicates)
        else:
            mine, local = self.class_shard.owned_rows(labels)
            _local_ema(self.centres, t_hat[mine], local[mine], alpha[mine], self.duplicates)
        return alpha

    @torch.no_grad()
    def full_centres(self) -> torch.Tensor:
        """All ``[C, d]`` centres (a collective under sharding: call it on every rank)."""
        shard = self.class_shard
        if shard is None or not shard.distributed:
            return self.centres.clone()
        full = self.centres.new_zeros(shard.num_classes, self.centres.shape[1])
        full[shard.start:shard.end] = self.centres
        return shard.all_reduce(full)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """Accept the full ``[C, d]`` centres under sharding (checkpoints hold the full matrix)."""
        key, shard = prefix + "centres", self.class_shard
        value = state_dict.get(key)
        if (shard is not None and isinstance(value, torch.Tensor)
                and value.shape[0] == shard.num_classes != self.centres.shape[0]):
            state_dict[key] = shard.rows(value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: object) -> dict[str, torch.Tensor]:
        s, t = pair(student_emb, teacher_emb)
        if s.shape[1] != self.centres.shape[1] or t.shape[1] != self.centres.shape[1]:
            raise ConfigError(f"adadistill: embedding widths (student {s.shape[1]}, teacher "
                              f"{t.shape[1]}) must equal the centres' width {self.centres.shape[1]}")
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ConfigError(f"adadistill: label {int(labels.max())} outside the "
                              f"{self.num_classes} classes (num_classes)")
        self.update(s.detach(), t, labels)
        if self.class_shard is None:
            loss = margin_cross_entropy(s, self.centres, labels, self.scale, self.margin, self.kind)
        else:
            loss, _ = shard_margin_cross_entropy(
                s, self.centres, labels, self.class_shard,
                lambda cos, rows: margin_target(cos, margin_as_tensor(self.margin, cos), self.kind),
                self.scale, self.training)
        return {"adadistill": loss}
