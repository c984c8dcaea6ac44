"""EKDLoss against the authors' implementation (tests/data/testvectors/distill_reference.npz)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ekd.distill import EKDLoss, build_distiller


@pytest.fixture(scope="module")
def vectors(testvectors):
    path = testvectors / "distill_reference.npz"
    return dict(np.load(path))


def _cases(vectors) -> dict[str, int]:
    steps: dict[str, int] = {}
    for key in vectors:
        m = re.match(r"ekd/(\w+)/step(\d+)/loss", key)
        if m:
            steps[m.group(1)] = max(steps.get(m.group(1), -1), int(m.group(2))) + 0
    return {c: n + 1 for c, n in steps.items()}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def test_vectors_cover_all_cases(vectors):
    assert set(_cases(vectors)) >= {"small", "paper_batch", "large"}


@pytest.mark.parametrize("case", ["small", "paper_batch", "large"])
def test_ekd_matches_authors_over_consecutive_steps(vectors, case):
    n_steps = _cases(vectors)[case]
    assert n_steps >= 2
    loss_fn = EKDLoss().double()
    for step in range(n_steps):
        pre = f"ekd/{case}/step{step}/"
        student = torch.tensor(vectors[pre + "student"], requires_grad=True)
        teacher = torch.tensor(vectors[pre + "teacher"])
        labels = torch.tensor(vectors[pre + "labels"])
        terms = loss_fn(student, teacher, labels)
        loss = sum(terms.values())
        loss.backward()
        assert _rel(loss.detach().numpy(), vectors[pre + "loss"]) < 1e-8, (case, step)
        assert _rel(student.grad.numpy(), vectors[pre + "grad_student"]) < 1e-8, (case, step)
        assert _rel(loss_fn.student_anchor.numpy(), vectors[pre + "student_anchor_after"]) < 1e-8
        assert _rel(loss_fn.teacher_anchor.numpy(), vectors[pre + "teacher_anchor_after"]) < 1e-8


def test_every_case_in_the_vectors_is_tested(vectors):
    assert set(_cases(vectors)) == {"small", "paper_batch", "large"}


def test_registry_builds_ekd_with_paper_defaults():
    d = build_distiller("ekd")
    assert isinstance(d, EKDLoss)
    assert d.divisors == [10, 100, 1000, 10_000, 100_000, 1_000_000]
    assert (d.temperature, d.momentum, d.top_k, d.pos_weight, d.neg_weight) == (0.01, 0.01, 2000, 0.02, 0.01)


def test_weight_scales_every_term():
    torch.manual_seed(0)
    s, t = torch.randn(24, 8), torch.randn(24, 8)
    y = torch.arange(24) // 4
    a = EKDLoss()(s, t, y)
    b = EKDLoss(weight=3.0)(s, t, y)
    for k in a:
        assert torch.allclose(3 * a[k], b[k])


def test_no_positive_pair_is_finite():
    torch.manual_seed(0)
    s = torch.randn(16, 8, requires_grad=True)
    terms = EKDLoss()(s, torch.randn(16, 8), torch.arange(16))
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert terms["ekd_pos"].item() == 0.0


def test_fewer_negatives_than_top_k_and_single_identity_are_finite():
    torch.manual_seed(0)
    for labels in (torch.arange(6) // 2, torch.zeros(6, dtype=torch.long)):
        s = torch.randn(6, 8, requires_grad=True)
        loss = sum(EKDLoss(top_k=2000)(s, torch.randn(6, 8), labels).values())
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_student_equal_to_teacher_gives_zero_loss():
    torch.manual_seed(0)
    e = torch.randn(32, 16)
    terms = EKDLoss()(e, e.clone(), torch.arange(32) // 4)
    assert all(v.item() == pytest.approx(0.0, abs=1e-12) for v in terms.values())


def test_bias_correction_is_an_option_off_by_default():
    torch.manual_seed(0)
    s, t, y = torch.randn(32, 8), torch.randn(32, 8), torch.arange(32) // 4
    plain, corrected = EKDLoss(), EKDLoss(bias_correction=True)
    plain(s, t, y), corrected(s, t, y)
    sa, _ = corrected.anchors()
    # after one step the corrected anchor equals the raw threshold, the plain one 1% of it
    assert torch.allclose(sa, plain.student_anchor / 0.01)


def test_anchor_buffers_are_in_state_dict():
    keys = set(EKDLoss().state_dict())
    assert {"student_anchor", "teacher_anchor", "steps"} <= keys
