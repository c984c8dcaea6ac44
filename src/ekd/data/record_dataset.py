"""An InsightFace ``.rec`` as a map-style dataset (the file format: :mod:`ekd.data.recordio`)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ekd.data.recordio import _LEN_MASK, MAGIC, RecordIOReader, unpack
from ekd.data.robust import CorruptSampleWarning, SkipCorrupt, check_on_corrupt
from ekd.data.shared_arrays import SharedArrays
from ekd.data.transforms import COLOURS, decode_pil, random_flip, to_tensor, to_uint8
from ekd.errors import DataError

__all__ = ["RecordDataset", "property_path"]

_MAX_LABEL = 1 << 24  # float32 labels are exact integers below 2**24


def property_path(rec: Path) -> Path:
    """The ``property`` file ``ekd data pack`` writes for ``rec``: ``property`` beside a
    ``train.rec`` (InsightFace's layout), ``<name>.property`` beside any other ``<name>.rec``,
    so that sets packed into one folder never share (and overwrite) one."""
    rec = Path(rec)
    return rec.parent / ("property" if rec.name == "train.rec" else f"{rec.stem}.property")


class RecordDataset(SharedArrays, SkipCorrupt, Dataset):
    """An InsightFace ``.rec`` as a dataset; items ``(image, label, index)`` like
    :class:`~ekd.data.folder.ImageFolderDataset`.

    ``labels`` (int64) holds each image's header label (``label[0]`` for array labels), read
    once at construction; ``num_classes`` is the ``property`` file's count (at least
    ``max(label) + 1``). ``identity_ranges`` maps identity record keys to ``[start, end)``
    image key ranges when the file has InsightFace's header record 0.

    Labels that are not contiguous (some of ``0..max`` unused) are kept as they are, so that a
    teacher classifier indexed by them still matches, with a warning naming the gaps;
    ``remap_labels=True`` renumbers them ``0..C-1`` in increasing order (``label_map[new]`` is
    the original label).

    A file cut short (a record running past its end, or an index offset past it) is an error
    naming the file and the first such record, whatever ``on_corrupt`` says; with
    ``accept_truncated=True`` the readable part is used and :attr:`truncated` holds
    ``(images dropped, identities dropped, images in the index)``. ``on_corrupt="skip"`` (default) leaves out records whose header cannot
    be read at construction (keys in :attr:`dropped`, one warning) and replaces undecodable
    images while iterating (see :mod:`ekd.data.robust`); ``"error"`` raises instead.

    ``read_uint8(i)`` is the decoded image resized to ``input_size`` (``uint8 [3, H, W]``,
    never mirrored); ``dataset[i][0]`` is exactly its normalisation. Pickling (DataLoader
    workers) sends the path and shared-memory handles only; each process maps the file itself.
    """

    _shared = ("image_keys", "labels", "_ranges")

    def __init__(self, path: str | os.PathLike[str], input_size: int = 112, train: bool = False,
                 color: str = "rgb", generator: torch.Generator | None = None,
                 on_corrupt: str = "skip", remap_labels: bool = False,
                 accept_truncated: bool = False) -> None:
        if color not in COLOURS:
            raise DataError(f"colour order must be one of {COLOURS}, got {color!r}")
        check_on_corrupt(on_corrupt)
        self.reader = rd = RecordIOReader(path)
        self.input_size, self.train, self.color, self.generator = int(input_size), train, color, generator
        self.header0: tuple[int, int] | None = None
        ranges: list[tuple[int, int, int]] = []
        self.dropped: list[int] = []
        first = rd.read_header(0) if rd.offset(0) is not None else None
        if first is not None and first.flag >= 2:
            a, b = (float(v) for v in first.label[:2])
            if not (math.isfinite(a) and math.isfinite(b) and 1 <= a <= b <= len(rd) + 1):
                raise DataError(f"{rd.path}: header record 0 announces images 1..{a} and identities "
                                f"{a}..{b}, impossible for an index of {len(rd)} records")
            a, b = int(a), int(b)
            self.header0 = (a, b)
            self.image_keys = np.arange(1, a, dtype=np.int64)
            for k in range(a, b):
                try:
                    h = rd.read_header(k)
                    if h.flag < 2 or not np.isfinite(h.label[:2]).all():
                        raise DataError(f"{rd.path}: identity record {k} has no [start, end) label")
                except DataError:
                    if on_corrupt == "error":
                        raise
                    continue  # informational only; training does not use the ranges
                ranges.append((k, int(h.label[0]), int(h.label[1])))
        else:
            self.image_keys = rd.keys.copy()
        if self.image_keys.size == 0:
            raise DataError(f"{rd.path}: no image records")
        self.truncated: tuple[int, int, int] | None = None
        indexed = int(self.image_keys.size)
        cut = self._cut_records()
        if cut.any():
            first = int(np.flatnonzero(cut)[0])
            key, n_cut = int(self.image_keys[first]), int(cut.sum())
            if not accept_truncated:
                raise DataError(f"{rd.path}: the file is cut short: image record {key} (byte offset "
                                f"{rd.offset(key)}) runs past its end ({os.path.getsize(rd.path)} "
                                f"bytes); {n_cut} of {indexed} image records are past it. Copy the "
                                "file again, or accept the readable part with data.accept_truncated=true")
            self.image_keys = self.image_keys[~cut]
            if self.image_keys.size == 0:
                raise DataError(f"{rd.path}: the file is cut short before its first image record")
        self.labels, bad = self._read_labels(on_corrupt == "error")
        if bad:
            keep = np.ones(self.image_keys.size, bool)
            keep[[i for i, _ in bad]] = False
            self.dropped = self.image_keys[~keep].tolist()
            self.image_keys, self.labels = self.image_keys[keep], self.labels[keep]
            warnings.warn(f"{rd.path}: left out {len(bad)} unreadable record(s) (on_corrupt='skip'), "
                          f"e.g. {bad[0][1]}", CorruptSampleWarning, stacklevel=2)
            if self.image_keys.size == 0:
                raise DataError(f"{rd.path}: no readable image records")
        present = np.unique(self.labels)
        self.label_map: np.ndarray | None = None
        if remap_labels:
            self.label_map, self.labels = present, np.searchsorted(present, self.labels)
        elif present.size != int(present[-1]) + 1:
            prev = np.concatenate([[-1], present[:-1]])  # O(n) in the labels, not in max(label)
            gaps = [g for i in np.flatnonzero(present - prev > 1)[:5].tolist()
                    for g in range(int(prev[i]) + 1, min(int(present[i]), int(prev[i]) + 6))][:5]
            warnings.warn(f"{rd.path}: labels are not contiguous: {int(present[-1]) + 1 - present.size} "
                          f"of 0..{present[-1]} unused (e.g. {', '.join(map(str, gaps))}); kept as they are "
                          "(unused classes in the head); remap_labels=True renumbers them 0..C-1",
                          stacklevel=2)
        prop = property_path(rd.path)
        if not prop.is_file():  # sets packed before <name>.property: the folder's property
            prop = rd.path.parent / "property"
        declared = 0
        if prop.is_file() and not remap_labels:
            try:
                declared = int(prop.read_text().split(",")[0])
            except (ValueError, UnicodeDecodeError):
                raise DataError(f"{prop}: expected 'num_classes,height,width'") from None
        self._num_classes = max(declared, int(self.labels.max()) + 1)
        if cut.any():
            identities = max(declared, len(ranges)) or self._num_classes
            self.truncated = (indexed - len(self) - len(self.dropped), identities - int(present.size), indexed)
            warnings.warn(f"{rd.path}: the file is cut short; using the readable part "
                          f"(data.accept_truncated): {self.truncated[0]} of {indexed} images and "
                          f"{self.truncated[1]} identities dropped", stacklevel=2)
        self._ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 3)  # key, start, end
        self._init_skip(on_corrupt)
        self._share_arrays()

    def _cut_records(self) -> np.ndarray:
        """Which image keys' records run past the end of the file (their first part's header
        or data; a continuation part past the end is found when the record is read)."""
        rd, keys = self.reader, self.image_keys
        at = np.clip(np.searchsorted(rd.keys, keys, sorter=rd._sorted), 0, rd.keys.size - 1)
        idx = rd._sorted[at]
        offs = np.where(rd.keys[idx] == keys, rd.offsets[idx], -1)
        buf = np.frombuffer(rd._map(), dtype=np.uint8)
        inside = (offs >= 0) & (offs <= buf.size - 8)
        lrec = np.zeros(offs.size, np.int64)
        lrec[inside] = buf[offs[inside][:, None] + np.arange(4, 8)].copy().view("<u4").reshape(-1)
        return (offs > buf.size - 8) | (inside & (offs + 8 + (lrec & _LEN_MASK) > buf.size))

    def _read_labels(self, strict: bool, block: int = 1 << 20) -> tuple[np.ndarray, list]:
        """Image labels, parsed from the mapped file in blocks with numpy (fast path: magic,
        flag 0/1 and the header in the first part); other records go through :func:`unpack`.
        Unreadable records raise (``strict``) or are returned as ``(position, message)``."""
        rd, keys = self.reader, self.image_keys
        at = np.clip(np.searchsorted(rd.keys, keys, sorter=rd._sorted), 0, rd.keys.size - 1)
        idx = rd._sorted[at]
        offs = np.where(rd.keys[idx] == keys, rd.offsets[idx], -1)
        buf, labels = np.frombuffer(rd._map(), dtype=np.uint8), np.zeros(keys.size, np.int64)
        bad: list[tuple[int, str]] = []
        for a in range(0, keys.size, block):
            o = offs[a:a + block]
            ok = (o >= 0) & (o <= buf.size - 36)  # (o + 36 could overflow int64)
            raw = np.zeros((o.size, 36), np.uint8)
            raw[ok] = buf[o[ok][:, None] + np.arange(36)]
            words = raw[:, :12].copy().view("<u4")  # magic, lrec, header flag
            vals = raw[:, 12:36].copy().view("<f4")  # header label, id, id2, label[0] of arrays
            flag, length = words[:, 2], words[:, 1] & _LEN_MASK
            lab = np.where(flag == 0, vals[:, 0], vals[:, 5])
            ok &= (words[:, 0] == MAGIC) & (words[:, 1] >> 29 <= 1) & np.isfinite(lab)
            ok &= (length >= 24 + 4 * np.minimum(flag, 1)) & (lab >= 0) & (lab < _MAX_LABEL)
            labels[a:a + block] = np.where(ok, lab, 0).astype(np.int64)
            for i in np.flatnonzero(~ok).tolist():
                try:
                    labels[a + i] = self._slow_label(int(keys[a + i]), int(o[i]))
                except DataError as exc:
                    if strict:
                        raise
                    bad.append((a + i, str(exc)))
        return labels, bad

    def _slow_label(self, key: int, offset: int) -> int:
        rd = self.reader
        if offset < 0:
            raise DataError(f"{rd.idx_path}: image key {key} is not in the index")
        h = rd.read_header(key)
        value = float(h.label if h.flag == 0 else h.label[0])
        if not math.isfinite(value) or not 0 <= value < _MAX_LABEL:
            what = "negative identity label" if value < 0 else "impossible label"
            raise DataError(f"{rd.path}: record {key} (byte offset {offset}) has {what} {value}")
        return int(value)

    @property
    def identity_ranges(self) -> dict[int, tuple[int, int]]:
        """Identity record key -> ``[start, end)`` image key range (header record 0 sets)."""
        return {int(k): (int(a), int(b)) for k, a, b in self._ranges.tolist()}

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return int(self.image_keys.size)

    def pil_image(self, index: int) -> Image.Image:
        """Decoded RGB image of item ``index`` in the dataset's colour order."""
        key = int(self.image_keys[index])
        _, payload = unpack(self.reader.read(key), f"{self.reader.path} record {key}")
        return decode_pil(payload, self.color, f"{self.reader.path} record {key} "
                                               f"(byte offset {self.reader.offset(key)})")

    def image(self, index: int) -> np.ndarray:
        """Decoded ``uint8 [H, W, 3]`` image of item ``index`` in the dataset's colour order."""
        return np.asarray(self.pil_image(index))

    def read_uint8(self, index: int) -> torch.Tensor:
        """``uint8 [3, input_size, input_size]`` of item ``index`` before normalisation (an
        unreadable item is replaced as in ``__getitem__``, by ``on_corrupt``)."""
        return to_uint8(self._fetch(index)[1], self.input_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        flip = self.train and random_flip(self.generator)
        index, img = self._fetch(index)
        return to_tensor(img, self.input_size, flip), int(self.labels[index]), index

    _load = pil_image

    def __repr__(self) -> str:
        return (f"RecordDataset({str(self.reader.path)!r}, images={len(self)}, "
                f"classes={self.num_classes}, header0={self.header0}, color={self.color!r})")
