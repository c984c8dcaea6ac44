"""The teacher contract and the registry of teacher kinds (``teacher.kind``); each kind is one
module beside this one that registers a :class:`TeacherKind` (built by :mod:`.build`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["TEACHER_KINDS", "Teacher", "TeacherKind", "register_kind"]


class Teacher:
    """What the trainer needs from a teacher: embeddings of the batch it is given.

    ``embed`` receives the (normalised, possibly mirrored) images, their dataset indices and
    their mirror flags, so that a cache can look embeddings up instead of running a network.
    """

    embedding_size: int
    input_size: int | None
    head_state: dict | None = None
    source: str = ""

    def embed(self, images: torch.Tensor, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class TeacherKind:
    """How to build the teacher of one ``teacher.kind``.

    ``build(teacher_config, input_size, dataset, device)`` returns a :class:`Teacher`;
    ``dataset`` is the training set (a cache checks that it was made for it).
    """

    name: str
    build: Callable[[Any, int, Any, torch.device], Teacher]


#: ``teacher.kind`` -> :class:`TeacherKind`, filled by the kind modules on import.
TEACHER_KINDS: dict[str, TeacherKind] = {}


def register_kind(kind: TeacherKind) -> TeacherKind:
    if kind.name in TEACHER_KINDS:
        raise ValueError(f"teacher kind {kind.name!r} is registered twice")
    TEACHER_KINDS[kind.name] = kind
    return kind
