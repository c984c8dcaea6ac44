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

import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekd.data.shared_arrays import SharedArrays
from ekd.data.transforms import COLOURS, decode_image, decode_pil
from ekd.errors import DataError

__all__ = ["COLOURS", "MAGIC", "IRHeader", "pack", "unpack", "encode_record", "RecordIOReader",
           "RecordIOWriter", "decode_image", "decode_pil", "rec_paths"]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


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


class RecordIOReader(SharedArrays):
    """Random access to a ``.rec`` through its ``.idx``; ``read(key)`` returns the record data
    with continuation parts joined.

    Without an ``.idx`` the ``.rec`` is indexed by one sequential scan (keys ``0..N-1`` in file
    order, as MXNet writes them), with a warning naming both files: slow for large sets.

    The file is memory-mapped on first use in each process and the key/offset arrays live in
    shared memory, so a DataLoader worker receives only the path and small handles
    (:mod:`ekd.data.shared_arrays`) and maps the file itself.
    """

    _shared = ("keys", "offsets", "_sorted")

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
            warnings.warn(f"{self.idx_path} not found: indexing {self.path} by a sequential scan "
                          "(slow for large files; keys are record positions 0..N-1)", stacklevel=2)
            offs = [off for off, _ in self.scan()]
            self.keys, self.offsets = np.arange(len(offs), dtype=np.int64), np.asarray(offs, np.int64)
        self._dense = bool(np.array_equal(self.keys, np.arange(self.keys.size)))  # InsightFace
        self._sorted = np.argsort(self.keys, kind="stable")
        self._share_arrays()

    def _map(self) -> mmap.mmap:
        if self._mm is None or self._pid != os.getpid():
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    raise DataError(f"{self.path}: empty RecordIO file")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        return self._mm

    def __getstate__(self) -> dict:
        state = super().__getstate__()
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
