"""Checkpoint files: atomic writes, safe loads, strict state restoration with clear errors.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint crafted to run code on
load is refused. Writes go to a temporary file in the same folder that is then renamed over the
target, so an interrupted write never destroys the previous checkpoint.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch
from torch import nn

from ekd.errors import CheckpointError

FORMAT = "ekd-checkpoint"
VERSION = 1


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync, then rename over ``path``:
    an interrupted write never destroys the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`write_atomic`."""
    return write_atomic(path, lambda fh: torch.save(obj, fh))


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely (tensors and plain containers only); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: it contains objects other than tensors "
                              f"and plain containers (weights_only=True): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - zipfile, struct, ... errors all mean a bad file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
                              f"{type(exc).__name__}: {exc}") from None


def _describe(keys: list[str], limit: int = 12) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(map(str, keys[:limit])) + more


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      what: str = "model") -> None:
    """Load ``state`` into ``module`` requiring identical keys and shapes.

    Any missing key, unexpected key or shape mismatch raises :class:`CheckpointError` that
    names ``source`` and lists the offending keys, so a wrong file never yields a silently
    random (or partially random) model.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: {what} state is a {type(state).__name__}, not a mapping")
    own = module.state_dict()
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{source}: {what} state entries that are not tensors: "
                              f"{_describe([str(k) for k in odd])}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (file != model): {_describe(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: does not match the {what} "
                              f"({type(module).__name__}): " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
