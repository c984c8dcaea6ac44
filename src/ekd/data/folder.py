"""Datasets reading face images from disk.

:class:`ImageFolderDataset` reads the usual ``root/<identity>/<image>`` layout; identities sorted
by name get the contiguous labels ``0..C-1`` and images are sorted by file name within each
identity, so the sample order (and index) is stable across runs and machines.
:func:`write_pairs` draws a verification pair list from such a folder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ekd.data.robust import SkipCorrupt, check_on_corrupt
from ekd.data.transforms import load_image, normalize, random_flip, to_tensor, to_uint8
from ekd.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "ListDataset", "write_pairs"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")


def _list_images(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """File names in ``folder`` with one of ``extensions`` (case-insensitive), sorted."""
    names = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.name.lower().endswith(extensions) and entry.is_file():
                    names.append(entry.name)
    except OSError as exc:
        raise DataError(f"cannot list the folder {folder}: {exc}") from None
    return sorted(names)


class ImageFolderDataset(SkipCorrupt, Dataset):
    """Face images in ``root/<identity>/<image>``; items are ``(image, label, index)``.

    ``identities`` restricts the dataset to a subset of identity folders (labels are then
    contiguous over that subset); ``max_per_identity`` keeps the first N images (by name) of
    each identity. With ``train=True`` images are flipped horizontally with probability 0.5
    using torch's RNG or ``generator``.

    ``on_corrupt="skip"`` (default) replaces an unreadable image by a readable one of the same
    identity (else the next one) and returns that item's ``(image, label, index)``; the count is
    :attr:`skipped` and a warning names each unreadable file. ``"error"`` raises
    :class:`DataError` instead (see :mod:`ekd.data.robust`). Identity folders without images are
    left out with a warning; :func:`ekd.data.check.check_folder` reports them, unreadable files
    and duplicate images in full.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        input_size: int = 112,
        train: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        identities: Sequence[str] | None = None,
        max_per_identity: int | None = None,
        generator: torch.Generator | None = None,
        on_corrupt: str = "skip",
    ) -> None:
        self.root = Path(root)
        self.input_size = int(input_size)
        self.train = bool(train)
        self.generator = generator
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        check_on_corrupt(on_corrupt)
        if max_per_identity is not None and max_per_identity < 1:
            raise DataError(f"max_per_identity must be >= 1, got {max_per_identity}")
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "not found"
            raise DataError(f"dataset folder {what}: {self.root}")
        try:
            with os.scandir(self.root) as it:
                folders = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        except OSError as exc:
            raise DataError(f"cannot list the dataset folder {self.root}: {exc}") from None
        if not folders:
            raise DataError(f"dataset folder {self.root} has no identity sub-folders")
        if identities is not None:
            wanted = sorted(set(identities))
            missing = sorted(set(wanted) - set(folders))
            if missing:
                shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
                raise DataError(f"identities not found in {self.root}: {shown}")
            folders = wanted

        classes: list[str] = []
        samples: list[tuple[str, int]] = []
        empty: list[str] = []
        for name in folders:
            files = _list_images(self.root / name, exts)
            if max_per_identity is not None:
                files = files[:max_per_identity]
            if not files:
                empty.append(name)
                continue
            label = len(classes)
            classes.append(name)
            samples.extend((str(self.root / name / f), label) for f in files)
        if not samples:
            raise DataError(
                f"no images with extensions {', '.join(exts)} found under {self.root}"
            )
        if empty:
            shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
            warnings.warn(
                f"skipped {len(empty)} identity folder(s) without images in {self.root}: {shown}",
                stacklevel=2,
            )

        self.classes: list[str] = classes
        self.samples: list[tuple[str, int]] = samples
        self.labels: np.ndarray = np.fromiter((s[1] for s in samples), dtype=np.int64,
                                              count=len(samples))
        self._init_skip(on_corrupt)

    @property
    def num_classes(self) -> int:
        """Number of identities (labels are ``0..num_classes-1``)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        flip = self.train and random_flip(self.generator)
        index, pixels = self._fetch_uint8(index)
        return normalize(pixels.flip(-1) if flip else pixels), self.samples[index][1], index

    def read_uint8(self, index: int) -> torch.Tensor:
        """Item ``index`` decoded and resized to ``uint8 [3, input_size, input_size]``, never
        mirrored; ``self[index][0]`` is ``normalize(self.read_uint8(index))`` (``train=False``).
        An unreadable image follows ``on_corrupt`` as in ``__getitem__`` (the substitute's
        pixels; its index is :meth:`substitute_of`)."""
        return self._fetch_uint8(index)[1]

    def _fetch_uint8(self, index: int) -> tuple[int, torch.Tensor]:
        index, img = self._fetch(index)
        return index, to_uint8(img, self.input_size)

    def _load(self, index: int):  # noqa: ANN202 - a PIL image, or DataError naming the file
        return load_image(self.samples[index][0])

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, images={len(self)}, "
                f"classes={self.num_classes}, input_size={self.input_size}, train={self.train})")


class ListDataset(Dataset):
    """Images given by an explicit list of paths; items are image tensors (never flipped)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], input_size: int = 112) -> None:
        self.paths: list[str] = [str(p) for p in paths]
        self.input_size = int(input_size)
        if not self.paths:
            raise DataError("image list is empty")
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataError(f"{len(missing)} image file(s) not found: {shown}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_tensor(load_image(self.paths[index]), self.input_size)


def write_pairs(folder: str | os.PathLike[str], out_file: str | os.PathLike[str], num_pairs: int,
                seed: int) -> Path:
    """Write ``num_pairs`` lines ``rel/path1 rel/path2 label`` (1 same, 0 different identity).

    Half the pairs (rounded up) are same-identity; paths are relative to ``folder``. Pairs
    are drawn deterministically from ``seed`` and not repeated where possible.
    """
    folder, out_file = Path(folder), Path(out_file)
    if not folder.is_dir():
        raise DataError(f"pair folder not found: {folder}")
    if num_pairs < 1:
        raise DataError(f"num_pairs must be >= 1 for the pair list {out_file}, got {num_pairs}")
    ids = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {i: _list_images(folder / i, IMAGE_EXTENSIONS) for i in ids}
    spaced = [f"{i}/{f}" for i in ids for f in files[i] if (" " in i or " " in f)]
    if spaced:
        raise DataError(f"pair lists are space-separated; {folder / spaced[0]} has a space")
    ids = [i for i in ids if files[i]]
    multi = [i for i in ids if len(files[i]) >= 2]
    if len(ids) < 2 or not multi:
        raise DataError(f"{folder} needs >= 2 identities and one with >= 2 images to make pairs")
    rng = np.random.default_rng([seed, 7])
    n_same = (num_pairs + 1) // 2
    seen: set[tuple[str, str]] = set()
    lines: list[str] = []
    for n_want, same in ((n_same, 1), (num_pairs - n_same, 0)):
        made = tries = 0
        while made < n_want:
            if same:
                i = multi[int(rng.integers(len(multi)))]
                a, b = rng.choice(len(files[i]), 2, replace=False)
                pa, pb = f"{i}/{files[i][a]}", f"{i}/{files[i][b]}"
            else:
                i, j = rng.choice(len(ids), 2, replace=False)
                fi, fj = files[ids[i]], files[ids[j]]
                pa = f"{ids[i]}/{fi[int(rng.integers(len(fi)))]}"
                pb = f"{ids[j]}/{fj[int(rng.integers(len(fj)))]}"
            key = (min(pa, pb), max(pa, pb))
            tries += 1
            if key in seen and tries < 20 * n_want:
                continue
            seen.add(key)
            lines.append(f"{pa} {pb} {same}")
            made += 1
    lines = [lines[k] for k in rng.permutation(len(lines))]  # interleave same/different
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join(lines) + "\n")
    return out_file
