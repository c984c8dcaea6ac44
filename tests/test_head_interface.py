"""One head registry and one head interface: a plain margin head and Partial FC answer the
trainer's calls (``loss``, ``shard``, ``sharded``, ``class_cosine``) the same way on one process
at sample rate 1, so the trainer needs no Partial FC branch; the config's choices are the registry's."""

from __future__ import annotations

import pytest
import torch

from ekd.config import _CHOICES
from ekd.heads import HEADS, MarginHead, PartialFC, build_training_head

DIM, CLASSES, SEED = 8, 12, 3


def test_the_config_choices_are_the_head_registry():
    assert tuple(_CHOICES["head.kind"]) == tuple(HEADS)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_plain_head_and_partial_fc_share_one_interface(kind):
    plain = build_training_head(kind, DIM, CLASSES, 16.0, 0.3, 1.0, 0, 1, False, SEED)
    sharded = build_training_head(kind, DIM, CLASSES, 16.0, 0.3, 1.0, 0, 1, True, SEED)
    assert isinstance(plain, MarginHead) and isinstance(sharded, PartialFC)
    assert (plain.sharded, plain.shard) == (False, None)
    assert sharded.sharded and (sharded.shard.start, sharded.shard.end) == (0, CLASSES)
    assert torch.equal(plain.weight, sharded.weight)  # the same initial centres
    torch.manual_seed(0)
    emb, labels = torch.randn(10, DIM), torch.randint(0, CLASSES, (10,))
    assert torch.allclose(plain.class_cosine(emb), sharded.class_cosine(emb))
    assert torch.allclose(plain.loss(emb, labels), sharded.loss(emb, labels), atol=1e-5)


def test_sampling_makes_the_training_head_partial_fc():
    head = build_training_head("arcface", DIM, CLASSES, 16.0, 0.3, 0.5, 0, 1, False, SEED)
    assert isinstance(head, PartialFC) and head.sharded and head.shard.num_sample == CLASSES // 2
