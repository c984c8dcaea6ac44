"""Writing teacher caches (the format: :mod:`ekd.teachers.cache`), and ``ekd teacher-cache``'s work:
embed a training set (identity folder or ``.rec``) with a teacher file once, on one process or under
``torchrun`` (each rank its share of the chunks, resumable), or import a ``paths/emb/emb_flip`` npz.

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

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ekd.config import DataConfig
from ekd.data.kinds import build_dataset, fingerprint_of, kind_of
from ekd.data.recordio import rec_paths
from ekd.utils import distributed
from ekd.errors import CheckpointError, DataError
from ekd.teachers.cache import (CACHE_VERSION, DONE_FILE, EMB_FILE, MANIFEST, NORM_FILE, read_manifest,
                                file_fingerprint)
from ekd.teachers.checkpoint import load_teacher
from ekd.teachers.onnx import OnnxTeacher
from ekd.utils.device import resolve_device

__all__ = ["build_cache", "cache_for_data", "embedder_from_file", "guess_data_kind", "import_npz"]

log = logging.getLogger("ekd.teacher_cache")


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
        old = read_manifest(path)
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
                num_workers: int = 0, dist: distributed.DistInfo | None = None,
                stop_after_chunks: int | None = None) -> Path:
    """Embed every sample of ``dataset`` (any kind of :mod:`ekd.data.kinds`) and its mirror with
    ``teacher`` into the cache folder ``out``, chunk by chunk, resumably (see the module doc).

    ``dist`` is this process's rank in an initialised process group (``torchrun``); every rank
    must call this. ``stop_after_chunks`` stops this rank after that many chunks, leaving the
    cache unfinished, as an interrupt would (for tests).
    """
    dist = dist or distributed.DistInfo()
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
        distributed.barrier(dist)
        done = np.fromfile(folder / DONE_FILE, dtype=np.uint8) if (folder / DONE_FILE).is_file() \
            else np.ones(n_chunks, np.uint8)
        mine = [c for c in range(dist.rank, n_chunks, dist.world_size) if not done[c]]
        if stop_after_chunks is not None:
            mine = mine[:stop_after_chunks]
        if mine:
            _embed_chunks(teacher, dataset, folder, mine, rows, batch_size, d, device, num_workers,
                          progress and dist.is_main)
        distributed.barrier(dist)
        if dist.is_main and (folder / DONE_FILE).is_file():
            left = int((np.fromfile(folder / DONE_FILE, dtype=np.uint8) == 0).sum())
            if left:
                log.warning("teacher cache %s: %d of %d chunks not done; run again to resume", folder,
                            left, n_chunks)
            else:
                _write_manifest(folder, {**manifest, "complete": True})
                (folder / DONE_FILE).unlink()
        distributed.barrier(dist)
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


def embedder_from_file(path: str | Path, backbone: str | None, input_size: int,
                       device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A teacher file (ekd checkpoint, arcface_torch ``backbone.pth`` or ``.onnx``) as a function
    ``normalised images -> embeddings`` and a display name."""
    if str(path).endswith(".onnx"):
        onnx = OnnxTeacher(path, input_size, device=device)
        return (lambda x: onnx.embed(x, None, None)), Path(path).name  # type: ignore[arg-type]
    loaded = load_teacher(path, backbone, input_size=input_size, device=device)
    return loaded.model, f"{loaded.backbone} ({Path(path).name})"


def guess_data_kind(path: str | Path) -> str:
    """``rec`` for a ``.rec``/``.idx`` file, its prefix or a folder holding ``train.rec``, else
    ``folder``."""
    p = Path(path)
    if p.suffix in (".rec", ".idx") or (p.is_dir() and (p / "train.rec").is_file()):
        return "rec"
    if not p.exists() and rec_paths(p)[0].is_file():
        return "rec"
    return "folder"


def cache_for_data(data: str | Path, input_size: int, out: str | Path, teacher: str | None = None,
                   backbone: str | None = None, from_npz: str | None = None, batch_size: int = 128,
                   device: str = "auto", progress: bool = True, data_kind: str = "auto",
                   num_workers: int = 0, chunk_batches: int = 64, on_corrupt: str = "skip") -> Path:
    """Write the teacher cache of the training set ``data`` (see ``ekd teacher-cache --help``)."""
    if (teacher is None) == (from_npz is None):
        raise DataError("give exactly one of a teacher file or --from-npz")
    kind = guess_data_kind(data) if data_kind == "auto" else data_kind
    if kind not in ("folder", "rec"):
        raise DataError(f"--data-kind: {kind!r} is not one of auto, folder, rec")
    dataset = build_dataset(DataConfig(kind=kind, root=str(data), input_size=input_size,
                                       on_corrupt=on_corrupt))
    if from_npz is not None:
        return import_npz(from_npz, dataset, out)
    dev = resolve_device(device)
    started = not torch.distributed.is_initialized()
    info = distributed.init_distributed(dev.type)
    try:
        if dev.type == "cuda" and info.enabled:
            dev = torch.device("cuda", info.local_rank)
        net, name = embedder_from_file(teacher, backbone, input_size, dev)  # type: ignore[arg-type]
        fp = file_fingerprint(teacher)  # type: ignore[arg-type]
        return build_cache(net, dataset, out, fp, name, batch_size, dev, progress=progress,
                           chunk_batches=chunk_batches, num_workers=num_workers, dist=info)
    finally:
        if started:
            distributed.shutdown()
