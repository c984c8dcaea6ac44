"""Embed aligned face images with a PyTorch checkpoint or an ONNX model, and pick thresholds.

:class:`EmbeddingModel` hides which of the two runs: both preprocess as the model expects (for an
ONNX file, as its metadata says), sum the embeddings of each image and its horizontal mirror and
L2-normalise, exactly as ``ekd eval`` does, so scores and ``ekd eval`` thresholds agree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ekd.data.folder import IMAGE_EXTENSIONS
from ekd.data.transforms import load_image, to_tensor
from ekd.errors import CheckpointError, ConfigError, DataError
from ekd.eval.metrics import l2_normalize

__all__ = ["EmbeddingModel", "OnnxBackbone", "OnnxEmbeddingModel", "TorchEmbeddingModel", "collect_images",
           "load_embedding_model", "preprocess", "read_threshold", "save_embeddings"]

_DEFAULT_MEAN = (0.5, 0.5, 0.5)
log = logging.getLogger("ekd.embed")


def preprocess(img: Image.Image, input_size: int, mean: tuple[float, ...] = _DEFAULT_MEAN,
               std: tuple[float, ...] = _DEFAULT_MEAN, color_order: str = "RGB") -> np.ndarray:
    """RGB PIL image -> float32 ``[3, S, S]``: bilinear resize if needed, ``(x/255 - mean)/std``.

    With the defaults this is :func:`ekd.data.transforms.to_tensor`, bit for bit.
    """
    if tuple(mean) == _DEFAULT_MEAN and tuple(std) == _DEFAULT_MEAN and color_order == "RGB":
        return to_tensor(img, input_size).numpy()
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if color_order == "BGR":
        arr = arr[:, :, ::-1]
    m = np.asarray(mean, dtype=np.float32) * 255.0
    s = np.asarray(std, dtype=np.float32) * 255.0
    return np.ascontiguousarray(((arr - m) / s).transpose(2, 0, 1))


class _Images(Dataset):
    """Image files -> preprocessed arrays (picklable for DataLoader workers)."""

    def __init__(self, paths: list[str], size: int, mean: tuple, std: tuple, order: str) -> None:
        self.paths, self.size, self.mean, self.std, self.order = paths, size, mean, std, order

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        img = load_image(self.paths[i])
        return preprocess(img, self.size, self.mean, self.std, self.order), img.size


def _bar_size() -> dict[str, int]:
    """``{}`` (tqdm measures the terminal) unless the terminal reports a zero size, as a fresh
    pseudo-terminal (some CI runners, ``script``) does: then 80x24, or tqdm draws nothing."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return {}
    return {} if size.columns and size.lines else {"ncols": size.columns or 80,
                                                    "nrows": size.lines or 24}


def _collate(items: list[tuple[np.ndarray, tuple[int, int]]]) -> tuple[np.ndarray, list]:
    return np.stack([a for a, _ in items]), [size for _, size in items]


def _warn_unaligned(paths: list[str], sizes: list[tuple[int, int]], side: int) -> None:
    """One warning when images are not the model's aligned input size (e.g. whole photos)."""
    odd = [(p, s) for p, s in zip(paths, sizes) if s != (side, side)]
    if odd:
        (first, (w, h)) = odd[0]
        log.warning("%d of %d image(s) are not %d×%d (first: %s is %d×%d); ekd expects aligned "
                    "%d×%d crops (docs/deploy.md): other images are resized, not aligned, and "
                    "their embeddings are unreliable", len(odd), len(paths), side, side, first,
                    w, h, side, side)


class EmbeddingModel(ABC):
    """A face model that maps aligned face images to L2-normalised embeddings."""

    kind = ""
    source: str
    backbone: str
    input_size: int
    embedding_size: int
    mean: tuple[float, ...] = _DEFAULT_MEAN
    std: tuple[float, ...] = _DEFAULT_MEAN
    color_order: str = "RGB"

    @abstractmethod
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw (un-normalised) float32 embeddings ``[B, D]`` of a preprocessed batch."""

    def embed_batch(self, batch: np.ndarray, flip: bool = True) -> np.ndarray:
        """``f(x) + f(mirror(x))`` (or ``f(x)``), L2-normalised, float32 ``[B, D]``."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        feat = self.forward(batch)
        if flip:
            feat = feat + self.forward(np.ascontiguousarray(batch[:, :, :, ::-1]))
        return l2_normalize(feat.astype(np.float32, copy=False)).astype(np.float32, copy=False)

    def embed_paths(self, paths: list[str], batch_size: int = 64, flip: bool = True,
                    progress: bool | None = None, workers: int = 0) -> np.ndarray:
        """Embeddings of image files in order; a tqdm bar on lists longer than one batch."""
        if not paths:
            raise DataError("no images to embed")
        folders = [p for p in paths if os.path.isdir(p)]
        if folders:
            raise DataError(f"{', '.join(map(str, folders[:5]))}: a folder where an image file is "
                            "expected (ekd embed takes folders; ekd verify takes two image files)")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{len(missing)} image file(s) not found: {', '.join(missing[:5])}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        data = _Images(list(paths), self.input_size, self.mean, self.std, self.color_order)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_collate)
        from tqdm.auto import tqdm

        # None: a bar for lists longer than one batch, on a terminal only.
        disable = (None if len(paths) > batch_size else True) if progress is None else not progress
        out, sizes = [], []
        with tqdm(total=len(paths), desc="embedding", unit="img", disable=disable,
                  leave=False, **_bar_size()) as bar:
            for batch, batch_sizes in loader:
                out.append(self.embed_batch(batch, flip))
                sizes.extend(batch_sizes)
                bar.update(len(batch))
        _warn_unaligned(list(paths), sizes, self.input_size)
        return np.concatenate(out)

    def describe(self) -> str:
        """One line: what runs and how it is fed."""
        return (f"{self.kind} {self.backbone or 'model'} ({self.source}): {self.input_size}px "
                f"{self.color_order}, embedding {self.embedding_size}")


class TorchEmbeddingModel(EmbeddingModel):
    """An ekd checkpoint or arcface_torch state_dict, run with PyTorch."""

    kind = "pytorch"

    def __init__(self, path: str | Path, backbone: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        from ekd.deploy.onnx_export import load_checkpoint
        from ekd.utils.device import resolve_device

        loaded = load_checkpoint(path, backbone)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = loaded.model.to(self.device).eval()
        self.source, self.backbone = str(path), loaded.backbone
        self.input_size, self.embedding_size = loaded.input_size, loaded.embedding_size

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Run the backbone under ``torch.inference_mode``."""
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            return self.model(x).float().cpu().numpy()


def _floats(text: str | None, key: str, path: Path) -> tuple[float, ...]:
    if text is None:
        return _DEFAULT_MEAN
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CheckpointError(f"{path}: metadata {key!r} is not a list of numbers: "
                              f"{text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise CheckpointError(f"{path}: metadata {key!r} needs 1 or 3 values, got {text!r}")
    return vals


class OnnxEmbeddingModel(EmbeddingModel):
    """An ONNX model run with onnxruntime, fed as its ``metadata_props`` say.

    Files without ekd metadata (e.g. InsightFace's) are fed RGB ``(x - 127.5) / 127.5`` at the
    size of their input shape (or ``input_size``).
    """

    kind = "onnx"

    def __init__(self, path: str | Path, input_size: int | None = None,
                 providers: list[str] | None = None, threads: int | None = None) -> None:
        from ekd.deploy.onnx_export import ort_session

        path = Path(path)
        self.session = ort_session(path, providers, threads)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        inp, outp = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, outp.name
        self.half_input = inp.type == "tensor(float16)"
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] != 3:
            raise CheckpointError(f"{path}: expected an image input [batch, 3, H, W], got {shape}")
        size = input_size or meta.get("input_size") or shape[2]
        try:
            self.input_size = int(size)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: the model records no input size (input shape {shape}); "
                              "give input_size explicitly") from None
        self.source, self.backbone = str(path), meta.get("backbone", "")
        self.mean = _floats(meta.get("mean"), "mean", path)
        self.std = _floats(meta.get("std"), "std", path)
        self.color_order = meta.get("color_order", "RGB").upper()
        if self.color_order not in ("RGB", "BGR"):
            raise CheckpointError(f"{path}: metadata color_order must be RGB or BGR, "
                                  f"got {self.color_order!r}")
        dim = outp.shape[-1] if outp.shape else None
        dim = meta.get("embedding_size") or (dim if isinstance(dim, int) else 0)
        self.embedding_size = int(dim)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Run the ONNX session."""
        feed = batch.astype(np.float16) if self.half_input else batch
        out = self.session.run([self.output_name], {self.input_name: feed})[0]
        return np.asarray(out, dtype=np.float32)


class OnnxBackbone(torch.nn.Module):
    """An ONNX model (fp32, fp16 or INT8) as a module on ekd's normalised RGB batches, so that
    ``ekd eval`` runs it exactly as it runs a checkpoint; inputs are converted to what its
    metadata asks for and run on the CPU with onnxruntime."""

    def __init__(self, model: OnnxEmbeddingModel) -> None:
        super().__init__()
        self.onnx = model
        meta = model.metadata
        self.parameter_count = int(meta["parameters"]) if "parameters" in meta else 0
        self.native = (tuple(model.mean) == _DEFAULT_MEAN and tuple(model.std) == _DEFAULT_MEAN
                       and model.color_order == "RGB")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw embeddings ``[B, D]`` of a batch normalised as ``(x / 255 - 0.5) / 0.5``."""
        batch = x.detach().float().cpu().numpy()
        if not self.native:
            pixels = batch * 127.5 + 127.5
            if self.onnx.color_order == "BGR":
                pixels = pixels[:, ::-1]
            mean = np.asarray(self.onnx.mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255.0
            std = np.asarray(self.onnx.std, dtype=np.float32).reshape(1, 3, 1, 1) * 255.0
            batch = ((pixels - mean) / std).astype(np.float32)
        return torch.from_numpy(self.onnx.forward(np.ascontiguousarray(batch)))


def load_embedding_model(path: str | Path, backbone: str | None = None,
                         device: str | torch.device = "cpu") -> EmbeddingModel:
    """An :class:`OnnxEmbeddingModel` for ``*.onnx`` files, else a :class:`TorchEmbeddingModel`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}"
                              + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix.lower() == ".onnx":
        return OnnxEmbeddingModel(path)
    return TorchEmbeddingModel(path, backbone=backbone, device=device)


def collect_images(items: list[str | Path]) -> list[str]:
    """Image files given directly, plus every image under given folders (recursively, sorted)."""
    paths: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {p}")
            paths.extend(found)
        elif p.is_file():
            paths.append(str(p))
        else:
            raise DataError(f"image file or folder not found: {p}")
    if not paths:
        raise DataError("no images given")
    return paths


def embeddings_file(out: str | Path) -> Path:
    """The ``.npy`` file :func:`save_embeddings` writes for ``out`` (``.npy`` appended if missing)."""
    out = Path(out)
    return out if out.suffix == ".npy" else out.with_name(out.name + ".npy")


def save_embeddings(out: str | Path, embeddings: np.ndarray, paths: list[str]) -> tuple[Path, Path]:
    """Write ``out`` (``.npy``, float32 ``[N, D]``) and ``<stem>.paths.txt`` (one path a line)."""
    out = embeddings_file(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.asarray(embeddings, dtype=np.float32))
    listing = out.with_suffix(".paths.txt")
    listing.write_text("".join(f"{p}\n" for p in paths))
    return out, listing


def fpr_key(fpr: float | str) -> str:
    """Canonical key of an FPR in ``metrics.json`` thresholds: ``1e-4`` for 0.0001 or "1e-04"."""
    try:
        value = float(fpr)
    except (TypeError, ValueError):
        raise ConfigError(f"FPR must be a number like 1e-4, got {fpr!r}") from None
    if not 0 < value < 1:
        raise ConfigError(f"FPR must be in (0, 1), got {fpr!r}")
    return f"{value:.0e}".replace("e-0", "e-")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_threshold(metrics: str | Path, fpr: float | str, set_name: str | None = None,
                   label: str | None = None) -> tuple[float, dict]:
    """The cosine threshold at ``fpr`` stored by ``ekd eval --out RUN`` in ``RUN/metrics.json``.

    Returns ``(threshold, info)`` with the chosen ``label``, ``set``, ``fpr`` and ``backbone``.
    ``set_name`` / ``label`` may be omitted when the file holds one set / one model.
    """
    path = Path(metrics)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise DataError(f"thresholds file not found: {path} (write one with ekd eval --out RUN)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and "sets" in data:  # a single model's results
        data = {"model": data}
    items = data.items() if isinstance(data, dict) else []
    runs = {k: v for k, v in items if isinstance(v, dict) and isinstance(v.get("sets"), dict)}
    if not runs:
        raise DataError(f"{path}: no evaluated models (expected ekd eval's metrics.json)")
    if label is None:
        if len(runs) > 1:
            raise ConfigError(f"{path} holds several models; choose one with --label: "
                              f"{', '.join(runs)}")
        label = next(iter(runs))
    if label not in runs:
        raise ConfigError(f"{path}: no model labelled {label!r}; labels: {', '.join(runs)}")
    run = runs[label]
    sets = {k: v for k, v in run["sets"].items() if isinstance(v, dict) and "thresholds" in v}
    if not sets:
        raise DataError(f"{path}: model {label!r} has no thresholds (evaluated by an older ekd, or "
                        "only on sets without scores); re-run ekd eval --out")
    if set_name is None:
        if len(sets) > 1:
            raise ConfigError(f"{path}: thresholds for several sets; choose one with --set: "
                              f"{', '.join(sets)}")
        set_name = next(iter(sets))
    if set_name not in sets:
        raise ConfigError(f"{path}: no thresholds for set {set_name!r}; sets with thresholds: "
                          f"{', '.join(sets)}")
    table, key = sets[set_name]["thresholds"], fpr_key(fpr)
    if key not in table:
        raise ConfigError(f"{path}: set {set_name!r} has no threshold at FPR {key}; "
                          f"available: {', '.join(table)}")
    value = table[key]
    usable = [k for k, v in table.items() if _is_number(k) and float(k) > float(key)
              and v is not None and math.isfinite(float(v))]
    advice = (f"use --fpr {min(usable, key=float)} (the next larger FPR stored)" if usable else
              f"no larger FPR has a usable stored threshold (ekd eval stores "
              f"{', '.join(table)})")
    if value is None:
        raise ConfigError(f"{path}: set {set_name!r} has too few different-identity pairs to set a "
                          f"threshold at FPR {key} (it needs at least "
                          f"{math.ceil(1 / float(key))}): {advice}; or evaluate on a bigger set, "
                          "or give --threshold")
    value = float(value)
    if math.isinf(value):
        raise ConfigError(f"{path}: set {set_name!r}: no threshold reaches FPR {key} (a "
                          "different-identity pair scores as high as the best genuine pair): "
                          f"{advice}; or give --threshold")
    info = {"label": label, "set": set_name, "fpr": key, "backbone": run.get("backbone"),
            "file": str(path)}
    return value, info
