"""Shared pytest fixtures.

The authors' reference vectors live in the repository (``tests/data/testvectors``), so every
checkout tests parity. The real faces live only in the shared data folder beside the repository
(``../shared``, or ``$EKD_SHARED_DIR``); each fixture below needs one part of it and skips,
naming the missing file or folder, when that part is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTVECTORS = Path(__file__).resolve().parent / "data" / "testvectors"
DEFAULT_SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# What each real-face fixture needs, relative to <shared>/data/faces.
FACES_NEEDS = {
    "lfw": ("lfw/pairs.txt", "lfw/images", "teacher_dlib_r29/lfw.npz"),
    "lfw_images": ("lfw/images",),
    "cfp": ("cfp/Protocol", "cfp/Data", "teacher_dlib_r29/cfp.npz"),
    "train": ("train", "teacher_dlib_r29/train.npz"),
}


def shared_root() -> Path:
    """The shared data folder: ``$EKD_SHARED_DIR`` if set, else ``../shared``."""
    return Path(os.environ.get("EKD_SHARED_DIR") or DEFAULT_SHARED)


def need_faces(*parts: str) -> Path:
    """``<shared>/data/faces``; skips the test naming the first of ``parts`` that is missing."""
    faces = shared_root() / "data" / "faces"
    for part in ("",) + parts:
        if not (faces / part).exists():
            pytest.skip(f"needs the real faces at {faces / part} (missing)")
    return faces


@pytest.fixture(scope="session")
def testvectors() -> Path:
    """The authors'-output vectors kept in the repository (see its README.md)."""
    assert TESTVECTORS.is_dir(), f"{TESTVECTORS} is part of the repository"
    return TESTVECTORS


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The whole shared data folder (prefer the fixtures below, which name the part needed)."""
    root = shared_root()
    if not root.is_dir():
        pytest.skip(f"needs the shared data folder at {root} (missing)")
    return root


@pytest.fixture
def shared_faces() -> Path:
    """The real-face folder with every part the tests use (KD-table tests)."""
    return need_faces(*sorted({p for parts in FACES_NEEDS.values() for p in parts}))


@pytest.fixture
def lfw_faces() -> Path:
    """Faces folder with LFW images, pairs.txt and the teacher's LFW embeddings."""
    return need_faces(*FACES_NEEDS["lfw"])


@pytest.fixture
def lfw_images() -> Path:
    """Faces folder with LFW images."""
    return need_faces(*FACES_NEEDS["lfw_images"])


@pytest.fixture
def cfp_faces() -> Path:
    """Faces folder with CFP (Protocol/, Data/) and the teacher's CFP embeddings."""
    return need_faces(*FACES_NEEDS["cfp"])


@pytest.fixture
def train_faces() -> Path:
    """Faces folder with the training identities and the teacher's training embeddings."""
    return need_faces(*FACES_NEEDS["train"])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a small machine: one intra-op thread avoids oversubscription (modules use
    it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_run_tree(tmp_path: Path, name: str, distill: list, teacher: Path | None = None,
                       val: bool = False, **train) -> dict:
    """The config tree of a tiny run on the built-in synthetic faces (16 identities x 8 images,
    32 px, 6 steps of 32 images, MobileFaceNet 64-d) in ``tmp_path/name``; ``teacher``: a
    checkpoint to distil from; ``val``: validate every 3 steps on the synthetic pairs."""
    data = tmp_path / "data"
    tree = {
        "data": {"kind": "synthetic", "input_size": 32,
                 "synthetic": {"train_identities": 16, "train_images": 8, "eval_identities": 8,
                               "eval_images": 4, "num_pairs": 120, "image_size": 32, "seed": 0,
                               "cache_dir": str(data)}},
        "sampler": {"random_size": 16, "identities_per_batch": 4, "samples_per_identity": 4},
        "model": {"backbone": "mobilefacenet", "embedding_size": 64},
        "train": {"epochs": 1, "device": "cpu", "output_dir": str(tmp_path / name), "log_every": 2,
                  "progress": False, "max_steps_per_epoch": 6, "tensorboard": False, **train},
        "distill": distill,
    }
    if teacher:
        tree["teacher"] = {"kind": "checkpoint", "path": str(teacher)}
    if val:
        tree["val"] = {"sets": [{"path": str(data / "pairs.txt"), "root": str(data / "eval"),
                                 "name": "syn"}], "every_steps": 3}
    return tree
