"""Small helpers shared by the distillers of the zoo (not a distiller themselves)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ekd.errors import ConfigError
from ekd.functional import unit
from ekd.heads.margin import margin_target

HALF_DTYPES = (torch.float16, torch.bfloat16)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[N, -1]``, upcast from half precision to float32 (losses run in >= fp32)."""
    x = x.reshape(x.shape[0], -1)
    return x.float() if x.dtype in HALF_DTYPES else x


def pair(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student rows (with gradient) and teacher rows detached, in the student's dtype."""
    s = as_rows(student_emb)
    t = teacher_emb.detach().reshape(teacher_emb.shape[0], -1).to(s.dtype)
    if s.shape[0] != t.shape[0]:
        raise ConfigError(f"student and teacher batches differ: {s.shape[0]} vs {t.shape[0]} rows")
    return s, t


def zero(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to ``x``'s graph (keeps ``backward`` valid on empty selections)."""
    return x.sum() * 0.0


def check_dims(name: str, student_dim: int | None, teacher_dim: int | None,
               must_match: bool) -> None:
    """Validate widths given by the config/trainer; ``must_match`` for shared-space methods."""
    for key, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"distiller '{name}': {key} must be a positive integer, got {value!r}")
    if must_match and student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
        raise ConfigError(f"distiller '{name}' compares the student's embeddings with the teacher's "
                          f"class centres, so the widths must match: student {student_dim}, "
                          f"teacher {teacher_dim} (set model.embedding_size={teacher_dim})")


def check_instance_dims(name: str, term: str, key: str, weight: float, student_dim: int | None,
                        teacher_dim: int | None) -> None:
    """An instance term (student vs teacher embedding of the same sample) needs equal widths."""
    if weight and student_dim and teacher_dim and student_dim != teacher_dim:
        raise ConfigError(f"distiller '{name}': its {term} term compares student and teacher "
                          f"embeddings, so the widths must match: student {student_dim}, teacher "
                          f"{teacher_dim} (set model.embedding_size={teacher_dim}, or {key}: 0 for "
                          "the relation term alone)")


def unit_sq_distance(name: str, term: str, key: str, student: torch.Tensor,
                     teacher: torch.Tensor) -> torch.Tensor:
    """``||s_i/||s_i|| - t_i/||t_i||||^2`` per sample (the feature-consistency distance of
    CoupleFace, ICD-Face and ILED); a width mismatch is a ConfigError naming ``key``."""
    if student.shape[1] != teacher.shape[1]:
        raise ConfigError(f"{name}: {term} needs equal widths, got student {student.shape[1]} and "
                          f"teacher {teacher.shape[1]} (set {key}: 0 for the relation term alone)")
    return (unit(student, dim=1) - unit(teacher, dim=1)).pow(2).sum(1)


def check_positive(name: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"distiller '{name}': {key} must be > 0, got {value!r}")


def margin_as_tensor(margin: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``margin`` (a number, or one per sample) as a tensor of ``like``'s dtype and device: the
    distillers apply :func:`ekd.heads.margin.margin_target` in the cosines' precision."""
    return torch.as_tensor(margin, dtype=like.dtype, device=like.device)


def margin_cross_entropy(student: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor,
                         scale: float, margin: torch.Tensor | float, kind: str) -> torch.Tensor:
    """Margin-softmax cross-entropy of ``student`` rows against (not normalised) ``centres``."""
    if student.shape[1] != centres.shape[1]:
        raise ConfigError(f"embedding width {student.shape[1]} differs from the class centres' "
                          f"width {centres.shape[1]}")
    if labels.numel() and int(labels.max()) >= centres.shape[0]:
        raise ConfigError(f"label {int(labels.max())} is outside the {centres.shape[0]} class centres")
    cos = F.linear(unit(student), unit(centres.to(student.dtype))).clamp(-1.0, 1.0)
    idx = torch.arange(cos.shape[0], device=cos.device)
    logits = cos.clone()
    target = cos[idx, labels]
    logits[idx, labels] = margin_target(target, margin_as_tensor(margin, target), kind)
    return F.cross_entropy(logits * scale, labels)
