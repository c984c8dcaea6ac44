"""InsightFace / MXNet RecordIO (``.rec`` + ``.idx`` + ``property``) without mxnet.

Format (dmlc-core ``include/dmlc/recordio.h`` / ``src/recordio.cc``, MXNet ``recordio.py``):

* A ``.rec`` file is a sequence of 4-byte aligned parts, all integers little-endian:
  ``uint32 magic = 0xCED7230A``, ``uint32 lrec`` with ``cflag = lrec >> 29`` and
  ``length = lrec & (2**29 - 1)``, then ``length`` data bytes zero-padded to a multiple of 4.
  ``cflag`` 0 is a whole record. The writer splits a record wherever the magic number occurs at
  a 4-byte aligned position of the data: the magic is removed there, the first part gets flag 1,
  middle parts flag 2, the last part flag 3; the reader joins the parts re-inserting the magic.
* The ``.idx`` file has one line ``key<TAB>byte offset`` per record (random access).
* A record's data (MXNet ``recordio.pack``) starts with the 24-byte header ``IfQQ``:
  ``uint32 flag, float32 label, uint64 id, uint64 id2``. ``flag > 0`` means the label is an
  array of ``flag`` float32 values stored right after the header (the header's own label is then
  0); the encoded image (JPEG/PNG bytes) follows.
* InsightFace training sets (MS1MV2/MS1MV3/Glint360K) begin with record 0, a header with
  ``flag = 2`` and ``label = [a, b]``: images are keys ``1 .. a-1``, identity records are keys
  ``a .. b-1`` whose labels ``[start, end)`` give each identity's image key range. Files without
  it (``flag == 0`` in record 0) use every key of the ``.idx`` as an image. An image's identity is
  its scalar label, or ``label[0]`` for array labels (as ``arcface_torch``'s ``MXFaceDataset``).
  ``property`` holds ``num_classes,height,width``.

Images are decoded with PIL and returned in RGB order, the order ``mx.image.imdecode`` gives
(``color="rgb"``). Some sets were encoded from BGR arrays; ``color="bgr"`` swaps the channels.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ekd.data.folder import ImageFolderDataset
from ekd.data.transforms import random_flip, to_tensor
from ekd.errors import DataError

__all__ = ["MAGIC", "IRHeader", "pack", "unpack", "encode_record", "RecordIOReader",
           "RecordIOWriter", "RecordDataset", "decode_image", "decode_pil", "pack_folder", "rec_paths"]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1
COLOURS = ("rgb", "bgr")


@dataclass
class IRHeader:
    """MXNet's ``IRHeader``: ``flag`` (array-label length or 0), ``label``, ``id``, ``id2``."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Record data = ``IfQQ`` header (+ float32 label array when it is an array) + payload."""
    label = header.label
    if isinstance(label, (int, float, np.number)):
        return _HEADER.pack(0, float(label), header.id, header.id2) + bytes(payload)
    arr = np.asarray(label, dtype="<f4").reshape(-1)
    return _HEADER.pack(arr.size, 0.0, header.id, header.id2) + arr.tobytes() + bytes(payload)


def unpack(data: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split record data into its header and payload; ``where`` names it in errors."""
    if len(data) < _HEADER.size:
        raise DataError(f"{where}: {len(data)} bytes, shorter than the 24-byte IfQQ header")
    flag, label, rid, rid2 = _HEADER.unpack_from(data, 0)
    if flag == 0:
        return IRHeader(0, float(label), rid, rid2), bytes(data[_HEADER.size:])
    end = _HEADER.size + 4 * flag
    if len(data) < end:
        raise DataError(f"{where}: header announces {flag} float32 labels but the record has "
                        f"only {len(data)} bytes")
    arr = np.frombuffer(data, dtype="<f4", count=flag, offset=_HEADER.size).astype(np.float32)
    return IRHeader(flag, arr, rid, rid2), bytes(data[end:])


def encode_record(data: bytes) -> bytes:
    """Frame ``data`` as dmlc RecordIO parts (magic occurrences split it; flags 0/1/2/3)."""
    data = bytes(data)
    if len(data) >= 1 << 29:
        raise DataError(f"RecordIO records must be < 2**29 bytes, got {len(data)}")
    out = bytearray()
    start = 0
    for i in range(0, len(data) - len(data) % 4, 4):
        if data[i:i + 4] == _MAGIC_BYTES:
            out += _PART.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (i - start))
            out += data[start:i]
            start = i + 4
    out += _PART.pack(MAGIC, ((3 if start else 0) << 29) | (len(data) - start)) + data[start:]
    out += b"\0" * (-len(data) % 4)  # every middle part is a multiple of 4 long
    return bytes(out)


def rec_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(rec, idx)`` for a ``.rec`` file, a prefix, or a folder holding ``train.rec``."""
    p = Path(path)
    if p.is_dir():
        p = p / "train.rec"
    if p.suffix in (".rec", ".idx"):
        return p.with_suffix(".rec"), p.with_suffix(".idx")
    return Path(str(p) + ".rec"), Path(str(p) + ".idx")


def _read_idx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``key<TAB>offset`` lines -> ``(keys, offsets)``, parsed in C; errors name the line."""
    try:
        text = path.read_text(encoding="ascii")
        vals = np.fromstring(text, dtype=np.int64, sep=" ") if text.strip() else np.empty(0, np.int64)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text .idx file") from None
    except ValueError:  # numpy >= 2 refuses unparsable text: find the line below
        vals = np.empty(1, np.int64)
    lines = text.splitlines()
    if vals.size == 2 * sum(1 for ln in lines if ln.strip()) and (vals[1::2] >= 0).all():
        return vals[0::2].copy(), vals[1::2].copy()
    for no, line in enumerate(lines, start=1):
        f = line.split()
        if f and (len(f) != 2 or not f[0].lstrip("-").isdigit() or not f[1].isdigit()):
            raise DataError(f"{path}:{no}: expected 'key<TAB>offset', got {line!r}")
    raise DataError(f"{path}: unreadable index")


class RecordIOReader:
    """Random access to a ``.rec`` through its ``.idx`` (or a sequential scan when absent).

    The file is memory-mapped on first use in each process, so the reader can be pickled into
    DataLoader workers. ``read(key)`` returns the record data with continuation parts joined.
    """

    def __init__(self, path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.path, default_idx = rec_paths(path)
        if not self.path.is_file():
            raise DataError(f"RecordIO file not found: {self.path}")
        self.idx_path = Path(idx_path) if idx_path is not None else default_idx
        self._mm: mmap.mmap | None = None
        self._pid = -1
        if self.idx_path.is_file():
            self.keys, self.offsets = _read_idx(self.idx_path)
        else:
            offs = [off for off, _ in self.scan()]
            self.keys, self.offsets = np.arange(len(offs), dtype=np.int64), np.asarray(offs, np.int64)
        self._dense = bool(np.array_equal(self.keys, np.arange(self.keys.size)))  # InsightFace
        self._sorted = np.argsort(self.keys, kind="stable")

    def _map(self) -> mmap.mmap:
        if self._mm is None or self._pid != os.getpid():
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    raise DataError(f"{self.path}: empty RecordIO file")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        return self._mm

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return len(self.keys)

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """Record data starting at byte ``offset`` and the offset of the next record."""
        mm = self._map()
        size, pos, parts = len(mm), int(offset), []
        while True:
            if pos + 8 > size:
                raise DataError(f"{self.path}: truncated record header at byte offset {pos} "
                                f"(file size {size})")
            magic, lrec = _PART.unpack_from(mm, pos)
            if magic != MAGIC:
                raise DataError(f"{self.path}: bad magic 0x{magic:08x} at byte offset {pos} "
                                f"(expected 0x{MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if cflag not in ((0, 1) if not parts else (2, 3)):
                state = "a record start" if not parts else "a continuation part"
                raise DataError(f"{self.path}: flag {cflag} at byte offset {pos} is invalid for "
                                f"{state}")
            if pos + 8 + length > size:
                raise DataError(f"{self.path}: record at byte offset {pos} announces {length} "
                                f"bytes but the file ends at {size}")
            parts.append(mm[pos + 8:pos + 8 + length])
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return b"".join(parts), pos
            parts.append(_MAGIC_BYTES)

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Every record in file order as ``(offset, data)``."""
        pos, size = 0, len(self._map())
        while pos < size:
            data, nxt = self.read_at(pos)
            yield pos, data
            pos = nxt

    def offset(self, key: int) -> int | None:
        """Byte offset of the record with ``.idx`` key ``key`` (``None`` if absent)."""
        key = int(key)
        if self._dense:
            return int(self.offsets[key]) if 0 <= key < self.offsets.size else None
        i = int(np.searchsorted(self.keys, key, sorter=self._sorted))
        if i < self.keys.size and self.keys[self._sorted[i]] == key:
            return int(self.offsets[self._sorted[i]])
        return None

    def read(self, key: int) -> bytes:
        """Data of the record with ``.idx`` key ``key``."""
        off = self.offset(key)
        if off is None:
            raise DataError(f"{self.idx_path}: no record with key {key}")
        return self.read_at(off)[0]

    def read_header(self, key: int) -> IRHeader:
        return unpack(self.read(key), f"{self.path} record {key}")[0]


class RecordIOWriter:
    """Write records and the ``.idx`` (``key<TAB>offset``), as MXNet's ``MXIndexedRecordIO``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path, self.idx_path = rec_paths(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rec = open(self.path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii")

    def write(self, key: int, data: bytes) -> None:
        self._idx.write(f"{int(key)}\t{self._rec.tell()}\n")
        self._rec.write(encode_record(data))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_pil(data: bytes, color: str = "rgb", where: str = "image") -> Image.Image:
    """Encoded image bytes -> RGB PIL image (``color="bgr"``: channels swapped)."""
    if color not in COLOURS:
        raise DataError(f"colour order must be one of {COLOURS}, got {color!r}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: cannot decode the image ({exc})") from None
    return Image.merge("RGB", img.split()[::-1]) if color == "bgr" else img


def decode_image(data: bytes, color: str = "rgb", where: str = "image") -> np.ndarray:
    """Encoded image bytes -> ``uint8 [H, W, 3]`` in RGB (``color="bgr"``: channels swapped)."""
    return np.asarray(decode_pil(data, color, where))


class RecordDataset(Dataset):
    """An InsightFace ``.rec`` as a dataset; items ``(image, label, index)`` like
    :class:`~ekd.data.folder.ImageFolderDataset`.

    ``labels`` (int64) holds each image's header label (``label[0]`` for array labels), read
    once at construction; ``num_classes`` is the ``property`` file's count (at least
    ``max(label) + 1``). ``identity_ranges`` maps identity record keys to ``[start, end)``
    image key ranges when the file has InsightFace's header record 0.
    """

    def __init__(self, path: str | os.PathLike[str], input_size: int = 112, train: bool = False,
                 color: str = "rgb", generator: torch.Generator | None = None) -> None:
        if color not in COLOURS:
            raise DataError(f"colour order must be one of {COLOURS}, got {color!r}")
        self.reader = RecordIOReader(path)
        self.input_size, self.train, self.color, self.generator = int(input_size), train, color, generator
        self.header0: tuple[int, int] | None = None
        self.identity_ranges: dict[int, tuple[int, int]] = {}
        first = self.reader.read_header(0) if self.reader.offset(0) is not None else None
        if first is not None and first.flag > 0:
            a, b = int(first.label[0]), int(first.label[1])
            self.header0 = (a, b)
            self.image_keys = np.arange(1, a, dtype=np.int64)
            for k in range(a, b):
                h = self.reader.read_header(k)
                if h.flag < 2:
                    raise DataError(f"{self.reader.path}: identity record {k} has no [start, end) label")
                self.identity_ranges[k] = (int(h.label[0]), int(h.label[1]))
        else:
            self.image_keys = self.reader.keys.copy()
        if self.image_keys.size == 0:
            raise DataError(f"{self.reader.path}: no image records")
        self.labels = self._read_labels()
        if self.labels.min() < 0:
            raise DataError(f"{self.reader.path}: negative identity label {self.labels.min()}")
        prop = self.reader.path.parent / "property"
        declared = 0
        if prop.is_file():
            try:
                declared = int(prop.read_text().split(",")[0])
            except ValueError:
                raise DataError(f"{prop}: expected 'num_classes,height,width'") from None
        self._num_classes = max(declared, int(self.labels.max()) + 1)

    def _read_labels(self, block: int = 1 << 20) -> np.ndarray:
        """Image labels, parsed from the mapped file in blocks with numpy (fast path: magic,
        flag 0/1 and the header in the first part); other records go through :func:`unpack`."""
        rd, keys = self.reader, self.image_keys
        at = np.clip(np.searchsorted(rd.keys, keys, sorter=rd._sorted), 0, rd.keys.size - 1)
        idx = rd._sorted[at]
        offs = np.where(rd.keys[idx] == keys, rd.offsets[idx], -1)
        buf, labels = np.frombuffer(rd._map(), dtype=np.uint8), np.empty(keys.size, np.int64)
        for a in range(0, keys.size, block):
            o = offs[a:a + block]
            ok = (o >= 0) & (o + 36 <= buf.size)
            raw = buf[np.where(ok, o, 0)[:, None] + np.arange(36)]
            words = raw[:, :12].copy().view("<u4")  # magic, lrec, header flag
            vals = raw[:, 12:36].copy().view("<f4")  # header label, id, id2, label[0] of arrays
            flag, length = words[:, 2], words[:, 1] & _LEN_MASK
            lab = np.where(flag == 0, vals[:, 0], vals[:, 5])
            ok &= (words[:, 0] == MAGIC) & (words[:, 1] >> 29 <= 1) & np.isfinite(lab)
            ok &= length >= 24 + 4 * np.minimum(flag, 1)
            labels[a:a + block] = np.where(ok, lab, 0).astype(np.int64)
            for i in np.flatnonzero(~ok):
                if o[i] < 0:
                    raise DataError(f"{rd.idx_path}: image key {keys[a + i]} is not in the index")
                h = rd.read_header(int(keys[a + i]))
                value = float(h.label if h.flag == 0 else h.label[0])
                if not math.isfinite(value):
                    raise DataError(f"{rd.path}: record {keys[a + i]} has label {value}")
                labels[a + i] = int(value)
        return labels

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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        flip = self.train and random_flip(self.generator)
        img = self.pil_image(index)
        return to_tensor(img, self.input_size, flip=flip), int(self.labels[index]), index

    def __repr__(self) -> str:
        return (f"RecordDataset({str(self.reader.path)!r}, images={len(self)}, "
                f"classes={self.num_classes}, header0={self.header0}, color={self.color!r})")


def pack_folder(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict:
    """Write ``out.rec/.idx`` and ``property`` from ``folder/<identity>/<image>`` (InsightFace
    layout: header record 0, images ``1..N`` with scalar labels, then one ``[start, end)``
    record per identity). Image files are stored byte for byte (no re-encoding).
    """
    ds = ImageFolderDataset(folder)
    rec, _ = rec_paths(out)
    n, c = len(ds.samples), ds.num_classes
    if n + c + 1 > 1 << 24:
        raise DataError(f"{folder}: {n} images + {c} identities exceed the float32 labels' 2**24")
    ranges: list[list[int]] = [[0, 0] for _ in range(c)]
    with RecordIOWriter(rec) as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + c], np.float32)), b""))
        for key, (path, label) in enumerate(ds.samples, start=1):
            data = Path(path).read_bytes()
            if key == 1:
                size = decode_image(data, where=path).shape[:2]
            if ranges[label][0] == 0:
                ranges[label][0] = key
            ranges[label][1] = key + 1
            w.write(key, pack(IRHeader(0, float(label), key, 0), data))
        for i, (a, b) in enumerate(ranges):
            w.write(n + 1 + i, pack(IRHeader(2, np.array([a, b], np.float32), n + 1 + i), b""))
    (rec.parent / "property").write_text(f"{c},{size[0]},{size[1]}\n")
    return {"rec": str(rec), "images": n, "identities": c, "image_size": [int(size[0]), int(size[1])]}
