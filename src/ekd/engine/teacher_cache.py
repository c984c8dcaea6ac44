"""Precomputed teacher embeddings: run a teacher once, distil many times without it.

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

:func:`build_cache` scales to MS1MV2 (5.8M images x 2): rows are embedded in chunks of
``chunk_batches`` batches; under ``torchrun`` rank r takes chunks r, r + W, ...; each chunk is
written straight into its rows of the one cache file (created full-size once by rank 0), then
marked done in ``chunks.done`` (one byte per chunk), so an interrupted run started again with
the same arguments (any world size) embeds only the chunks not yet done. Nothing of size N x D
is held in memory.

:func:`import_npz` converts the shared embedding format (``paths``, ``emb``, ``emb_flip`` arrays,
paths relative to the dataset root) into a cache for an identity folder, matching samples by path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ekd.data.kinds import fingerprint_of, kind_of
from ekd.data.kinds.folder import folder_fingerprint
from ekd.engine import distributed as D
from ekd.engine.teacher_base import Teacher
from ekd.errors import CheckpointError, DataError

log = logging.getLogger("ekd.teacher_cache")

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


def _read_manifest(path: Path) -> dict:
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
        self.manifest = _read_manifest(manifest_path)
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
                           block: int = 1 << 16) -> torch.Tensor:
    """Class centres of an embedding-only teacher: per identity, the L2-normalised mean of the
    unit embeddings of its images and their mirror images (``[num_classes, D]``, float32).
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
    return sums / sums.norm(dim=1, keepdim=True)


def _unit_and_norms(emb: np.ndarray, folder: Path, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """``[n, 2, D]`` float -> (float16 directions, float32 norms); non-finite rows are errors."""
    emb = np.asarray(emb, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=(1, 2)))
    if bad.size:
        raise DataError(f"teacher cache {folder}: the teacher produced non-finite embeddings for "
                        f"sample(s) {(bad[:5] + first_row).tolist()}")
    norms = np.linalg.norm(emb, axis=2)
    return (emb / np.maximum(norms, 1e-30)[:, :, None]).astype(np.float16), norms.astype(np.float32)


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def _write(folder: Path, emb: np.ndarray, manifest: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    unit, norms = _unit_and_norms(emb, folder, 0)
    for name, array in ((EMB_FILE, unit), (NORM_FILE, norms)):
        tmp = folder / (name + ".tmp")
        array.tofile(tmp)
        os.replace(tmp, folder / name)
    _write_manifest(folder, {"version": CACHE_VERSION, "num_samples": int(emb.shape[0]),
                             "embedding_size": int(emb.shape[2]), **manifest})
    return folder


def _prepare(folder: Path, manifest: dict, n_chunks: int) -> None:
    """Rank 0: keep an unfinished (or finished) cache made with the same settings, else create
    the files full-size with no chunk done."""
    path = folder / MANIFEST
    if path.is_file():
        old = _read_manifest(path)
        same = {k: v for k, v in old.items() if k != "complete"} == manifest
        if same and (old.get("complete") or (folder / DONE_FILE).is_file()):
            if not old.get("complete"):
                log.info("teacher cache %s: resuming an unfinished cache", folder)
            return
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    n, d = manifest["num_samples"], manifest["embedding_size"]
    for name, size in ((EMB_FILE, n * 2 * d * 2), (NORM_FILE, n * 2 * 4), (DONE_FILE, n_chunks)):
        with open(folder / name, "wb") as fh:
            fh.truncate(size)
    _write_manifest(folder, {**manifest, "complete": False})


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


@torch.inference_mode()
def build_cache(teacher: Callable[[torch.Tensor], torch.Tensor], dataset, out: str | Path,
                teacher_fp: str, teacher_name: str, batch_size: int = 128,
                device: torch.device | str = "cpu", progress: bool = True, chunk_batches: int = 64,
                num_workers: int = 0, dist: D.DistInfo | None = None,
                stop_after_chunks: int | None = None) -> Path:
    """Embed every sample of ``dataset`` (any kind of :mod:`ekd.data.kinds`) and its mirror with
    ``teacher`` into the cache folder ``out``, chunk by chunk, resumably (see the module doc).

    ``dist`` is this process's rank in an initialised process group (``torchrun``); every rank
    must call this. ``stop_after_chunks`` stops this rank after that many chunks, leaving the
    cache unfinished, as an interrupt would (for tests).
    """
    dist = dist or D.DistInfo()
    folder, n = Path(out), len(dataset)
    if batch_size < 1 or chunk_batches < 1:
        raise DataError(f"teacher cache: batch size ({batch_size}) and batches per chunk "
                        f"({chunk_batches}) must be >= 1")
    was_train = dataset.train
    dataset.train = False  # unflipped images; the mirror is computed explicitly
    try:
        probe = teacher(dataset[0][0][None].to(device))
        if probe.ndim != 2:
            raise CheckpointError(f"teacher {teacher_name}: output shape {tuple(probe.shape)} is not "
                                  "[batch, dim]")
        d, rows = int(probe.shape[1]), batch_size * chunk_batches
        n_chunks = -(-n // rows)
        kind = kind_of(dataset)
        manifest = {"version": CACHE_VERSION, "num_samples": n, "embedding_size": d,
                    "dataset": fingerprint_of(dataset), "dataset_kind": kind.name,
                    "dataset_source": kind.source(dataset), "teacher": teacher_fp,
                    "teacher_name": teacher_name, "input_size": dataset.input_size,
                    "chunk_rows": rows}
        if dist.is_main:
            _prepare(folder, manifest, n_chunks)
        D.barrier(dist)
        done = np.fromfile(folder / DONE_FILE, dtype=np.uint8) if (folder / DONE_FILE).is_file() \
            else np.ones(n_chunks, np.uint8)
        mine = [c for c in range(dist.rank, n_chunks, dist.world_size) if not done[c]]
        if stop_after_chunks is not None:
            mine = mine[:stop_after_chunks]
        if mine:
            _embed_chunks(teacher, dataset, folder, mine, rows, batch_size, d, device, num_workers,
                          progress and dist.is_main)
        D.barrier(dist)
        if dist.is_main and (folder / DONE_FILE).is_file():
            left = int((np.fromfile(folder / DONE_FILE, dtype=np.uint8) == 0).sum())
            if left:
                log.warning("teacher cache %s: %d of %d chunks not done; run again to resume", folder,
                            left, n_chunks)
            else:
                _write_manifest(folder, {**manifest, "complete": True})
                (folder / DONE_FILE).unlink()
        D.barrier(dist)
    finally:
        dataset.train = was_train
    return folder


def _embed_chunks(teacher, dataset, folder: Path, chunks: list[int], rows: int,  # noqa: ANN001
                  batch_size: int, d: int, device, num_workers: int, progress: bool) -> None:  # noqa: ANN001
    """Embed ``chunks`` (lists of ``rows`` consecutive samples) and write each into the files."""
    n = len(dataset)
    spans = [(c, c * rows, min(n, (c + 1) * rows)) for c in chunks]
    batches = [list(range(b, min(b + batch_size, hi)))
               for _, lo, hi in spans for b in range(lo, hi, batch_size)]
    loader = iter(DataLoader(dataset, batch_sampler=batches, num_workers=num_workers))
    fds = [os.open(folder / name, os.O_RDWR) for name in (EMB_FILE, NORM_FILE, DONE_FILE)]
    try:
        with tqdm(total=sum(hi - lo for _, lo, hi in spans), desc="teacher cache", unit="img",
                  disable=not progress, dynamic_ncols=True) as bar:
            for c, lo, hi in spans:
                parts = []
                for _ in range(lo, hi, batch_size):
                    images = next(loader)[0].to(device)
                    pair = torch.stack([teacher(images), teacher(images.flip(-1))], dim=1)
                    parts.append(pair.float().cpu().numpy())
                    bar.update(len(images))
                unit, norms = _unit_and_norms(np.concatenate(parts), folder, lo)
                _pwrite_all(fds[0], unit.tobytes(), lo * 2 * d * 2)
                _pwrite_all(fds[1], norms.tobytes(), lo * 2 * 4)
                os.fsync(fds[0])
                os.fsync(fds[1])
                _pwrite_all(fds[2], b"\x01", c)  # the chunk is done only once its rows are on disk
                os.fsync(fds[2])
    finally:
        for fd in fds:
            os.close(fd)


def import_npz(npz_path: str | Path, dataset, out: str | Path) -> Path:
    """Convert a ``paths``/``emb``/``emb_flip`` npz (paths relative to the dataset root)."""
    npz_path = Path(npz_path)
    try:
        data = np.load(npz_path, allow_pickle=False)
        paths, emb, emb_flip = data["paths"], data["emb"], data["emb_flip"]
    except Exception as exc:  # noqa: BLE001 - zipfile/format errors of a user file: bad file
        raise DataError(f"{npz_path}: not an embedding file with arrays paths, emb, emb_flip "
                        f"({type(exc).__name__}: {exc})") from None
    if paths.ndim != 1 or emb.shape != emb_flip.shape or emb.ndim != 2 or len(paths) != len(emb):
        raise DataError(f"{npz_path}: shapes differ: paths {paths.shape}, emb {emb.shape}, "
                        f"emb_flip {emb_flip.shape}")
    if not hasattr(dataset, "samples"):
        raise DataError(f"{npz_path}: --from-npz matches images by path and needs an identity "
                        "folder, not a .rec (embed the .rec with --teacher instead)")
    row = {str(p): i for i, p in enumerate(paths)}
    rels = [os.path.relpath(p, dataset.root).replace(os.sep, "/") for p, _ in dataset.samples]
    missing = [r for r in rels if r not in row]
    if missing:
        raise DataError(f"{npz_path}: no embedding for {len(missing)} dataset image(s), e.g. "
                        + ", ".join(missing[:5]))
    order = np.array([row[r] for r in rels])
    stacked = np.stack([emb[order], emb_flip[order]], axis=1)
    return _write(Path(out), stacked, {"dataset": fingerprint_of(dataset), "dataset_kind": "folder",
                                       "dataset_source": str(dataset.root),
                                       "teacher": file_fingerprint(npz_path),
                                       "teacher_name": npz_path.name, "input_size": None,
                                       "complete": True})
