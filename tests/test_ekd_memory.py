"""EKD's cross-batch-memory thresholds (``memory_size``): thresholds over batch + memory
negatives, FIFO memory, checkpointed state, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ekd.config import Config, DistillerConfig
from ekd.distill import build_distiller
from ekd.distill.ekd import EKDLoss
from ekd.engine.distill_inputs import build_distillers
from ekd.errors import ConfigError


def _batch(seed: int, n: int = 24, dim: int = 8, ids: int = 6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64),
            torch.randn(n, dim, generator=g, dtype=torch.float64),
            torch.arange(n) % ids + seed * 100)  # new identities every batch


def _expected_thresholds(emb, labels, mem_emb, mem_labels, divisors):
    """Independent computation: every negative pair of the batch and batch x memory, sorted."""
    e = F.normalize(emb, dim=1).numpy()
    sims = []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            if labels[i] != labels[j]:
                sims.append(e[i] @ e[j])
        for j in range(len(mem_emb)):
            if labels[i] != mem_labels[j]:
                sims.append(e[i] @ mem_emb[j])
    sims = np.sort(np.array(sims))[::-1]
    return np.array([sims[len(sims) // d] for d in divisors])


def test_memory_thresholds_use_batch_and_memory_negatives():
    loss = EKDLoss(memory_size=40, student_dim=8, teacher_dim=8, momentum=1.0, fprs=(0.1, 0.01, 0.001))
    history_s, history_t, history_y = [], [], []
    for step in range(3):  # 24 + 24 + 24 > 40: the memory wraps around
        s, t, y = _batch(step)
        mem_s = np.concatenate(history_s)[-40:] if history_s else np.zeros((0, 8))
        mem_t = np.concatenate(history_t)[-40:] if history_t else np.zeros((0, 8))
        mem_y = np.concatenate(history_y)[-40:] if history_y else np.zeros(0)
        loss(s, t, y)
        # momentum 1: the anchors are this step's thresholds
        assert np.allclose(loss.student_anchor.numpy(), _expected_thresholds(s, y, mem_s, mem_y, loss.divisors))
        assert np.allclose(loss.teacher_anchor.numpy(), _expected_thresholds(t, y, mem_t, mem_y, loss.divisors))
        history_s.append(F.normalize(s, dim=1).numpy())
        history_t.append(F.normalize(t, dim=1).numpy())
        history_y.append(y.numpy())
    assert int((loss.memory_labels >= 0).sum()) == 40
    assert torch.allclose(loss.memory_student.norm(dim=1), torch.ones(40, dtype=loss.memory_student.dtype))


def test_memory_makes_low_fpr_anchors_deeper_than_the_hardest_batch_negative():
    plain = EKDLoss(momentum=1.0)
    memory = EKDLoss(memory_size=2048, student_dim=8, teacher_dim=8, momentum=1.0)
    for step in range(40):
        s, t, y = _batch(step, n=64)
        plain(s, t, y)
        memory(s, t, y)
    # a batch of 64 has ~1.9k negatives: its 1e-4 ... 1e-6 anchors are all the maximum
    assert len(set(plain.student_anchor[3:].tolist())) == 1
    assert memory.student_anchor[3] < memory.student_anchor[5]


def test_memory_off_by_default_and_loss_unchanged_at_first_step():
    s, t, y = _batch(0)
    a = EKDLoss()(s, t, y)
    b = EKDLoss(memory_size=16, student_dim=8, teacher_dim=8)
    assert "memory_student" not in EKDLoss().state_dict()
    # first step: empty memory, so the thresholds (and the loss) equal the batch-only ones
    for k, v in b(s, t, y).items():
        assert torch.allclose(v, a[k])


def test_memory_state_round_trips_through_state_dict():
    a = EKDLoss(memory_size=32, student_dim=8, teacher_dim=8)
    for step in range(3):
        a(*_batch(step))
    b = EKDLoss(memory_size=32, student_dim=8, teacher_dim=8)
    b.load_state_dict(a.state_dict())
    nxt = _batch(7)
    out_a, out_b = a(*nxt), b(*nxt)
    assert out_a.keys() == out_b.keys()
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_memory_errors_and_dims_from_the_trainer():
    with pytest.raises(ConfigError, match="memory_size > 0 needs student_dim"):
        build_distiller("ekd", memory_size=8)
    with pytest.raises(ConfigError, match="memory_size must be >= 0"):
        build_distiller("ekd", memory_size=-1)
    cfg = Config()
    cfg.model.embedding_size = 32
    cfg.distill = [DistillerConfig(name="ekd", params={"memory_size": 64})]
    (ekd,) = build_distillers(cfg, teacher_dim=128, num_classes=10)
    assert ekd.memory_student.shape == (64, 32) and ekd.memory_teacher.shape == (64, 128)


def test_one_identity_batch_with_empty_memory_is_finite():
    loss = EKDLoss(memory_size=8, student_dim=4, teacher_dim=4)
    out = loss(torch.randn(5, 4), torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert all(torch.isfinite(v) for v in out.values())
    assert int(loss.steps) == 0 and int((loss.memory_labels >= 0).sum()) == 5
