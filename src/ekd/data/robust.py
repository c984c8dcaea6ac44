"""Unreadable samples: skip them (counted, with a warning) or fail, by ``on_corrupt``.

A corrupt or truncated image found while training must not kill a DataLoader worker hours into
a run. With ``on_corrupt="skip"`` (the default) an item whose image cannot be decoded is replaced
by a readable one -- another image of the same identity when there is one (so a P x K batch
keeps its positive pairs), else the next readable item -- and the dataset returns the
substitute's own ``(image, label, index)``, so labels and per-index teacher embeddings stay
consistent. ``on_corrupt="error"`` raises the :class:`~ekd.errors.DataError` instead.

Counting: :attr:`SkipCorrupt.skipped` is the number of items replaced so far, summed over the
main process and every DataLoader worker (a small shared-memory counter, one slot per worker).
Each process warns (:class:`CorruptSampleWarning`) naming the first few unreadable files, then
stays quiet and only counts. When no substitute is found among the next candidates a
:class:`DataError` is raised: the data is broken beyond skipping (run
:func:`ekd.data.check.check_folder`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ekd.errors import DataError

__all__ = ["ON_CORRUPT", "CorruptSampleWarning", "SkipCorrupt", "check_on_corrupt"]

#: Accepted values of ``on_corrupt`` / ``data.on_corrupt``.
ON_CORRUPT = ("skip", "error")
_SLOTS = 64  # slot 0: main process; workers use 1 + id % 63
_MAX_WARNINGS = 10  # per process
_MAX_TRIES = 64  # substitutes tried before giving up


class CorruptSampleWarning(UserWarning):
    """An unreadable sample was skipped (``on_corrupt="skip"``)."""


def check_on_corrupt(value: str) -> str:
    if value not in ON_CORRUPT:
        raise DataError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {value!r}")
    return value


class SkipCorrupt:
    """Mixin for map-style datasets with an int64 ``labels`` array.

    Subclasses call :meth:`_init_skip` and implement ``_load(index)``, which returns the decoded
    item or raises :class:`DataError`; :meth:`_fetch` then returns ``(index_used, item)``.
    """

    labels: np.ndarray

    def _init_skip(self, on_corrupt: str) -> None:
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self._skip_counts = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()
        #: Indices found unreadable in this process (workers keep their own sets).
        self.corrupt: set[int] = set()
        self.corrupt_reason: dict[int, str] = {}
        self._warned = 0

    @property
    def skipped(self) -> int:
        """Items replaced by a substitute so far, over the main process and all workers."""
        return int(self._skip_counts.sum())

    def _load(self, index: int) -> Any:
        raise NotImplementedError

    def _fetch(self, index: int) -> tuple[int, Any]:
        index = int(index)
        if index not in self.corrupt or self.on_corrupt == "error":
            try:
                return index, self._load(index)
            except DataError as exc:
                if self.on_corrupt == "error":
                    raise
                self._note(index, exc)
        tried = 0
        for j in self._candidates(index):
            if j in self.corrupt:
                continue
            tried += 1
            try:
                item = self._load(j)
            except DataError as exc:
                self._note(j, exc)
                if tried >= _MAX_TRIES:
                    break
                continue
            info = get_worker_info()
            self._skip_counts[0 if info is None else 1 + info.id % (_SLOTS - 1)] += 1
            return j, item
        raise DataError(f"{self!r}: item {index} is unreadable ({self.corrupt_reason.get(index)}) "
                        f"and so are the {tried} substitute(s) tried: on_corrupt='skip' gives up; "
                        "check the data, e.g. with ekd.data.check.check_folder")

    def substitute_of(self, index: int) -> int:
        """The item that stands for ``index``: itself when readable (not in :attr:`corrupt`),
        else the first candidate not known to be unreadable -- the one :meth:`_fetch` returned,
        once it has been tried in this process."""
        index = int(index)
        if index not in self.corrupt:
            return index
        return next((j for j in self._candidates(index) if j not in self.corrupt), index)

    def _candidates(self, index: int) -> Iterator[int]:
        """Other items of the same identity (cyclically after ``index``), then the next items."""
        n = len(self.labels)
        same = np.flatnonzero(self.labels == self.labels[index])
        same = np.roll(same, -int(np.searchsorted(same, index, side="right")))
        seen = {index}
        for j in same[:_MAX_TRIES].tolist():
            if j not in seen:
                seen.add(j)
                yield j
        for step in range(1, min(n, _MAX_TRIES + 1)):
            j = (index + step) % n
            if j not in seen:
                seen.add(j)
                yield j

    def _note(self, index: int, exc: DataError) -> None:
        self.corrupt.add(index)
        self.corrupt_reason[index] = str(exc)
        if self._warned < _MAX_WARNINGS:
            self._warned += 1
            more = ("; further unreadable items are skipped silently (count: .skipped)"
                    if self._warned == _MAX_WARNINGS else "")
            warnings.warn(f"skipping unreadable item {index} (on_corrupt='skip'): {exc}{more}",
                          CorruptSampleWarning, stacklevel=4)
