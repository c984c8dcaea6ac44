"""Large per-sample numpy arrays kept in shared memory, so pickling a dataset is cheap.

A DataLoader worker started with ``spawn``/``forkserver`` receives its dataset through torch's
multiprocessing pickler, which sends a shared-memory tensor as a small handle; a plain numpy
array would be copied byte for byte into every worker (for MS1MV2's 5.8M images the key,
offset and label arrays are ~0.2 GB). With ``fork`` nothing is pickled at all.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SharedArrays"]


class SharedArrays:
    """Mixin: the numpy attributes named in ``_shared`` are views of shared-memory tensors.

    Call :meth:`_share_arrays` after setting them (and again after replacing one); pickling
    sends the tensors, unpickling restores the numpy views.
    """

    _shared: tuple[str, ...] = ()

    def _share_arrays(self) -> None:
        tensors = {}
        for name in self._shared:
            arr = np.ascontiguousarray(getattr(self, name))
            t = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr).share_memory_()
            tensors[name] = t
            setattr(self, name, t.numpy())
        self._shm = tensors

    def __getstate__(self) -> dict:
        shm = getattr(self, "_shm", {})
        if any(name not in shm or getattr(self, name) is not None
               and not np.shares_memory(getattr(self, name), shm[name].numpy()) for name in self._shared):
            self._share_arrays()  # an array was replaced since: share the current one
        state = dict(self.__dict__)
        for name in self._shared:
            state[name] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name, t in self._shm.items():
            setattr(self, name, t.numpy())
