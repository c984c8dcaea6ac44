"""Tensor functions shared by heads and distillers."""

from __future__ import annotations

from typing import Any

import torch

#: Below this norm a vector has no usable direction: its gradient through ``unit`` is zero.
TINY_NORM = 1e-6


class _Unit(torch.autograd.Function):
    """``x / max(||x||, 1e-12)`` along ``dim`` (as ``F.normalize``) with a bounded gradient.

    ``F.normalize``'s gradient grows like ``1 / eps`` (1e12) at a zero vector, which overflows
    in float16 and wrecks the weights in float32. Here rows with a norm below
    :data:`TINY_NORM` get a zero gradient; all others get exactly the usual gradient
    ``(g - y (y . g)) / ||x||``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int) -> torch.Tensor:
        norm = x.norm(dim=dim, keepdim=True)
        y = x / norm.clamp_min(1e-12)
        ctx.save_for_backward(y, norm)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, norm = ctx.saved_tensors
        radial = (y * grad).sum(dim=ctx.dim, keepdim=True)
        g = (grad - y * radial) / norm.clamp_min(TINY_NORM)
        return torch.where(norm > TINY_NORM, g, torch.zeros_like(g)), None


def unit(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """L2-normalise along ``dim`` (forward identical to ``F.normalize``; bounded gradient)."""
    return _Unit.apply(x, dim)


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Row-wise cosine similarity through :func:`unit`."""
    return (unit(a, dim) * unit(b, dim)).sum(dim=dim)
