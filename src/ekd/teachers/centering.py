"""``teacher.center: train_mean``: distil from the teacher's embedding with its training-set mean
direction removed.

A teacher trained with a margin softmax (ArcFace, CosFace) spreads its embeddings over the
sphere: unrelated faces score a cosine near 0. A teacher trained with another loss need not. The
dlib ResNet, trained with a Euclidean metric loss, puts every face in a narrow cone. Its unit
embeddings have a mean of norm 0.93 over the training faces, and two different people score a
cosine of 0.86 on average. Then 1 - cos(student, teacher) is almost entirely about the shared
direction, which carries no identity. A student trained with a margin softmax also fights the
cone.

Centring moves every teacher vector by the mean direction ``mu`` of its unit embeddings over the
training images (both mirror views): ``t' = t / |t| - mu``. It works on directions, as cosine
scores do: distillers that normalise see the centred direction; those that use raw magnitudes
(``fitnet``) regress ``t'`` itself, whose norm is ``|t / |t| - mu|``, not the teacher's raw norm. The class centres of ``teacher.centers`` move the same
way: ``w_c' = w_c / |w_c| - mu``, renormalised. The new vectors are cosine-comparable with each
other, as the originals were. ``mu`` is computed once, before the first step, and the same way on
every process:
- for an embedding cache, from all its rows;
- for a live teacher, from ``teacher.center_images`` training images spaced evenly over the set.

It is logged with its norm: near 0 means centring changes little, near 1 means a narrow cone.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ekd.errors import DataError
from ekd.teachers.cache import mean_embedding_centers
from ekd.teachers.registry import Teacher

__all__ = ["CENTER_CHOICES", "CenteredTeacher", "cache_mean_direction", "center_teacher", "live_mean_direction"]

log = logging.getLogger(__name__)

#: ``teacher.center`` values.
CENTER_CHOICES = ("none", "train_mean")
#: An uncentred cache whose mean unit embedding is longer than this gets a warning.
CONE_WARNING_NORM = 0.5
#: ... estimated from at most this many rows, spaced evenly over the cache.
CONE_CHECK_ROWS = 1 << 16


class CenteredTeacher(Teacher):
    """``inner``'s embeddings and class centres with the mean direction ``mean`` removed."""

    def __init__(self, inner: Teacher, mean: torch.Tensor, images: int, head_state: dict | None = None) -> None:
        self.inner = inner
        self.mean = mean.float()
        self.mean_images = images
        self.embedding_size = inner.embedding_size
        self.input_size = inner.input_size
        self.source = inner.source
        self.head_state = head_state if head_state is not None else _centred_head_state(inner.head_state, self.mean)
        if hasattr(inner, "model"):
            self.model = inner.model  # the diagnostics score a live teacher on the validation set

    def embed(self, images: torch.Tensor, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        raw = self.inner.embed(images, indices, flipped).float()
        return F.normalize(raw, dim=1) - self.mean.to(raw.device)


def _centred_head_state(head_state: dict | None, mean: torch.Tensor) -> dict | None:
    if not head_state or "weight" not in head_state:
        return head_state
    weight = head_state["weight"].detach().float()
    if weight.ndim != 2 or weight.shape[1] != mean.shape[0]:
        raise DataError(f"teacher.center: the teacher's class centres have shape {tuple(weight.shape)}, "
                        f"its embeddings {mean.shape[0]} dimensions")
    return {**head_state, "weight": F.normalize(F.normalize(weight, dim=1) - mean.to(weight.device), dim=1)}


def cache_mean_direction(embeddings: np.ndarray, block: int = 1 << 16) -> torch.Tensor:
    """The mean of a cache's unit directions ``[N, 2, D]`` (every row, both views), in blocks."""
    total = np.zeros(embeddings.shape[-1], dtype=np.float64)
    for a in range(0, embeddings.shape[0], block):
        total += np.asarray(embeddings[a:a + block], dtype=np.float64).sum(axis=(0, 1))
    return torch.from_numpy(total / (2 * embeddings.shape[0])).float()


@torch.no_grad()
def live_mean_direction(teacher: Teacher, dataset: Any, device: torch.device, images: int,
                        batch_size: int = 64, progress: bool = True) -> tuple[torch.Tensor, int]:
    """The mean unit embedding of ``teacher`` over ``images`` training images spaced evenly over
    ``dataset`` (each also mirrored), and how many images that was."""
    if images < 1:
        raise DataError(f"teacher.center_images must be >= 1, got {images}")
    n = len(dataset)
    chosen = np.unique(np.linspace(0, n - 1, num=min(images, n)).round().astype(np.int64))
    total = torch.zeros(teacher.embedding_size, dtype=torch.float64)
    bar = tqdm(total=len(chosen), desc="teacher mean direction", unit="img", disable=not progress)
    for a in range(0, len(chosen), batch_size):
        idx = torch.from_numpy(chosen[a:a + batch_size])
        batch = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
        for flipped in (False, True):
            seen = batch.flip(-1) if flipped else batch
            emb = teacher.embed(seen, idx, torch.full((len(idx),), flipped))
            total += F.normalize(emb.float(), dim=1).sum(0).double().cpu()
        bar.update(len(idx))
    bar.close()
    return (total / (2 * len(chosen))).float(), len(chosen)


def _warn_if_cone(cache: Any) -> None:
    """Warn when a cache's embeddings share one direction (estimated on evenly spaced rows)."""
    rows = np.unique(np.linspace(0, len(cache) - 1, num=min(len(cache), CONE_CHECK_ROWS)).round().astype(np.int64))
    norm = float(cache_mean_direction(cache.embeddings[rows]).norm())
    if norm > CONE_WARNING_NORM:
        log.warning("the teacher's embeddings share one direction (mean unit embedding of norm %.2f over %d "
                    "cached images): distillers that match embeddings will mostly match that direction, which "
                    "carries no identity; consider teacher.center=train_mean", norm, len(rows))


def center_teacher(teacher: Teacher, teacher_config: Any, dataset: Any, device: torch.device,
                   progress: bool = True) -> Teacher:
    """``teacher`` as ``teacher.center`` asks: itself for ``none``, centred for ``train_mean``.
    Class centres averaged from a cache (``teacher.centers: mean_embedding``) are averaged again
    from the centred embeddings: the normalised ``mean_c - mu``."""
    cache = getattr(teacher, "cache", None)
    if teacher_config.center == "none":
        if cache is not None:
            _warn_if_cone(cache)
        return teacher
    head_state = None
    if cache is not None:
        mean, used = cache_mean_direction(cache.embeddings), len(cache)
        if teacher_config.centers == "mean_embedding":
            head_state = {"weight": mean_embedding_centers(cache, dataset.labels, dataset.num_classes, offset=mean)}
    else:
        mean, used = live_mean_direction(teacher, dataset, device, teacher_config.center_images,
                                         progress=progress)
    log.info("teacher.center=train_mean: mean unit embedding over %d training images (both views) has "
             "norm %.3f (0: already centred; near 1: a narrow cone)", used, float(mean.norm()))
    return CenteredTeacher(teacher, mean, used, head_state)
