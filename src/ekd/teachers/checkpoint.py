"""``teacher.kind: checkpoint``: a frozen PyTorch backbone run on every batch, restored from an ekd
checkpoint or an InsightFace arcface_torch ``backbone.pth`` (a bare ``state_dict``, whose
architecture ``teacher.backbone`` names; :func:`ekd.models.loading.load_model` tells the two apart).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ekd.models.loading import LoadedModel, freeze, load_model
from ekd.teachers.registry import Teacher, TeacherKind, register_kind

__all__ = ["ModelTeacher", "load_teacher"]


def load_teacher(path: str | Path, backbone: str | None = None, embedding_size: int | None = None,
                 input_size: int | None = None, device: torch.device | str = "cpu") -> LoadedModel:
    """Load and freeze a teacher."""
    loaded = load_model(path, backbone, embedding_size, input_size)
    loaded.model = freeze(loaded.model.to(device))
    return loaded


class ModelTeacher(Teacher):
    """A frozen PyTorch backbone run on every batch."""

    def __init__(self, loaded: LoadedModel, source: str) -> None:
        self.model = loaded.model
        self.embedding_size = loaded.embedding_size
        self.input_size = loaded.input_size
        self.head_state = loaded.head_state
        self.source = source

    @torch.no_grad()
    def embed(self, images: torch.Tensor, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _build(teacher_config, input_size: int, dataset, device: torch.device) -> Teacher:  # noqa: ANN001
    loaded = load_teacher(teacher_config.path, teacher_config.backbone, teacher_config.embedding_size,
                          input_size=input_size, device=device)
    return ModelTeacher(loaded, teacher_config.path)


register_kind(TeacherKind("checkpoint", _build))
