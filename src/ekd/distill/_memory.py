"""A FIFO memory of past (detached, L2-normalised) student and teacher embeddings with labels.

Used by the distillers that pair the current batch with earlier batches (``icd_face``'s feature
banks, ``unified_kd``'s RPSD memory). The contents are buffers, so they are in the distiller's
``state_dict`` and a resumed run continues with the same memory. Distillers see the gathered
global batch on every rank and push it once per step, so every rank holds the same memory
without communication.
"""

from __future__ import annotations

import torch
from torch import nn

from ekd.errors import ConfigError
from ekd.functional import unit


class EmbeddingMemory(nn.Module):
    """The last ``size`` rows pushed (student ``[size, student_dim]``, teacher, labels; -1 = empty)."""

    def __init__(self, owner: str, size: int, student_dim: int | None, teacher_dim: int | None) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"distiller '{owner}': memory_size must be an integer >= 0, got {size!r}")
        if size and (not student_dim or not teacher_dim):
            raise ConfigError(f"distiller '{owner}': memory_size > 0 needs student_dim and teacher_dim "
                              f"(got {student_dim}, {teacher_dim}); the trainer fills them in")
        self.owner, self.size = owner, int(size)
        self.register_buffer("student", torch.zeros(self.size, int(student_dim or 0)))
        self.register_buffer("teacher", torch.zeros(self.size, int(teacher_dim or 0)))
        self.register_buffer("labels", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("next", torch.zeros((), dtype=torch.long))

    def contents(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled slots (student, teacher, labels), in slot order, cast to ``dtype``."""
        valid = self.labels >= 0
        return self.student[valid].to(dtype), self.teacher[valid].to(dtype), self.labels[valid]

    @torch.no_grad()
    def push(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the (last ``size``) rows of a batch over the oldest slots."""
        if not self.size or labels.numel() == 0:
            return
        if student.shape[1] != self.student.shape[1] or teacher.shape[1] != self.teacher.shape[1]:
            raise ConfigError(f"distiller '{self.owner}': embedding widths (student {student.shape[1]}, "
                              f"teacher {teacher.shape[1]}) differ from the memory's "
                              f"({self.student.shape[1]}, {self.teacher.shape[1]})")
        n = min(labels.shape[0], self.size)
        slots = (self.next + torch.arange(n, device=labels.device)) % self.size
        self.student[slots] = unit(student[-n:].detach(), dim=1).to(self.student.dtype)
        self.teacher[slots] = unit(teacher[-n:].detach(), dim=1).to(self.teacher.dtype)
        self.labels[slots] = labels[-n:].to(self.labels.dtype)
        self.next = (self.next + n) % self.size
