"""Small builders shared by the engine: device, seeding, the training set."""

from __future__ import annotations

import random

import numpy as np
import torch

from ekd.config import Config
from ekd.data.kinds import build_dataset
from ekd.errors import ConfigError


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


def build_train_set(cfg: Config):  # noqa: ANN201 - a dataset of the kind data.kind
    """The training set of kind ``data.kind`` (:mod:`ekd.data.kinds`: folder, rec, synthetic).

    Images are not mirrored here: the trainer mirrors each batch itself so that it knows which
    samples were mirrored (needed to look up cached teacher embeddings).
    """
    return build_dataset(cfg.data)
