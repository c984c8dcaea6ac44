"""Embedding extraction with flip test-time augmentation.

Implements InsightFace's evaluation-time embedding (``recognition/arcface_torch/eval/
verification.py``, ``test``): the model in eval mode, ``embedding = f(x) + f(flip(x))`` with
``flip`` the horizontal mirror, then L2 normalisation; returned as float32 numpy.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ekd.errors import DataError
from ekd.eval.metrics import l2_normalize

__all__ = ["extract_embeddings"]


def _image_tensor(batch: object, index: int) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) > 0 else batch
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"image batch {index} must be a tensor [B, C, H, W] (or a tuple/list whose first "
            f"element is one), got {shape}"
        )
    return x


def _default_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def extract_embeddings(
    model: torch.nn.Module,
    images: Iterable[torch.Tensor] | Iterable[tuple | list],
    device: torch.device | str | None = None,
    flip: bool = True,
    progress: bool | str = False,
) -> np.ndarray:
    """Embed every image of ``images``; returns L2-normalised float32 ``[N, D]`` in order.

    ``images`` is a DataLoader or any iterable of batches ``[B, 3, H, W]`` (or of tuples/lists
    whose first element is such a tensor, e.g. ``(images, labels)``). Under
    ``torch.inference_mode`` with the model in eval mode, the embedding of ``x`` is
    ``model(x) + model(x.flip(-1))`` when ``flip`` (InsightFace's protocol), else ``model(x)``.
    ``device`` defaults to the device of the model's parameters. Each module's train/eval mode
    is restored afterwards. ``progress`` shows a tqdm bar (a string: the bar's label, e.g. the
    model and set).
    """
    dev = torch.device(device) if device is not None else _default_device(model)
    modes = [(m, m.training) for m in model.modules()]
    batches: Iterable = images
    if progress:
        from tqdm.auto import tqdm

        label = progress if isinstance(progress, str) else "embedding"
        batches = tqdm(images, desc=label, unit="batch", leave=False)
    outputs: list[torch.Tensor] = []
    model.eval()
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                x = _image_tensor(batch, i).to(dev, non_blocking=True)
                feat = model(x)
                if not isinstance(feat, torch.Tensor) or feat.ndim != 2:
                    raise TypeError(
                        f"model must return a [B, D] tensor, got "
                        f"{tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat)}"
                    )
                if flip:
                    feat = feat + model(torch.flip(x, dims=[3]))
                outputs.append(feat.float().cpu())
    finally:
        for m, was_training in modes:
            m.training = was_training
        if progress and hasattr(batches, "close"):
            batches.close()
    if not outputs:
        raise DataError("no images to embed: the image loader yielded no batches")
    emb = torch.cat(outputs).numpy().astype(np.float32, copy=False)
    return l2_normalize(emb).astype(np.float32, copy=False)


def embed_dataset(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 128,
                  device: torch.device | str | None = None, flip: bool = True,
                  progress: bool | str = False) -> np.ndarray:
    """:func:`extract_embeddings` of a whole dataset, sharded over ranks when run under
    ``torchrun``: rank r embeds the r-th contiguous slice, and every rank receives all the
    embeddings, in dataset order (one ``all_gather_object``)."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not sharded:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        return extract_embeddings(model, loader, device=device, flip=flip, progress=progress)
    rank, world, n = dist.get_rank(), dist.get_world_size(), len(dataset)  # type: ignore[arg-type]
    start, end = n * rank // world, n * (rank + 1) // world
    local = None
    if end > start:
        loader = DataLoader(Subset(dataset, range(start, end)), batch_size=batch_size, shuffle=False)
        local = extract_embeddings(model, loader, device=device, flip=flip, progress=progress)
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    return np.concatenate([p for p in parts if p is not None])
