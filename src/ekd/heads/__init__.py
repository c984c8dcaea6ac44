"""Margin softmax heads (ArcFace, CosFace) and class-parallel Partial FC."""

from __future__ import annotations

from ekd.errors import ConfigError
from ekd.heads.margin import ArcFace, CosFace, MarginHead
from ekd.heads.partial_fc import PartialFC

HEADS = {"arcface": ArcFace, "cosface": CosFace}


def build_head(kind: str, embedding_size: int, num_classes: int, scale: float = 64.0,
               margin: float = 0.5) -> MarginHead:
    """Build a margin head by name ("arcface" or "cosface")."""
    if kind not in HEADS:
        raise ConfigError(f"unknown head '{kind}'; valid: {', '.join(HEADS)}")
    return HEADS[kind](embedding_size, num_classes, scale, margin)


__all__ = ["ArcFace", "CosFace", "HEADS", "MarginHead", "PartialFC", "build_head"]
