"""Image loading and tensor conversion (numpy only, no torchvision).

Images are normalised as InsightFace does: ``(x / 255 - 0.5) / 0.5``, i.e. pixel values in
``[-1, 1]``. Random horizontal flips use torch's RNG (optionally an explicit
:class:`torch.Generator`), so ``torch.manual_seed`` makes them reproducible and every
``DataLoader`` worker, which torch seeds differently, draws its own flips.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ekd.errors import DataError

__all__ = ["COLOURS", "decode_image", "decode_pil", "load_image", "normalize", "to_tensor", "to_uint8",
           "random_flip", "denormalize"]

#: Channel orders accepted by the decoders (``bgr`` swaps R and B after decoding).
COLOURS = ("rgb", "bgr")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file and return it in RGB mode.

    Raises :class:`DataError` naming the file if it is missing or cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "RGB":
                return img.copy()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grayscale: rescale to 8 bits before converting.
                arr = np.asarray(img, dtype=np.float64)
                peak = max(float(arr.max()), 1.0)
                scale = 255.0 / (65535.0 if peak > 255 else 255.0)
                gray = np.clip(arr * scale, 0, 255).astype(np.uint8)
                return Image.fromarray(gray, mode="L").convert("RGB")
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure on a user file is bad data
        raise DataError(f"cannot read image file {path}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """Why a decoder failed, for messages (Pillow raises many unrelated types on bad input)."""
    if isinstance(exc, (UnidentifiedImageError, OSError, SyntaxError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def decode_pil(data: bytes, color: str = "rgb", where: str = "image") -> Image.Image:
    """Encoded image bytes -> RGB PIL image (``color="bgr"``: channels swapped).

    Any decoder failure (not an image, truncated, a decompression bomb, ...) is a
    :class:`DataError` naming ``where``.
    """
    if color not in COLOURS:
        raise DataError(f"colour order must be one of {COLOURS}, got {color!r}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - see load_image
        raise DataError(f"{where}: cannot decode the image ({_reason(exc)})") from None
    return Image.merge("RGB", img.split()[::-1]) if color == "bgr" else img


def decode_image(data: bytes, color: str = "rgb", where: str = "image") -> np.ndarray:
    """Encoded image bytes -> ``uint8 [H, W, 3]`` in RGB (``color="bgr"``: channels swapped)."""
    return np.asarray(decode_pil(data, color, where))


def random_flip(generator: torch.Generator | None = None) -> bool:
    """Return True with probability 0.5, drawn from torch's RNG (or ``generator``)."""
    return bool(torch.rand((), generator=generator).item() < 0.5)


def to_uint8(img: Image.Image, input_size: int) -> torch.Tensor:
    """An RGB image resized (bilinear, only when its size differs) to ``input_size`` as a
    ``uint8 [3, input_size, input_size]`` tensor: the decoded sample before normalisation."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.BILINEAR)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def normalize(images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` -> float32 ``(x - 127.5) / 127.5`` in ``[-1, 1]`` (InsightFace);
    ``flip`` mirrors horizontally."""
    out = (images.float() - 127.5) / 127.5
    return out.flip(-1) if flip else out


def to_tensor(img: Image.Image, input_size: int, flip: bool = False) -> torch.Tensor:
    """Convert an RGB image to a normalised float tensor of shape ``[3, input_size, input_size]``:
    :func:`normalize` of :func:`to_uint8` (``flip`` mirrors it horizontally)."""
    return normalize(to_uint8(img, input_size), flip).contiguous()


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """Invert :func:`to_tensor`: ``[3, H, W]`` in ``[-1, 1]`` to a ``uint8`` ``[H, W, 3]`` array."""
    arr = tensor.detach().cpu().float().numpy().transpose(1, 2, 0)
    return np.clip(np.rint(arr * 127.5 + 127.5), 0, 255).astype(np.uint8)
