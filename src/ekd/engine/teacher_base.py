"""The interface every teacher kind implements (checkpoint, ONNX, cache: :mod:`ekd.engine.teacher_kinds`)."""

from __future__ import annotations

import torch

__all__ = ["Teacher"]


class Teacher:
    """What the trainer needs from a teacher: embeddings of the batch it is given.

    ``embed`` receives the (normalised, possibly mirrored) images, their dataset indices and
    their mirror flags, so that a cache can look embeddings up instead of running a network.
    """

    embedding_size: int
    input_size: int | None
    head_state: dict | None = None
    source: str = ""

    def embed(self, images: torch.Tensor, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
