"""The teacher kinds of ``teacher.kind`` (none, checkpoint, onnx, cache), one builder each.

Imports flow one way: :mod:`~ekd.engine.teacher_base` <- teacher, teacher_onnx, teacher_cache
<- this registry <- trainer / ``ekd teacher-cache``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ekd.data.kinds import fingerprint_of, kind_of
from ekd.engine.teacher import ModelTeacher, load_teacher
from ekd.engine.teacher_base import Teacher
from ekd.engine.teacher_cache import CachedTeacher, TeacherCache, file_fingerprint, mean_embedding_centers
from ekd.engine.teacher_onnx import OnnxTeacher
from ekd.errors import CheckpointError, ConfigError

__all__ = ["TEACHER_KINDS", "build_teacher", "embedder_from_file"]


def _checkpoint(tc, input_size: int, dataset, device: torch.device) -> Teacher:  # noqa: ANN001
    loaded = load_teacher(tc.path, tc.backbone, tc.embedding_size, input_size=input_size, device=device)
    return ModelTeacher(loaded, tc.path)


def _onnx(tc, input_size: int, dataset, device: torch.device) -> Teacher:  # noqa: ANN001
    return OnnxTeacher(tc.path, input_size, color=tc.onnx_color, layout=tc.onnx_layout,
                       mean=tc.onnx_mean, std=tc.onnx_std, device=device)


def _cache(tc, input_size: int, dataset, device: torch.device) -> Teacher:  # noqa: ANN001
    teacher_fp = file_fingerprint(tc.cache_teacher) if tc.cache_teacher else None
    cache = TeacherCache(tc.path, fingerprint_of(dataset), teacher_fp,
                         dataset_source=kind_of(dataset).source(dataset))
    if len(cache) != len(dataset):
        raise CheckpointError(f"teacher cache {tc.path} holds {len(cache)} samples, the dataset "
                              f"{len(dataset)}")
    teacher = CachedTeacher(cache, tc.path, device)
    if tc.centers == "mean_embedding":
        teacher.head_state = {"weight": mean_embedding_centers(cache, dataset.labels, dataset.num_classes)}
    return teacher


#: ``teacher.kind`` -> builder ``(teacher_config, input_size, dataset, device) -> Teacher``.
TEACHER_KINDS: dict[str, Callable[..., Teacher]] = {"checkpoint": _checkpoint, "onnx": _onnx, "cache": _cache}


def build_teacher(tc, input_size: int, dataset, device: torch.device) -> Teacher | None:  # noqa: ANN001
    """The teacher of config section ``tc`` (:class:`ekd.config.TeacherConfig`), or None."""
    if tc.kind == "none":
        return None
    if tc.centers == "mean_embedding" and tc.kind != "cache":
        raise ConfigError(f"teacher.centers=mean_embedding needs teacher.kind=cache (class centres are "
                          f"averaged from cached embeddings), got teacher.kind={tc.kind}")
    if tc.kind not in TEACHER_KINDS:
        raise ConfigError(f"teacher.kind: unknown {tc.kind!r}; valid: none, {', '.join(TEACHER_KINDS)}")
    return TEACHER_KINDS[tc.kind](tc, input_size, dataset, device)


def embedder_from_file(path: str | Path, backbone: str | None, input_size: int,
                       device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A teacher file (ekd checkpoint, arcface_torch ``backbone.pth`` or ``.onnx``) as a function
    ``normalised images -> embeddings`` and a display name."""
    if str(path).endswith(".onnx"):
        onnx = OnnxTeacher(path, input_size, device=device)
        return (lambda x: onnx.embed(x, None, None)), Path(path).name  # type: ignore[arg-type]
    loaded = load_teacher(path, backbone, input_size=input_size, device=device)
    return loaded.model, f"{loaded.backbone} ({Path(path).name})"
