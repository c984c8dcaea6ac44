"""The device a run uses and its random seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

from ekd.errors import ConfigError

__all__ = ["resolve_device", "seed_everything"]


def resolve_device(name: str) -> torch.device:
    """``auto`` = the first CUDA device when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: invalid device {name!r}: {exc}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
