"""``ekd teacher-cache``: embed a training set (identity folder or ``.rec``) with a teacher file
once, on one process or under ``torchrun`` (each rank its share of the chunks, resumable), or
import a ``paths/emb/emb_flip`` npz (:mod:`ekd.engine.teacher_cache`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ekd.config import DataConfig
from ekd.data.kinds import build_dataset
from ekd.data.recordio import rec_paths
from ekd.engine import distributed as D
from ekd.engine.build import resolve_device
from ekd.engine.teacher_cache import build_cache, file_fingerprint, import_npz
from ekd.engine.teacher_kinds import embedder_from_file
from ekd.errors import DataError

__all__ = ["cache_for_data", "guess_data_kind"]


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
    info = D.init_distributed(dev.type)
    try:
        if dev.type == "cuda" and info.enabled:
            dev = torch.device("cuda", info.local_rank)
        net, name = embedder_from_file(teacher, backbone, input_size, dev)  # type: ignore[arg-type]
        fp = file_fingerprint(teacher)  # type: ignore[arg-type]
        return build_cache(net, dataset, out, fp, name, batch_size, dev, progress=progress,
                           chunk_batches=chunk_batches, num_workers=num_workers, dist=info)
    finally:
        if started:
            D.shutdown()
