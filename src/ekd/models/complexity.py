"""Model complexity: multiply-accumulates of one forward pass, counted by PyTorch itself.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix
products) as FLOPs / 2 for one image; batch norm, PReLU and additions are not counted, as in the
usual "MACs" of face-recognition papers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ekd.errors import ConfigError

__all__ = ["count_macs", "dummy_images", "eval_mode"]


def dummy_images(batch: int, input_size: int) -> torch.Tensor:
    """A fixed (seed 0) batch of uniform random normalised images in ``[-1, 1]``."""
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, input_size, input_size, generator=gen) * 2 - 1


def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode and return a function restoring each module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()

    def restore() -> None:
        for m, was_training in modes:
            m.training = was_training
    return restore


def count_macs(model: nn.Module, input_size: int) -> tuple[int, int]:
    """``(MACs, embedding_size)`` of one ``input_size`` image through ``model`` (FLOPs / 2)."""
    restore = eval_mode(model)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.inference_mode():
            out = model(dummy_images(1, input_size))
    finally:
        restore()
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ConfigError(f"model must return a [batch, D] embedding, got "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)}")
    return counter.get_total_flops() // 2, int(out.shape[1])
