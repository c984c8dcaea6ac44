"""A training set held in memory: every image decoded once into one ``uint8`` tensor.

``data.preload: true`` replaces the DataLoader by :class:`ResidentBatches`: the images of the
dataset are decoded and resized once (:meth:`read_uint8` of the dataset, e.g.
:class:`~ekd.data.folder.ImageFolderDataset`) into ``images`` of shape ``N x 3 x S x S``, kept
on the training device (a GPU when training on one), and each batch of the sampler is gathered
there and normalised there by :func:`~ekd.data.transforms.normalize`, the function the dataset
itself uses. Mirroring stays with the trainer, after the batch, as without preloading. So the
batches -- pixels, labels, indices -- are bit for bit those of the DataLoader for the same seed.

Unreadable images follow the dataset's ``on_corrupt`` rule at preload time: with ``"skip"`` the
slot of an unreadable item holds its substitute's pixels, label and index (the item the dataset
would have returned in its place); with ``"error"`` preloading stops with the dataset's
:class:`~ekd.errors.DataError` naming the file.

The size is checked before anything is decoded: ``N * 3 * S * S`` bytes must not exceed
``data.preload_max_gb`` (GB = 10**9 bytes), else a :class:`~ekd.errors.ConfigError` gives the
size needed. Under ``torchrun`` every process holds the whole set (on its own GPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ekd.data.robust import SkipCorrupt
from ekd.data.transforms import normalize
from ekd.errors import ConfigError, DataError

__all__ = ["ResidentBatches", "ResidentImages", "resident_bytes", "check_fits"]

CHANNELS = 3
_CHUNK = 256  # images per decoding batch


def resident_bytes(num_images: int, input_size: int, channels: int = CHANNELS) -> int:
    """Bytes of the resident ``uint8`` tensor: ``N * C * H * W``."""
    return int(num_images) * int(channels) * int(input_size) ** 2


def check_fits(num_images: int, input_size: int, max_gb: float) -> None:
    """Refuse (ConfigError naming the size) a set larger than ``max_gb`` GB, before decoding."""
    need = resident_bytes(num_images, input_size)
    if need > max_gb * 1e9:
        raise ConfigError(
            f"data.preload: the training set needs {need / 1e9:.3g} GB resident ({num_images} images "
            f"x {CHANNELS}x{input_size}x{input_size} uint8 = {need} bytes) but data.preload_max_gb is "
            f"{max_gb:g}; raise data.preload_max_gb if the device has the memory (each process holds "
            "the whole set), lower data.input_size, or set data.preload=false")


class _Decode(Dataset):
    """``(index, index used, uint8 pixels)`` of each item, for decoding in DataLoader workers."""

    def __init__(self, dataset: Any, shape: tuple[int, int, int]) -> None:
        self.dataset, self.shape = dataset, shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, int, torch.Tensor]:
        pixels = self.dataset.read_uint8(index)
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.shape != self.shape:
            got = f"{pixels.dtype} {tuple(pixels.shape)}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise DataError(f"data.preload: {type(self.dataset).__name__}.read_uint8({index}) returned "
                            f"{got}, expected uint8 {self.shape}")
        used = self.dataset.substitute_of(index) if isinstance(self.dataset, SkipCorrupt) else index
        return index, used, pixels


def _stack(items: list[tuple[int, int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index, used, pixels = zip(*items)
    return torch.tensor(index), torch.tensor(used), torch.stack(pixels)


class ResidentImages:
    """All images of a dataset as ``uint8 [N, 3, S, S]`` on ``device``, with the label and
    the index of the item each slot holds (itself, or its substitute for an unreadable image)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.images, self.labels, self.indices = images, labels, indices

    @classmethod
    def build(cls, dataset: Any, device: torch.device | str = "cpu", max_gb: float = 4.0,
              num_workers: int = 0, progress: bool = True) -> ResidentImages:
        """Decode every item of ``dataset`` once (``num_workers`` DataLoader workers) into one
        tensor on ``device``, after checking it fits in ``max_gb`` GB."""
        if not callable(getattr(dataset, "read_uint8", None)):
            raise ConfigError(f"data.preload: {type(dataset).__name__} cannot be preloaded (it has no "
                              "read_uint8); set data.preload=false")
        n, size = len(dataset), int(dataset.input_size)
        check_fits(n, size, max_gb)
        device = torch.device(device)
        try:
            images = torch.empty((n, CHANNELS, size, size), dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            raise ConfigError(f"data.preload: {device} has no room for the training set "
                              f"({resident_bytes(n, size) / 1e9:.3g} GB); set data.preload=false or "
                              "lower data.input_size") from None
        used = torch.arange(n, dtype=torch.int64)
        loader = DataLoader(_Decode(dataset, (CHANNELS, size, size)), batch_size=_CHUNK, num_workers=num_workers,
                            collate_fn=_stack, generator=torch.Generator().manual_seed(0))  # not torch's global RNG
        with tqdm(total=n, desc=f"preload {n} images at {size}px", unit="img", disable=not progress,
                  leave=False, dynamic_ncols=True) as bar:
            for index, chunk_used, pixels in loader:
                images[index.to(device)] = pixels.to(device)
                used[index] = chunk_used
                bar.update(len(index))
        labels = torch.as_tensor(dataset.labels, dtype=torch.int64)[used]
        return cls(images, labels, used)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(normalised float images on the device, labels, indices)`` of the given items, as
        the DataLoader collates ``(image, label, index)`` items of the dataset."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        pixels = self.images.index_select(0, idx.to(self.images.device))
        return normalize(pixels), self.labels[idx], self.indices[idx]


class ResidentBatches:
    """Iterates a batch sampler over :class:`ResidentImages`, in place of a DataLoader."""

    def __init__(self, resident: ResidentImages, batch_sampler: Iterable[list[int]]) -> None:
        self.resident, self.batch_sampler = resident, batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self.batch_sampler:
            yield self.resident.batch(batch)
