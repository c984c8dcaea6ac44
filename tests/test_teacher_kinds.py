"""The teacher-kind registry (``ekd.teachers``): one module per ``teacher.kind``, registered on
import, the same names as the config accepts. Each kind's behaviour is tested beside its data:
``checkpoint`` in test_teacher.py, ``onnx`` in test_scale.py, ``cache`` in test_teacher_centers.py,
test_rec_training.py and test_hostile.py."""

from __future__ import annotations

import pytest

from ekd.config import _CHOICES, TeacherConfig
from ekd.errors import ConfigError
from ekd.teachers import TEACHER_KINDS, TeacherKind, build_teacher, register_kind
from ekd.teachers import cache, checkpoint, onnx


def test_registry_is_the_config_choice_and_each_kind_is_its_own_module():
    assert list(TEACHER_KINDS) == ["checkpoint", "onnx", "cache"]
    assert set(_CHOICES["teacher.kind"]) == {"none", *TEACHER_KINDS}
    for name, module in (("checkpoint", checkpoint), ("onnx", onnx), ("cache", cache)):
        assert TEACHER_KINDS[name].build.__module__ == module.__name__


def test_no_teacher_and_unknown_or_duplicate_kinds():
    assert build_teacher(TeacherConfig(kind="none"), 112, None, "cpu") is None
    with pytest.raises(ConfigError, match="teacher.kind: unknown 'other'; valid: none, checkpoint, onnx, cache"):
        build_teacher(TeacherConfig(kind="other"), 112, None, "cpu")
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(TeacherKind("cache", lambda *a: None))
