"""Tests of ekd.eval.metrics and ekd.eval.flip_embed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

from ekd.errors import DataError
from ekd.eval import (
    extract_embeddings,
    kfold_bounds,
    l2_normalize,
    roc_auc,
    roc_curve,
    threshold_at_fpr,
    tpr_at_fpr,
    verification_accuracy,
)

# --------------------------------------------------------------------------- verification


def _insightface_reference(e1: np.ndarray, e2: np.ndarray, issame: np.ndarray) -> list[float]:
    """A direct transcription of the protocol: loops over thresholds, sklearn's KFold."""
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(e1 - e2), 1)

    def acc(t: float, d: np.ndarray, s: np.ndarray) -> float:
        pred = np.less(d, t)
        tp = np.sum(pred & s)
        tn = np.sum(~pred & ~s)
        return float(tp + tn) / d.size

    out = []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(len(issame))):
        acc_train = np.array([acc(t, dist[train], issame[train]) for t in thresholds])
        best = thresholds[np.argmax(acc_train)]
        out.append(acc(best, dist[test], issame[test]))
    return out


def test_verification_accuracy_hand_case() -> None:
    # 20 pairs = 10 folds of (same at squared distance 1.0, different at 2.0); fold 0's
    # different pair is at 0.5 instead. Every fold's training folds prefer the smallest
    # threshold above 1.0 (1.01); fold 0 then gets 1/2 right, the others 2/2.
    e1 = np.zeros((20, 2))
    e2 = np.tile([[1.0, 0.0], [1.0, 1.0]], (10, 1))
    e2[1] = [0.5, 0.5]
    issame = np.tile([True, False], 10)
    r = verification_accuracy(e1, e2, issame)
    assert r["fold_accuracies"] == [0.5] + [1.0] * 9
    assert r["accuracy"] == pytest.approx(0.95, abs=1e-12)
    assert r["accuracy_std"] == pytest.approx(0.15, abs=1e-12)
    assert r["best_thresholds"] == pytest.approx([1.01] * 10)


@pytest.mark.parametrize("n", [60, 95, 1003])
def test_verification_accuracy_matches_reference(n: int) -> None:
    rng = np.random.default_rng(n)
    issame = rng.random(n) < 0.5
    e1 = l2_normalize(rng.standard_normal((n, 8)).astype(np.float32))
    noise = np.where(issame[:, None], 0.6, 3.0) * rng.standard_normal((n, 8))
    e2 = l2_normalize((e1 + noise).astype(np.float32))
    r = verification_accuracy(e1, e2, issame)
    ref = _insightface_reference(e1, e2, issame)
    assert r["fold_accuracies"] == pytest.approx(ref, abs=1e-12)
    assert r["accuracy"] == pytest.approx(np.mean(ref), abs=1e-12)
    assert r["accuracy_std"] == pytest.approx(np.std(ref), abs=1e-12)


def test_fold_sizes_contiguous_like_kfold() -> None:
    for n in (10, 23, 101, 6000, 7):
        k = min(10, n)
        ours = kfold_bounds(n, k)
        ref = [(int(t[0]), int(t[-1]) + 1) for _, t in KFold(n_splits=k).split(np.arange(n))]
        assert ours == ref
    assert [b - a for a, b in kfold_bounds(23, 10)] == [3, 3, 3] + [2] * 7
    r = verification_accuracy(np.zeros((23, 2)), np.ones((23, 2)), np.arange(23) % 2)
    assert len(r["fold_accuracies"]) == 10


def test_verification_accuracy_errors() -> None:
    with pytest.raises(DataError, match=r"\(5, 4\).*\(6, 4\)"):
        verification_accuracy(np.zeros((5, 4)), np.zeros((6, 4)), np.zeros(5, bool))
    with pytest.raises(DataError, match="issame"):
        verification_accuracy(np.zeros((5, 4)), np.zeros((5, 4)), np.zeros(4, bool))
    with pytest.raises(DataError, match="nfolds"):
        verification_accuracy(np.zeros((5, 4)), np.zeros((5, 4)), np.zeros(5, bool))
    with pytest.raises(DataError, match="0/1"):
        verification_accuracy(np.zeros((10, 4)), np.zeros((10, 4)), np.full(10, 2))


# --------------------------------------------------------------------------- ROC / TPR at FPR


def _sk_point(scores: np.ndarray, labels: np.ndarray, f: float) -> tuple[float, float]:
    fpr, tpr, thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    i = np.flatnonzero(fpr <= f)[-1]
    return float(tpr[i]), float(thr[i])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("decimals", [None, 2])
def test_tpr_at_fpr_matches_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    n = 30_000
    labels = rng.random(n) < [0.02, 0.3, 0.5, 0.9][seed]
    scores = rng.standard_normal(n) + 2.0 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties, also across classes
    scores = scores.astype(np.float32)
    n_neg = int((~labels).sum())
    fprs = (1.0, 0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    ours = tpr_at_fpr(scores, labels, fprs)
    assert list(ours) == list(fprs)
    for f in fprs:
        if n_neg < 1 / f:
            assert ours[f] is None
            assert threshold_at_fpr(scores, labels, f) is None
            continue
        tpr, thr = _sk_point(scores, labels, f)
        assert ours[f] == tpr, f
        assert threshold_at_fpr(scores, labels, f) == thr, f
    assert ours[1e-5] is None  # fewer than 100,000 negatives


def test_tpr_at_fpr_tie_group_at_boundary() -> None:
    # 10 negatives, 1 false positive allowed; the 2 negatives at 0.9 must both be excluded.
    neg = [0.9, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]
    pos = [0.95, 0.9, 0.8]
    scores = np.array(neg + pos, dtype=np.float32)
    labels = np.array([0] * 10 + [1] * 3)
    assert tpr_at_fpr(scores, labels, [0.1]) == {0.1: pytest.approx(1 / 3)}
    assert threshold_at_fpr(scores, labels, 0.1) == pytest.approx(0.95)
    assert tpr_at_fpr(scores, labels, [0.2])[0.2] == 1.0  # both 0.9 negatives allowed
    assert tpr_at_fpr(scores, labels, [0.05])[0.05] is None
    # The maximum score is a negative tie group: only the (0, 0) point remains.
    s2 = np.array([1.0, 1.0, 0.5, 0.2], dtype=np.float32)
    y2 = np.array([0, 0, 1, 1])
    assert tpr_at_fpr(s2, y2, [0.5])[0.5] == 0.0
    assert threshold_at_fpr(s2, y2, 0.5) == np.inf


def test_tpr_at_fpr_errors() -> None:
    with pytest.raises(DataError, match="both classes"):
        tpr_at_fpr(np.zeros(10), np.ones(10, bool))
    with pytest.raises(DataError, match="shape"):
        tpr_at_fpr(np.zeros(10), np.ones(9, bool))
    with pytest.raises(DataError, match="NaN"):
        tpr_at_fpr(np.array([np.nan, 1.0]), np.array([0, 1]))
    with pytest.raises(DataError, match=r"\(0, 1\]"):
        tpr_at_fpr(np.zeros(2), np.array([0, 1]), [0.0])


@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_curve_and_auc_match_sklearn(decimals: int | None) -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(2000) < 0.4
    scores = rng.standard_normal(2000) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_hand_case() -> None:
    # Positive/negative pairs: 1>0.5, 1>0, 0.5=0.5 (counts 1/2), 0.5>0 -> 3.5 / 4.
    assert roc_auc(np.array([1.0, 0.5, 0.5, 0.0]), np.array([1, 1, 0, 0])) == 0.875
    with pytest.raises(DataError, match="both classes"):
        roc_auc(np.array([1.0, 0.5]), np.array([1, 1]))


# --------------------------------------------------------------------------- embeddings


def test_l2_normalize_zero_rows() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 5, 6)
        self.bn = torch.nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.flatten(1)))


def test_extract_embeddings_flip_sum_and_modes() -> None:
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(7, 3, 4, 5)
    batches = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(3))]  # (images, labels) tuples
    model.train()
    model.bn.eval()  # a mixed state must come back as it was
    emb = extract_embeddings(model, batches)
    assert model.training and model.fc.training and not model.bn.training
    assert emb.dtype == np.float32 and emb.shape == (7, 6)

    model.eval()
    with torch.no_grad():
        ref = (model(x) + model(torch.flip(x, dims=[3]))).numpy()
    model.train()
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)

    plain = extract_embeddings(model, [x], flip=False, device="cpu")
    with torch.no_grad():
        ref2 = model.eval()(x).numpy()
    np.testing.assert_allclose(plain, ref2 / np.linalg.norm(ref2, axis=1, keepdims=True), atol=1e-6)
    assert not model.training  # was in eval mode before this call


def test_extract_embeddings_bad_input() -> None:
    model = _Tiny()
    with pytest.raises(DataError, match="batch 0"):
        extract_embeddings(model, [torch.zeros(3, 4, 5)])
    with pytest.raises(DataError, match="no batches"):
        extract_embeddings(model, [])
    assert model.training
