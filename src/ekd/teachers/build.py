"""The teacher of a ``teacher`` config section: its kind's builder (:mod:`.registry`), then the
centring ``teacher.center`` asks for (:mod:`.centering`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ekd.errors import ConfigError
from ekd.teachers.centering import center_teacher
from ekd.teachers.registry import TEACHER_KINDS, Teacher

if TYPE_CHECKING:
    from ekd.config import TeacherConfig

__all__ = ["build_teacher"]


def build_teacher(teacher_config: TeacherConfig, input_size: int, dataset: Any,
                  device: torch.device, progress: bool = True) -> Teacher | None:
    """The teacher of the ``teacher`` config section, or None for ``teacher.kind: none``;
    centred as ``teacher.center`` asks (:mod:`ekd.teachers.centering`)."""
    kind = teacher_config.kind
    if kind == "none":
        return None
    if teacher_config.centers == "mean_embedding" and kind != "cache":
        raise ConfigError(f"teacher.centers=mean_embedding needs teacher.kind=cache (class centres are "
                          f"averaged from cached embeddings), got teacher.kind={kind}")
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"teacher.kind: unknown {kind!r}; valid: none, {', '.join(TEACHER_KINDS)}")
    teacher = TEACHER_KINDS[kind].build(teacher_config, input_size, dataset, device)
    return center_teacher(teacher, teacher_config, dataset, device, progress)
