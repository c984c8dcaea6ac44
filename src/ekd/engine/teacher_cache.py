"""Precomputed teacher embeddings: run a teacher once, distil many times without it.

A cache is a folder with
- ``embeddings.f16``: a float16 memory map ``[N, 2, D]`` — the direction (unit vector) of the
  teacher's embedding of sample i as stored (``[:, 0]``) and of its mirror image (``[:, 1]``);
- ``norms.f32``: their norms ``[N, 2]`` (float32), so raw embeddings of any magnitude are
  restored to float16 relative precision without overflow;
- ``manifest.json``: format version, N, D, the dataset fingerprint (a hash of every sample's
  path relative to the dataset root, its label and its file size), the teacher fingerprint
  (the SHA-256 of the teacher file, or a caller-given id) and the input size.

Opening a cache checks both fingerprints, so a cache made for another dataset (an image added,
removed or relabelled) or another teacher is an error, never silently wrong targets. Training
reads the teacher embedding of each sample by index and flip flag.

:func:`import_npz` converts the shared embedding format (``paths``, ``emb``, ``emb_flip`` arrays,
paths relative to the dataset root) into a cache for a dataset, matching samples by path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ekd.errors import CheckpointError, DataError

CACHE_VERSION = 1
EMB_FILE = "embeddings.f16"
NORM_FILE = "norms.f32"
MANIFEST = "manifest.json"


def dataset_fingerprint(root: str | Path, samples: Sequence[tuple[str, int]]) -> str:
    """SHA-256 over (relative path, label, file size) of every sample, in dataset order."""
    h = hashlib.sha256()
    root = Path(root)
    for path, label in samples:
        rel = os.path.relpath(path, root)
        h.update(f"{rel}\t{label}\t{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the teacher's identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TeacherCache:
    """Read-only view of a cache folder, validated against a dataset and a teacher."""

    def __init__(self, folder: str | Path, dataset_fp: str | None = None,
                 teacher_fp: str | None = None) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"teacher cache {self.folder}: {MANIFEST} not found "
                                  "(create it with `ekd teacher-cache`)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            n, d = int(self.manifest["num_samples"]), int(self.manifest["embedding_size"])
            if n < 1 or d < 1:
                raise ValueError(f"num_samples {n} and embedding_size {d} must be >= 1")
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError, OSError) as exc:
            raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
        if self.manifest.get("version") != CACHE_VERSION:
            raise CheckpointError(f"{manifest_path}: cache version {self.manifest.get('version')} "
                                  f"is not {CACHE_VERSION}; rebuild the cache")
        if dataset_fp is not None and self.manifest.get("dataset") != dataset_fp:
            raise CheckpointError(f"teacher cache {self.folder} was made for another dataset (images "
                                  "added, removed, changed or relabelled): rebuild it")
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


def mean_embedding_centers(cache: "TeacherCache", labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Class centres of an embedding-only teacher: per identity, the L2-normalised mean of the
    unit embeddings of its images and their mirror images (``[num_classes, D]``, float32)."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if labels_t.shape[0] != len(cache):
        raise DataError(f"teacher cache {cache.folder}: {len(cache)} samples but {labels_t.shape[0]} labels")
    directions = torch.from_numpy(np.asarray(cache.embeddings, dtype=np.float32)).sum(1)
    sums = torch.zeros(num_classes, directions.shape[1]).index_add_(0, labels_t, directions)
    empty = (sums.norm(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"teacher cache {cache.folder}: no embedding for class(es) {empty[:10]}")
    return sums / sums.norm(dim=1, keepdim=True)


def _write(folder: Path, emb: np.ndarray, manifest: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    emb = np.asarray(emb, dtype=np.float64)
    if not np.isfinite(emb).all():
        raise DataError(f"teacher cache {folder}: the teacher produced non-finite embeddings")
    norms = np.linalg.norm(emb, axis=2)
    unit = emb / np.maximum(norms, 1e-30)[:, :, None]
    for name, array in ((EMB_FILE, unit.astype(np.float16)), (NORM_FILE, norms.astype(np.float32))):
        tmp = folder / (name + ".tmp")
        array.tofile(tmp)
        os.replace(tmp, folder / name)
    manifest = {"version": CACHE_VERSION, "num_samples": int(emb.shape[0]),
                "embedding_size": int(emb.shape[2]), **manifest}
    tmp_m = folder / (MANIFEST + ".tmp")
    tmp_m.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_m, folder / MANIFEST)
    return folder


@torch.inference_mode()
def build_cache(teacher: Callable[[torch.Tensor], torch.Tensor], dataset, out: str | Path,
                teacher_fp: str, teacher_name: str, batch_size: int = 128,
                device: torch.device | str = "cpu", progress: bool = True) -> Path:
    """Embed every sample of ``dataset`` (an ImageFolderDataset) and its mirror with ``teacher``."""
    was_train = dataset.train
    dataset.train = False  # unflipped images; the mirror is computed explicitly
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        parts = []
        for images, *_ in tqdm(loader, desc="teacher cache", disable=not progress):
            images = images.to(device)
            pair = torch.stack([teacher(images), teacher(images.flip(-1))], dim=1)
            parts.append(pair.float().cpu().numpy())
    finally:
        dataset.train = was_train
    emb = np.concatenate(parts)
    return _write(Path(out), emb, {"dataset": dataset_fingerprint(dataset.root, dataset.samples),
                                   "teacher": teacher_fp, "teacher_name": teacher_name,
                                   "input_size": dataset.input_size})


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
    row = {str(p): i for i, p in enumerate(paths)}
    rels = [os.path.relpath(p, dataset.root).replace(os.sep, "/") for p, _ in dataset.samples]
    missing = [r for r in rels if r not in row]
    if missing:
        raise DataError(f"{npz_path}: no embedding for {len(missing)} dataset image(s), e.g. "
                        + ", ".join(missing[:5]))
    order = np.array([row[r] for r in rels])
    stacked = np.stack([emb[order], emb_flip[order]], axis=1)
    return _write(Path(out), stacked, {"dataset": dataset_fingerprint(dataset.root, dataset.samples),
                                       "teacher": file_fingerprint(npz_path),
                                       "teacher_name": npz_path.name, "input_size": None})


def cache_for_folder(data_root: str | Path, input_size: int, out: str | Path, teacher: str | None = None,
                     backbone: str | None = None, from_npz: str | None = None, batch_size: int = 128,
                     device: str = "auto", progress: bool = True) -> Path:
    """``ekd teacher-cache``: embed an identity folder with a teacher file (ekd checkpoint,
    arcface_torch ``backbone.pth`` or ``.onnx``), or import a ``paths/emb/emb_flip`` npz."""
    from ekd.data import ImageFolderDataset
    from ekd.engine.build import resolve_device
    from ekd.engine.teacher import load_teacher

    dataset = ImageFolderDataset(data_root, input_size=input_size, train=False)
    if (teacher is None) == (from_npz is None):
        raise DataError("give exactly one of a teacher file or --from-npz")
    if from_npz is not None:
        return import_npz(from_npz, dataset, out)
    dev = resolve_device(device)
    if str(teacher).endswith(".onnx"):
        from ekd.engine.teacher_onnx import OnnxTeacher

        onnx = OnnxTeacher(teacher, input_size, device=dev)
        net, name = (lambda x: onnx.embed(x, None, None)), Path(teacher).name  # type: ignore[arg-type]
    else:
        loaded = load_teacher(teacher, backbone, input_size=input_size, device=dev)
        net, name = loaded.model, f"{loaded.backbone} ({Path(teacher).name})"
    return build_cache(net, dataset, out, file_fingerprint(teacher), name, batch_size, dev, progress)
