"""Checkpoint files: atomic writes, safe loads, strict state restoration with clear errors.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint crafted to run code on
load is refused. Writes go to a temporary file in the same folder that is then renamed over the
target, so an interrupted write never destroys the previous checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
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


def sniff_file(path: Path) -> str | None:
    """What a file that cannot be a PyTorch checkpoint is ("a text file", ...); None when it
    may be one (a torch.save zip archive or a binary pickle)."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None  # a cut-short torch.save file: torch.load names the damage
        return None if any(n.endswith("data.pkl") for n in names) else \
            "a zip archive without a PyTorch checkpoint inside"
    if head[:1] == b"\x80":
        return None  # a binary pickle: legacy torch.save or plain pickle, judged by the safe loader
    text = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if text >= 0.95 * len(head):
        return "a text file"
    return None


def _safe_loader_reason(exc: BaseException) -> str:
    """The safe unpickler's own reason (e.g. the refused class), without torch's advice text."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it needs the Python class {found.group(1)}"
    tail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
    reason = tail[0].strip() if tail and "weights_only" not in tail[0] else "not plain tensors"
    return f"a pickle not written by torch.save: {reason}" if "operand" in reason else reason


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely (tensors and plain containers only); errors name the file and
    say what it is when it is not a checkpoint. Never suggests an unsafe load."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}"
                              + (" (it is a folder)" if path.is_dir() else ""))
    what = sniff_file(path)
    if what is not None:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint / ONNX model: it is {what}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: it contains objects other than tensors "
                              f"and plain containers ({_safe_loader_reason(exc)}); ekd reads "
                              "only tensors, numbers, strings and containers, and runs no code "
                              "from model files; re-save the weights as a state_dict") from None
    except Exception as exc:  # noqa: BLE001 - zipfile, struct, ... errors all mean a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
                              f"{type(exc).__name__}: {first}") from None


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
