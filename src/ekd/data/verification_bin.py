"""InsightFace verification ``.bin`` sets (``lfw``, ``cfp_fp``, ``cfp_ff``, ``agedb_30``, ``calfw``,
``cplfw``, ``vgg2_fp`` ...) without mxnet.

Format (InsightFace ``recognition/arcface_torch/eval/verification.py`` ``load_bin`` and
``recognition/_datasets_/lfw2pack.py``): a pickle of ``(bins, issame_list)`` where ``bins`` is a
list of ``2 * n`` encoded images (JPEG/PNG file bytes; Python 2 ``str``, read as ``bytes``) and
``issame_list`` a list of ``n`` booleans; pair ``i`` is ``bins[2 i]`` vs ``bins[2 i + 1]``.

The pickle is read by a restricted unpickler: only the opcodes for lists, tuples, bytes, strings,
numbers and booleans work, plus the two globals Python uses for ``bytes``/``bytearray`` in
protocol <= 2 pickles (``_codecs.encode``, ``bytearray``), each wrapped to accept only byte
strings. Any other global (``os.system``, ``builtins.eval`` ...) is refused before it could
be called, so a hostile file cannot run code.

Colour order: the images are decoded to RGB, as ``mx.image.imdecode`` does in InsightFace's
evaluation (``color="rgb"``, the default); ``color="bgr"`` swaps the channels for models
trained on BGR input (e.g. pipelines that decode with OpenCV).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ekd.data.recordio import COLOURS, decode_image, decode_pil
from ekd.data.transforms import to_tensor
from ekd.errors import DataError

__all__ = ["load_bin", "read_bin", "write_bin", "make_bin", "BinDataset"]


def _encode_latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` (how protocol-2 pickles spell ``bytes``)."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin1")


def _byte_string(kind: type) -> Any:
    def make(*args: Any) -> bytes | bytearray:
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return kind(args[0])
        if len(args) == 2 and isinstance(args[0], str):
            return kind(_encode_latin1(args[0], args[1]))
        raise pickle.UnpicklingError(f"{kind.__name__}() is only allowed from a byte string")
    return make


_ALLOWED: dict[tuple[str, str], Any] = {("_codecs", "encode"): _encode_latin1}
for _mod in ("builtins", "__builtin__"):
    _ALLOWED[(_mod, "bytes")] = _byte_string(bytes)
    _ALLOWED[(_mod, "bytearray")] = _byte_string(bytearray)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a "
                                         "verification .bin") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a verification .bin")


def load_bin(path: str | os.PathLike[str]) -> tuple[list[bytes], np.ndarray]:
    """Read a ``.bin`` safely: ``(encoded images, issame bool array)``; ``2 n`` images, ``n`` pairs."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"verification .bin not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"verification .bin is a directory: {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError, RecursionError, OverflowError, OSError) as exc:
        reason = str(exc) if isinstance(exc, pickle.UnpicklingError) else f"{type(exc).__name__}: {exc}"
        raise DataError(f"{path}: not a readable verification .bin: {reason}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got "
                        f"{type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise DataError(f"{path}: bins and issame_list must be lists")
    bad = next((i for i, b in enumerate(bins) if not isinstance(b, (bytes, bytearray))), None)
    if bad is not None:
        raise DataError(f"{path}: image {bad} is a {type(bins[bad]).__name__}, not encoded bytes")
    if not all(isinstance(v, (bool, int)) and v in (0, 1) for v in issame):
        raise DataError(f"{path}: issame_list must hold booleans")
    if len(bins) != 2 * len(issame) or not issame:
        raise DataError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected 2 per pair)")
    return [bytes(b) for b in bins], np.asarray(issame, dtype=bool)


class BinDataset(Dataset):
    """The images of a ``.bin`` in file order (pair ``i`` = items ``2i``, ``2i+1``), as tensors."""

    def __init__(self, source: str | os.PathLike[str] | tuple[list[bytes], np.ndarray],
                 input_size: int = 112, color: str = "rgb") -> None:
        if color not in COLOURS:
            raise DataError(f"colour order must be one of {COLOURS}, got {color!r}")
        if isinstance(source, tuple):
            self.path, (self.bins, self.issame) = "<memory>", source
        else:
            self.path = str(source)
            self.bins, self.issame = load_bin(source)
        self.input_size, self.color = int(input_size), color

    def __len__(self) -> int:
        return len(self.bins)

    def image(self, index: int) -> np.ndarray:
        return decode_image(self.bins[index], self.color, f"{self.path} image {index}")

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_tensor(decode_pil(self.bins[index], self.color, f"{self.path} image {index}"),
                         self.input_size)


def read_bin(path: str | os.PathLike[str], color: str = "rgb",
             image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All images of a ``.bin`` decoded: ``(uint8 [2n, H, W, 3], issame [n])``.

    Images whose size differs from ``image_size`` (default: the first image's) are resized
    bilinearly. Note the memory: LFW's 12,000 112x112 images take 450 MB.
    """
    ds = BinDataset(path, color=color)
    first = ds.image(0)
    h, w = (image_size, image_size) if image_size else first.shape[:2]
    out = np.empty((len(ds), h, w, 3), dtype=np.uint8)
    for i in range(len(ds)):
        img = first if i == 0 else ds.image(i)
        if img.shape[:2] != (h, w):
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
        out[i] = img
    return out, ds.issame


def write_bin(bins: list[bytes], issame: np.ndarray | list[bool], out: str | os.PathLike[str]) -> Path:
    """Pickle ``(bins, issame_list)`` as InsightFace does (highest protocol)."""
    issame_list = [bool(v) for v in np.asarray(issame).reshape(-1)]
    if len(bins) != 2 * len(issame_list) or not issame_list:
        raise DataError(f"{out}: {len(bins)} images for {len(issame_list)} pairs")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:
        pickle.dump(([bytes(b) for b in bins], issame_list), fh, protocol=pickle.HIGHEST_PROTOCOL)
    return out


def make_bin(pairs: Any, out: str | os.PathLike[str]) -> dict:
    """``.bin`` from a pair list (``paths1``, ``paths2``, ``issame``: what
    :func:`ekd.eval.protocols.read_pair_list` returns); image files stored byte for byte (as
    InsightFace's ``lfw2pack.py``), after checking that each one decodes."""
    cache: dict[str, bytes] = {}
    bins: list[bytes] = []
    for p1, p2 in zip(pairs.paths1, pairs.paths2):
        for p in (p1, p2):
            if p not in cache:
                cache[p] = Path(p).read_bytes()
                decode_image(cache[p], where=p)
            bins.append(cache[p])
    write_bin(bins, pairs.issame, out)
    return {"bin": str(out), "pairs": len(pairs), "genuine": int(pairs.issame.sum()),
            "images": len(bins)}
