"""Image loading and tensor conversion (numpy only, no torchvision).

Images are normalised as InsightFace does: ``(x / 255 - 0.5) / 0.5``, i.e. pixel values in
``[-1, 1]``, computed as ``(x - 127.5) / 127.5`` in float32 by :func:`normalize`, the one
normalisation of every path (per item in a dataset, per batch on the device for a preloaded
set: :mod:`ekd.data.resident`). Random horizontal flips use torch's RNG (optionally an explicit
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

__all__ = ["COLOURS", "decode_image", "decode_pil", "load_image", "to_tensor", "to_uint8", "normalize",
           "mirror_batch", "random_flip", "denormalize"]

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
    """An RGB image as ``uint8 [3, input_size, input_size]``, resized (bilinear) only when its
    size differs from ``input_size``; never mirrored."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


_LUT: dict[torch.device, torch.Tensor] = {}


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels (any shape, any device) -> float32 ``(x - 127.5) / 127.5`` in ``[-1, 1]``.

    On the CPU this is the arithmetic itself. On other devices it is a lookup in the 256 values
    computed once on the CPU, because e.g. CUDA divides by a scalar as a multiplication by its
    reciprocal, which can differ in the last bit: every device thus gives the CPU's bits.
    """
    if pixels.dtype != torch.uint8:
        raise DataError(f"normalize expects uint8 pixels, got {pixels.dtype}")
    if pixels.device.type == "cpu":
        return (pixels.float() - 127.5) / 127.5
    lut = _LUT.get(pixels.device)
    if lut is None:
        lut = _LUT[pixels.device] = normalize(torch.arange(256, dtype=torch.uint8)).to(pixels.device)
    return lut[pixels.long()]


def to_tensor(img: Image.Image, input_size: int, flip: bool = False) -> torch.Tensor:
    """Convert an RGB image to a normalised float tensor of shape ``[3, input_size, input_size]``.

    ``normalize(to_uint8(img, input_size))``, mirrored horizontally when ``flip``.
    """
    pixels = to_uint8(img, input_size)
    return normalize(pixels.flip(-1) if flip else pixels)


def mirror_batch(images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each image of an ``[N, C, H, W]`` batch with p=0.5 drawn from a CPU generator
    seeded with ``seed`` (on the batch's device); returns the batch and the CPU flip flags."""
    flipped = torch.rand(images.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    images = torch.where(flipped.to(images.device)[:, None, None, None], images.flip(-1), images)
    return images, flipped


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """Invert :func:`to_tensor`: ``[3, H, W]`` in ``[-1, 1]`` to a ``uint8`` ``[H, W, 3]`` array."""
    arr = tensor.detach().cpu().float().numpy().transpose(1, 2, 0)
    return np.clip(np.rint(arr * 127.5 + 127.5), 0, 255).astype(np.uint8)
