"""``data.kind: folder``: an identity folder ``root/<identity>/<image>``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from ekd.data.folder import ImageFolderDataset
from ekd.data.kinds.registry import DatasetKind, register_kind

__all__ = ["folder_fingerprint"]


def folder_fingerprint(root: str | os.PathLike[str], samples: Sequence[tuple[str, int]]) -> str:
    """SHA-256 over (relative path, label, file size) of every sample, in dataset order."""
    h = hashlib.sha256()
    root = Path(root)
    for path, label in samples:
        rel = os.path.relpath(path, root)
        h.update(f"{rel}\t{label}\t{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def _build(data_config) -> ImageFolderDataset:  # noqa: ANN001 - ekd.config.DataConfig
    return ImageFolderDataset(Path(data_config.root), input_size=data_config.input_size, train=False,
                              on_corrupt=data_config.on_corrupt)


register_kind(DatasetKind("folder", ImageFolderDataset, _build,
                          lambda ds: folder_fingerprint(ds.root, ds.samples), lambda ds: str(ds.root)))
