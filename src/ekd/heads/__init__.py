"""Margin softmax heads (ArcFace, CosFace) and class-parallel Partial FC.

One registry, :data:`HEADS` (``head.kind``), and one interface for the trainer
(:class:`MarginHead`: ``loss``, ``shard``, ``sharded``, ``class_cosine``), which Partial FC offers too.
"""

from __future__ import annotations

import torch

from ekd.errors import ConfigError
from ekd.heads.margin import HEADS, ArcFace, CosFace, MarginHead, margin_target
from ekd.heads.partial_fc import PartialFC, init_rows


def build_head(kind: str, embedding_size: int, num_classes: int, scale: float = 64.0,
               margin: float = 0.5) -> MarginHead:
    """Build a margin head by name ("arcface" or "cosface")."""
    if kind not in HEADS:
        raise ConfigError(f"unknown head '{kind}'; valid: {', '.join(HEADS)}")
    return HEADS[kind](embedding_size, num_classes, scale, margin)


def build_training_head(kind: str, embedding_size: int, num_classes: int, scale: float, margin: float,
                        sample_rate: float, rank: int, world_size: int, distributed: bool,
                        seed: int) -> MarginHead | PartialFC:
    """The student's head for training: Partial FC (class centres sharded over ranks, negatives
    sampled) when sampling (``sample_rate < 1``) or ``distributed``, a plain margin head
    otherwise; both start from the same centres (:func:`init_rows`) for any world size."""
    if sample_rate < 1.0 or distributed:
        return PartialFC(kind, embedding_size, num_classes, scale, margin, sample_rate, rank,
                         world_size, seed=seed)
    head = build_head(kind, embedding_size, num_classes, scale, margin)
    with torch.no_grad():
        head.weight.copy_(init_rows(0, num_classes, num_classes, embedding_size, seed))
    return head


__all__ = ["ArcFace", "CosFace", "HEADS", "MarginHead", "PartialFC", "build_head", "build_training_head",
           "margin_target"]
