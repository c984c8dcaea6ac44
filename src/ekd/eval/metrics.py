"""Face-verification metrics (numpy only).

Protocols implemented:

* :func:`verification_accuracy` -- the 10-fold verification accuracy of InsightFace's
  ``recognition/arcface_torch/eval/verification.py`` (``calculate_roc`` / ``calculate_accuracy``),
  as used for LFW View-2, CFP-FF/FP, AgeDB-30: squared L2 distance between L2-normalised
  embeddings, thresholds ``np.arange(0, 4, 0.01)``, contiguous folds (scikit-learn ``KFold``
  without shuffling), best threshold chosen on the other folds, accuracy on the held-out fold.
* :func:`roc_curve`, :func:`roc_auc` -- the ROC curve over distinct score thresholds
  (decision "same" if ``score >= threshold``), the same points as scikit-learn's
  ``roc_curve(..., drop_intermediate=False)``.
* :func:`tpr_at_fpr`, :func:`threshold_at_fpr` -- TPR at FPR (the IJB-B/C and all-pairs
  "TAR at FAR" figure): the TPR of the ROC point with the largest FPR that does not exceed
  the target, computed in linear time with :func:`numpy.partition` so that 20M+ scores take
  well under a second per target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ekd.errors import DataError

__all__ = [
    "l2_normalize",
    "verification_accuracy",
    "kfold_bounds",
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "threshold_at_fpr",
    "DEFAULT_FPRS",
]

#: The FPR targets reported by default.
DEFAULT_FPRS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Divide each row (vector along ``axis``) by its L2 norm; all-zero rows stay zero.

    Floating inputs keep their dtype, other inputs become float64.
    """
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    norm = np.linalg.norm(arr, axis=axis, keepdims=True)
    safe = np.where(norm > 0, norm, 1).astype(arr.dtype, copy=False)
    return arr / safe


def kfold_bounds(n: int, nfolds: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` folds of scikit-learn's ``KFold(nfolds, shuffle=False)``.

    Every fold has ``n // nfolds`` items and the first ``n % nfolds`` folds one more.
    """
    if nfolds < 1:
        raise DataError(f"nfolds must be >= 1, got {nfolds}")
    if nfolds > n:
        raise DataError(f"nfolds={nfolds} is larger than the number of pairs ({n})")
    sizes = np.full(nfolds, n // nfolds, dtype=np.int64)
    sizes[: n % nfolds] += 1
    stops = np.cumsum(sizes)
    starts = stops - sizes
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _as_bool_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype == np.bool_:
        return y
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{name} must be boolean or 0/1, got dtype {y.dtype}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise DataError(f"{name} must contain only 0/1 (or True/False)")
    return y.astype(bool)


def verification_accuracy(
    emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray, nfolds: int = 10
) -> dict:
    """K-fold verification accuracy, as InsightFace's ``eval/verification.py``.

    ``emb1[i]`` and ``emb2[i]`` are the (already L2-normalised) embeddings of pair ``i``;
    ``issame[i]`` says whether it is a genuine pair. The distance is the squared L2 distance
    ``sum((emb1 - emb2) ** 2, axis=1)``, computed in the embeddings' dtype, and a pair is
    predicted "same" when ``dist < threshold`` for ``threshold`` in ``np.arange(0, 4, 0.01)``.
    The pairs are split into ``nfolds`` contiguous folds (sizes as ``KFold(shuffle=False)``;
    ``nfolds=1`` uses all pairs for both choosing and testing, as InsightFace's ``LFold``).
    For each fold the threshold of best accuracy ``(TP + TN) / n`` on the other folds is
    chosen (ties: the smallest threshold, as ``np.argmax``) and the accuracy of that threshold
    on the held-out fold is recorded.

    Returns ``{"accuracy": mean, "accuracy_std": std (ddof 0), "fold_accuracies": [...],
    "best_thresholds": [...]}``.
    """
    e1 = np.asarray(emb1)
    e2 = np.asarray(emb2)
    same = _as_bool_labels(issame, "issame")
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise DataError(
            f"emb1 and emb2 must be 2-D arrays of the same shape, got {e1.shape} and {e2.shape}"
        )
    if same.shape[0] != e1.shape[0]:
        raise DataError(
            f"issame has {same.shape[0]} entries but the embeddings have {e1.shape[0]} rows "
            f"(shapes {same.shape} and {e1.shape})"
        )
    n = e1.shape[0]
    bounds = kfold_bounds(n, nfolds)
    if not np.issubdtype(e1.dtype, np.floating):
        e1 = e1.astype(np.float64)
    if not np.issubdtype(e2.dtype, np.floating):
        e2 = e2.astype(np.float64)
    dist = np.sum(np.square(np.subtract(e1, e2)), axis=1)
    if not np.isfinite(dist).all():
        raise DataError("embeddings contain NaN or infinite values")
    # Compare in float64 against the float64 threshold grid (exact, as np.less under NEP 50).
    dist = dist.astype(np.float64)
    thresholds = np.arange(0, 4, 0.01)

    # correct[k, t] = TP + TN of fold k at threshold t, via sorted distances (O(n log n)).
    correct = np.empty((len(bounds), thresholds.size), dtype=np.int64)
    for k, (a, b) in enumerate(bounds):
        d, s = dist[a:b], same[a:b]
        d_same = np.sort(d[s])
        d_diff = np.sort(d[~s])
        tp = np.searchsorted(d_same, thresholds, side="left")  # same pairs with d < t
        fp = np.searchsorted(d_diff, thresholds, side="left")  # different pairs with d < t
        correct[k] = tp + (d_diff.size - fp)

    total = correct.sum(axis=0)
    accs: list[float] = []
    best: list[float] = []
    for k, (a, b) in enumerate(bounds):
        train_correct = total - correct[k] if len(bounds) > 1 else total
        idx = int(np.argmax(train_correct))  # same argmax as over (TP+TN)/n_train
        best.append(float(thresholds[idx]))
        accs.append(float(correct[k, idx]) / (b - a))
    acc = np.asarray(accs)
    return {
        "accuracy": float(acc.mean()),
        "accuracy_std": float(acc.std()),
        "fold_accuracies": accs,
        "best_thresholds": best,
    }


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise DataError(f"scores must be 1-D, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    y = _as_bool_labels(labels)
    if y.shape != s.shape:
        raise DataError(f"scores and labels differ in shape: {s.shape} vs {y.shape}")
    if np.isnan(s).any():
        raise DataError("scores contain NaN")
    return s, y


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative scores, each sorted ascending (np.sort: fast, no argsort)."""
    s, y = _check_scores_labels(scores, labels)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if pos.size == 0 or neg.size == 0:
        raise DataError(
            f"ROC needs both classes, got {pos.size} positives and {neg.size} negatives"
        )
    return pos, neg


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve over the distinct score thresholds (higher score = more similar).

    Returns ``(fpr, tpr, thresholds)`` with thresholds in decreasing order; point ``i`` is the
    decision "same" if ``score >= thresholds[i]``. The first point is ``(0, 0)`` at threshold
    ``+inf``. Every distinct score gives a point (scikit-learn's ``drop_intermediate=False``).
    Needs at least one positive and one negative label.
    """
    pos, neg = _split_sorted(scores, labels)
    thr = np.unique(np.concatenate([pos, neg]))  # ascending keys: fastest searchsorted
    tps = (pos.size - np.searchsorted(pos, thr, side="left"))[::-1]  # positives >= threshold
    fps = (neg.size - np.searchsorted(neg, thr, side="left"))[::-1]
    thr = thr[::-1]
    fpr = np.r_[0.0, fps / neg.size]
    tpr = np.r_[0.0, tps / pos.size]
    return fpr, tpr, np.r_[np.inf, thr.astype(np.float64)]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under :func:`roc_curve` (trapezoidal rule, so a tied positive/negative counts 1/2).

    Computed as the equal Mann-Whitney statistic ``P(pos > neg) + P(pos == neg) / 2`` from the
    two sorted classes, in exact integer counts.
    """
    pos, neg = _split_sorted(scores, labels)
    below = np.searchsorted(neg, pos, side="left")  # negatives < p, for every positive p
    upto = np.searchsorted(neg, pos, side="right")  # negatives <= p
    wins = int(np.sum(below, dtype=np.int64))
    ties = int(np.sum(upto - below, dtype=np.int64))
    return (2 * wins + ties) / (2 * pos.size * neg.size)


def max_false_positives(fpr: float, n_neg: int) -> int:
    """Largest integer ``k`` with ``k / n_neg <= fpr`` in floating point (as an ROC's FPR)."""
    k = min(int(math.floor(fpr * n_neg)), n_neg)
    while k < n_neg and (k + 1) / n_neg <= fpr:
        k += 1
    while k > 0 and k / n_neg > fpr:
        k -= 1
    return k


def _points_at_fprs(
    scores: np.ndarray, labels: np.ndarray, fprs: Sequence[float]
) -> list[tuple[float, float] | None]:
    """``(tpr, threshold)`` of the ROC point with the largest FPR <= f, for each target f.

    With ``k`` the most false positives allowed and ``v`` the ``(k+1)``-th largest negative
    score, a threshold ``t`` keeps FP <= k exactly when ``t > v`` (a tie group at ``v`` cannot
    be split), so the chosen point is the smallest score above ``v``: TPR = #(pos > v) / n_pos.
    ``None`` where fewer than ``1 / f`` negatives exist (k = 0: that FPR cannot be measured).
    """
    s, y = _check_scores_labels(scores, labels)
    targets = [float(f) for f in fprs]
    for f in targets:
        if not (0.0 < f <= 1.0):
            raise DataError(f"FPR targets must lie in (0, 1], got {f}")
    neg = s[~y]
    pos = s[y]
    n_neg, n_pos = neg.size, pos.size
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"TPR at FPR needs both classes, got {n_pos} positives and {n_neg} negatives"
        )
    ks = [max_false_positives(f, n_neg) for f in targets]
    # Ascending index of the (k+1)-th largest negative, for every target that needs one.
    kth = sorted({n_neg - k - 1 for k in ks if 1 <= k < n_neg})
    part = np.partition(neg, kth) if kth else neg
    out: list[tuple[float, float] | None] = []
    for k in ks:
        if k < 1:
            out.append(None)
        elif k >= n_neg:  # every negative may be accepted: the last ROC point
            out.append((1.0, float(min(pos.min(), neg.min()))))
        else:
            i = n_neg - k - 1
            v = part[i]
            above_pos = pos[pos > v]
            above_neg = part[i + 1 :]
            above_neg = above_neg[above_neg > v]
            candidates = [a.min() for a in (above_pos, above_neg) if a.size]
            thr = float(min(candidates)) if candidates else math.inf
            out.append((above_pos.size / n_pos, thr))
    return out


def tpr_at_fpr(
    scores: np.ndarray, labels: np.ndarray, fprs: Sequence[float] = DEFAULT_FPRS
) -> dict[float, float | None]:
    """TPR at each FPR target: the TPR of the ROC point with the largest FPR <= f.

    Decision "same" if ``score >= threshold`` over the distinct score thresholds, exactly as
    scikit-learn's ``roc_curve``; computed without a full sort (one ``np.partition`` of the
    negative scores). A target gets ``None`` ("n/a") when there are fewer than ``1 / f``
    negatives, since such an FPR cannot be measured.
    """
    fprs = tuple(fprs)
    points = _points_at_fprs(scores, labels, fprs)
    return {float(f): (None if p is None else p[0]) for f, p in zip(fprs, points)}


def threshold_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float | None:
    """The score threshold of the point used by :func:`tpr_at_fpr` (accept if ``score >= t``).

    ``math.inf`` when no threshold other than rejecting everything meets the target;
    ``None`` when there are fewer than ``1 / fpr`` negatives.
    """
    p = _points_at_fprs(scores, labels, [fpr])[0]
    return None if p is None else p[1]
