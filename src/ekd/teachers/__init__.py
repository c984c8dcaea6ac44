"""Teacher kinds keyed by ``teacher.kind``: ``checkpoint`` (an ekd checkpoint or an arcface_torch
``backbone.pth``), ``onnx``, ``cache`` (precomputed embeddings; written by :mod:`.cache_builder`).

The contract every teacher implements (:class:`~ekd.teachers.registry.Teacher`) and the registry
are in :mod:`.registry`; each kind is one module that registers a
:class:`~ekd.teachers.registry.TeacherKind`; a new kind is one more module imported here.
"""

# Registered in this order (the order ``teacher.kind`` errors list them in).
from ekd.teachers import checkpoint, onnx  # noqa: F401, I001  (register the kinds)
from ekd.teachers import cache  # noqa: F401, I001
from ekd.teachers.build import build_teacher
from ekd.teachers.registry import TEACHER_KINDS, Teacher, TeacherKind, register_kind

__all__ = ["TEACHER_KINDS", "Teacher", "TeacherKind", "build_teacher", "register_kind"]
