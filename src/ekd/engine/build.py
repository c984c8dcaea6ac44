"""Small builders of the training loop: the training set and its loader, and the student's compiled
forward (the device and seeds: :mod:`ekd.utils.device`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ekd.config import Config
from ekd.data.kinds import build_dataset
from ekd.data.resident import ResidentBatches, ResidentImages
from ekd.errors import ConfigError


def build_train_set(cfg: Config):  # noqa: ANN201 - a dataset of the kind data.kind
    """The training set of kind ``data.kind`` (:mod:`ekd.data.kinds`: folder, rec, synthetic).

    Images are not mirrored here: the trainer mirrors each batch itself so that it knows which
    samples were mirrored (needed to look up cached teacher embeddings).
    """
    return build_dataset(cfg.data)


def build_train_loader(cfg: Config, dataset: Dataset, sampler: Sampler[list[int]],
                       device: torch.device, rank: int = 0, progress: bool = True
                       ) -> DataLoader | ResidentBatches:
    """Batches ``(images, labels, indices)`` of ``sampler``: a DataLoader reading the dataset, or,
    with ``data.preload``, the whole set decoded once onto ``device`` (:mod:`ekd.data.resident`;
    ``data.num_workers`` then only decode it)."""
    data_config = cfg.data
    if data_config.preload:
        resident = ResidentImages.build(dataset, device, data_config.preload_max_gb, data_config.num_workers,
                                        progress)
        return ResidentBatches(resident, sampler)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=data_config.num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=data_config.num_workers > 0,
                      generator=torch.Generator().manual_seed(cfg.train.seed + rank))


CXX_CANDIDATES = ("g++", "c++", "clang++")


def compiled_forward(module: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``train.compile``: ``module`` under ``torch.compile`` (inductor). The parameters stay the
    module's own, so checkpoints, evaluation and DDP see the plain module.

    Inductor generates C++ on CPU; without a compiler ``torch.compile`` would fail deep inside
    torch at the first step, so that is checked here (``CXX`` or one of :data:`CXX_CANDIDATES`).
    """
    if device.type == "cpu":
        named = os.environ.get("CXX")
        if not (named and shutil.which(named)) and not any(shutil.which(c) for c in CXX_CANDIDATES):
            raise ConfigError("train.compile=true on CPU needs a C++ compiler (g++ or clang++ on the PATH, "
                              "or CXX); install one or set train.compile=false")
    return torch.compile(module)
