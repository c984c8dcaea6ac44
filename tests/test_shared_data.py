"""Test data: the in-repository reference vectors, and real-face fixtures that skip (naming the
missing part) when the shared data folder is partial."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import FACES_NEEDS, TESTVECTORS, need_faces, shared_root

VECTOR_FILES = ["arcface_torch_forward.npz", "arcface_torch_state_dict_keys.json",
                "distill_reference.npz"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reference_vectors_are_in_the_repository():
    sizes = {name: (TESTVECTORS / name).stat().st_size for name in VECTOR_FILES}
    assert all(size > 1000 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 8_000_000  # ~5.7 MB, kept small on purpose
    assert "Provenance" in (TESTVECTORS / "README.md").read_text()


def test_reference_vectors_match_the_shared_copy():
    shared = shared_root() / "testvectors"
    if not shared.is_dir():
        pytest.skip(f"no shared copy at {shared} to compare with")
    assert {n: _sha(TESTVECTORS / n) for n in VECTOR_FILES} == \
        {n: _sha(shared / n) for n in VECTOR_FILES}


def test_partial_shared_folder_skips_naming_the_missing_part(tmp_path, monkeypatch):
    monkeypatch.setenv("EKD_SHARED_DIR", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match=r"data/faces \(missing\)"):
        need_faces(*FACES_NEEDS["lfw"])  # no faces folder at all
    faces = tmp_path / "data" / "faces"
    (faces / "lfw" / "images").mkdir(parents=True)  # LFW images only: no pairs.txt, no .npz
    assert need_faces(*FACES_NEEDS["lfw_images"]) == faces
    with pytest.raises(pytest.skip.Exception, match=r"lfw/pairs\.txt \(missing\)"):
        need_faces(*FACES_NEEDS["lfw"])
    (faces / "lfw" / "pairs.txt").write_text("1\t0\n")
    with pytest.raises(pytest.skip.Exception, match=r"teacher_dlib_r29/lfw\.npz \(missing\)"):
        need_faces(*FACES_NEEDS["lfw"])
    with pytest.raises(pytest.skip.Exception, match=r"cfp/Protocol \(missing\)"):
        need_faces(*FACES_NEEDS["cfp"])
