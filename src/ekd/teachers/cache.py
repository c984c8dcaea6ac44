"""``teacher.kind: cache``: precomputed teacher embeddings: run a teacher once, distil many times
without it.

A cache is a folder with
- ``embeddings.f16``: a float16 memory map ``[N, 2, D]`` — the direction (unit vector) of the
  teacher's embedding of sample i as stored (``[:, 0]``) and of its mirror image (``[:, 1]``);
- ``norms.f32``: their norms ``[N, 2]`` (float32), so raw embeddings of any magnitude are
  restored to float16 relative precision without overflow;
- ``manifest.json``: format version, N, D, the dataset fingerprint (of its kind, see
  :mod:`ekd.data.kinds`: every image's relative path, label and file size for a folder; every
  record's key, byte offset and label plus the file size for a ``.rec``, so that a cache keyed
  by record index fits only that file), the teacher fingerprint (the SHA-256 of the teacher
  file, or a caller-given id), the input size and whether the cache is complete.

Opening a cache checks both fingerprints, so a cache made for another dataset (an image added,
removed or relabelled, another ``.rec``) or another teacher is an error, never silently wrong
targets; so is an unfinished cache. Training reads the teacher embedding of each sample by index
and flip flag.

Writing a cache (:func:`~ekd.teachers.cache_builder.build_cache`, ``ekd teacher-cache``):
:mod:`ekd.teachers.cache_builder`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ekd.data.kinds import fingerprint_of, kind_of
from ekd.data.kinds.folder import folder_fingerprint
from ekd.errors import CheckpointError, DataError
from ekd.teachers.registry import Teacher, TeacherKind, register_kind

__all__ = ["CACHE_VERSION", "DONE_FILE", "EMB_FILE", "MANIFEST", "NORM_FILE", "CachedTeacher", "TeacherCache",
           "dataset_fingerprint", "file_fingerprint", "mean_embedding_centers", "read_manifest"]

CACHE_VERSION = 1
EMB_FILE = "embeddings.f16"
NORM_FILE = "norms.f32"
MANIFEST = "manifest.json"
DONE_FILE = "chunks.done"

#: The folder kind's fingerprint, ``(root, samples) -> sha256`` (kept under its old name).
dataset_fingerprint = folder_fingerprint


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the teacher's identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        n, d = int(manifest["num_samples"]), int(manifest["embedding_size"])
        if n < 1 or d < 1:
            raise ValueError(f"num_samples {n} and embedding_size {d} must be >= 1")
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    return manifest


class TeacherCache:
    """Read-only view of a cache folder, validated against a dataset and a teacher."""

    def __init__(self, folder: str | Path, dataset_fp: str | None = None,
                 teacher_fp: str | None = None, dataset_source: str | None = None) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"teacher cache {self.folder}: {MANIFEST} not found "
                                  "(create it with `ekd teacher-cache`)")
        self.manifest = read_manifest(manifest_path)
        n, d = int(self.manifest["num_samples"]), int(self.manifest["embedding_size"])
        if self.manifest.get("version") != CACHE_VERSION:
            raise CheckpointError(f"{manifest_path}: cache version {self.manifest.get('version')} "
                                  f"is not {CACHE_VERSION}; rebuild the cache")
        if self.manifest.get("complete") is False:
            raise CheckpointError(f"teacher cache {self.folder} is unfinished (an interrupted "
                                  "`ekd teacher-cache`): run the same command again to resume it")
        if dataset_fp is not None and self.manifest.get("dataset") != dataset_fp:
            made = self.manifest.get("dataset_source")
            raise CheckpointError(f"teacher cache {self.folder} was made for another dataset"
                                  f"{f' ({made})' if made else ''} than {dataset_source or 'this one'} "
                                  "(images added, removed, changed or relabelled, or another "
                                  ".rec file): rebuild it")
        if teacher_fp is not None and self.manifest.get("teacher") != teacher_fp:
            raise CheckpointError(f"teacher cache {self.folder} was made with another teacher "
                                  f"({self.manifest.get('teacher_name')}): rebuild it")
        emb_path = self.folder / EMB_FILE
        expected = n * 2 * d * 2
        if not emb_path.is_file() or emb_path.stat().st_size != expected:
            raise CheckpointError(f"{emb_path}: missing or truncated (expected {expected} bytes "
                                  f"for {n} x 2 x {d} float16)")
        self.embeddings = np.memmap(emb_path, dtype=np.float16, mode="r", shape=(n, 2, d))
        norm_path = self.folder / NORM_FILE
        if not norm_path.is_file() or norm_path.stat().st_size != n * 2 * 4:
            raise CheckpointError(f"{norm_path}: missing or truncated (expected {n * 2 * 4} bytes)")
        self.norms = np.memmap(norm_path, dtype=np.float32, mode="r", shape=(n, 2))

    @property
    def embedding_size(self) -> int:
        return int(self.manifest["embedding_size"])

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def lookup(self, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """Teacher embeddings (float32) of samples ``indices`` as seen (mirrored if ``flipped``)."""
        idx = indices.cpu().numpy()
        fl = flipped.cpu().numpy().astype(np.int64)
        unit = self.embeddings[idx, fl].astype(np.float32)
        return torch.from_numpy(unit * self.norms[idx, fl][:, None])


class CachedTeacher(Teacher):
    """Embeddings read from a :class:`TeacherCache` by index and flip."""

    def __init__(self, cache: TeacherCache, source: str, device: torch.device | str) -> None:
        self.cache = cache
        self.embedding_size = cache.embedding_size
        self.input_size = cache.manifest.get("input_size")
        self.source = source
        self.device = torch.device(device)

    def embed(self, images: torch.Tensor, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        return self.cache.lookup(indices, flipped).to(self.device, non_blocking=True)


def mean_embedding_centers(cache: TeacherCache, labels: Sequence[int], num_classes: int,
                           block: int = 1 << 16, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Class centres of an embedding-only teacher: per identity, the L2-normalised mean of the
    unit embeddings of its images and their mirror images (``[num_classes, D]``, float32), less
    ``offset`` before normalising when given (``teacher.center``, :mod:`ekd.teachers.centering`).
    The cache is read in blocks of ``block`` rows."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if labels_t.shape[0] != len(cache):
        raise DataError(f"teacher cache {cache.folder}: {len(cache)} samples but {labels_t.shape[0]} labels")
    sums = torch.zeros(num_classes, cache.embedding_size)
    for a in range(0, len(cache), block):
        directions = torch.from_numpy(np.asarray(cache.embeddings[a:a + block], dtype=np.float32)).sum(1)
        sums.index_add_(0, labels_t[a:a + block], directions)
    empty = (sums.norm(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"teacher cache {cache.folder}: no embedding for class(es) {empty[:10]}")
    if offset is not None:
        counts = torch.bincount(labels_t, minlength=num_classes).clamp(min=1).float()
        sums = sums / (2 * counts[:, None]) - offset.float()[None]
    return sums / sums.norm(dim=1, keepdim=True)


def _build(teacher_config, input_size: int, dataset, device: torch.device) -> Teacher:  # noqa: ANN001
    teacher_fp = file_fingerprint(teacher_config.cache_teacher) if teacher_config.cache_teacher else None
    cache = TeacherCache(teacher_config.path, fingerprint_of(dataset), teacher_fp,
                         dataset_source=kind_of(dataset).source(dataset))
    if len(cache) != len(dataset):
        raise CheckpointError(f"teacher cache {teacher_config.path} holds {len(cache)} samples, the dataset "
                              f"{len(dataset)}")
    teacher = CachedTeacher(cache, teacher_config.path, device)
    if teacher_config.centers == "mean_embedding":
        teacher.head_state = {"weight": mean_embedding_centers(cache, dataset.labels, dataset.num_classes)}
    return teacher


register_kind(TeacherKind("cache", _build))
