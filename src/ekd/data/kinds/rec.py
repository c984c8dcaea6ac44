"""``data.kind: rec``: an InsightFace ``.rec`` (+ ``.idx``, ``property``), e.g. MS1MV2.

``data.root`` is the ``.rec`` file, its prefix, or a folder holding ``train.rec``; labels are the
header records' as ``ekd data info`` reads them (:class:`~ekd.data.record_dataset.RecordDataset`).
"""

from __future__ import annotations

import hashlib

from ekd.data.kinds.registry import DatasetKind, register_kind
from ekd.data.record_dataset import RecordDataset

__all__ = ["rec_fingerprint"]


def rec_fingerprint(ds: RecordDataset) -> str:
    """SHA-256 over the ``.rec`` size, the record count, and every image's record key, byte
    offset and label in dataset order: a cache keyed by record index fits only this file."""
    rd = ds.reader
    h = hashlib.sha256(f"rec\t{rd.path.stat().st_size}\t{len(rd)}\t{len(ds)}\n".encode())
    at = rd._sorted[rd.keys[rd._sorted].searchsorted(ds.image_keys)]  # index rows of the images
    for arr in (ds.image_keys, rd.offsets[at], ds.labels):
        h.update(arr.astype("<i8").tobytes())
    return h.hexdigest()


def _build(data_config) -> RecordDataset:  # noqa: ANN001 - ekd.config.DataConfig
    return RecordDataset(data_config.root, input_size=data_config.input_size, train=False,
                         on_corrupt=data_config.on_corrupt, accept_truncated=data_config.accept_truncated)


register_kind(DatasetKind("rec", RecordDataset, _build, rec_fingerprint, lambda ds: str(ds.reader.path)))
