"""Bootstrap over *identities* of TPR at FPR on a verification pair set (e.g. LFW all-pairs).

Pairs that share an identity are not independent, so the resampling unit is the identity.

Scheme (one resample): draw the ``K`` identities with replacement, giving each identity ``a``
a count ``c_a`` (``multinomial(K, 1/K)``). A genuine pair of identity ``a`` enters with
multiplicity ``c_a``; an impostor pair of identities ``a != b`` with multiplicity ``c_a * c_b``
(every drawn copy of ``a`` against every drawn copy of ``b``). Pairs across two copies of the
same identity are not formed (they would repeat the same images). With every ``c_a = 1`` this
is the original pair set, and the TPR equals :func:`ekd.eval.metrics.tpr_at_fpr` exactly.

The TPR at FPR ``f`` is then the metric's own rule on the weighted pairs: with ``W`` the total
impostor weight and ``k`` the most false-positive weight allowed (``k / W <= f``), ``v`` is the
score where the cumulative impostor weight, from the top, first exceeds ``k``, and
TPR = weight of genuine pairs scoring ``> v`` / genuine weight.

Only the top of the impostor distribution can hold ``v``, so a :class:`PairTail` keeps every
genuine pair but only the ``tail_factor * max_fpr * n_neg`` highest impostor scores (with their
two identities); the total impostor weight of a resample comes from closed forms (all-pairs:
``n_a * n_b`` impostor pairs per identity pair) or from per-identity-pair counts. A resample
whose threshold falls below the stored tail raises :class:`DataError` (store a longer tail).

Runtime, measured on one (shared) CPU core at LFW all-pairs scale (6,720 images of 1,680
identities, 22.6M pairs, ``max_fpr = 1e-3``, ``tail_factor = 4``): the tail (90k impostors,
0.48 MB as compressed ``.npz``) takes 1.5 s to extract, 1,000 resamples at 3 FPRs take 11.5 s.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ekd.errors import DataError
from ekd.eval.metrics import kfold_bounds

__all__ = [
    "PairTail",
    "PairScores",
    "bootstrap_pair_metrics",
    "bootstrap_tpr",
    "identity_counts",
    "pair_weights",
    "weighted_auc",
    "weighted_fold_accuracy",
    "interval",
    "paired_difference",
    "verdict",
    "weighted_tpr_at_fpr",
]


@dataclass
class PairTail:
    """What the identity bootstrap needs from one model's scores on one pair set.

    ``neg_*``: the highest impostor scores (descending) and their identity codes; ``pos_*``:
    every genuine score and its identity; ``n_neg``: impostor pairs in all. Impostor totals
    per resample come from ``identity_sizes`` (all-pairs protocol) or, for a generic pair
    list, from ``block_a/block_b/block_n`` (impostor pairs per identity pair).
    """

    num_identities: int
    pos_scores: np.ndarray
    pos_ids: np.ndarray
    neg_scores: np.ndarray
    neg_a: np.ndarray
    neg_b: np.ndarray
    n_neg: int
    max_fpr: float
    identity_sizes: np.ndarray | None = None
    block_a: np.ndarray | None = None
    block_b: np.ndarray | None = None
    block_n: np.ndarray | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pairs(cls, scores: np.ndarray, same: np.ndarray, id1: np.ndarray, id2: np.ndarray,
                   max_fpr: float = 1e-3, tail_factor: float = 4.0) -> PairTail:
        """From any pair list: per-pair scores, genuine flags and both sides' identity codes
        (integers ``0..K-1``)."""
        s, y = _check(scores, same)
        a, b = np.asarray(id1, dtype=np.int64), np.asarray(id2, dtype=np.int64)
        if a.shape != s.shape or b.shape != s.shape:
            raise DataError(f"identity ids have shapes {a.shape}/{b.shape}, scores {s.shape}")
        if np.any(a[y] != b[y]):
            raise DataError("a genuine pair joins two different identity ids")
        if np.any(a[~y] == b[~y]):
            raise DataError("an impostor pair joins an identity id with itself")
        k = int(max(a.max(), b.max())) + 1
        lo, hi = np.minimum(a[~y], b[~y]), np.maximum(a[~y], b[~y])
        blocks, n = np.unique(lo * k + hi, return_counts=True)
        neg_idx = np.flatnonzero(~y)
        top = _top(s[neg_idx], _tail_size(neg_idx.size, max_fpr, tail_factor))
        pick = neg_idx[top]
        return cls(k, s[y], a[y], s[pick], a[pick], b[pick], int(neg_idx.size), float(max_fpr),
                   block_a=blocks // k, block_b=blocks % k, block_n=n)

    @classmethod
    def from_all_pairs(cls, scores: np.ndarray, same: np.ndarray, labels: np.ndarray,
                       max_fpr: float = 1e-3, tail_factor: float = 4.0) -> PairTail:
        """From :func:`ekd.eval.protocols.all_pairs_scores` output (pairs ``i < j`` of the
        images, row-major) and the images' identity labels; no per-pair id arrays are built."""
        s, y = _check(scores, same)
        codes = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)[1].reshape(-1)
        n = codes.size
        if s.size != n * (n - 1) // 2:
            raise DataError(f"{s.size} scores are not the all-pairs count of {n} images")
        sizes = np.bincount(codes)
        pos_idx = np.flatnonzero(y)
        masked = np.where(y, -np.inf, s)
        n_neg = s.size - pos_idx.size
        top = _top(masked, _tail_size(n_neg, max_fpr, tail_factor))
        i, j = _pair_rows(pos_idx, n)
        ti, tj = _pair_rows(top, n)
        if np.any(codes[i] != codes[j]) or np.any(codes[ti] == codes[tj]):
            raise DataError("genuine flags disagree with the identity labels")
        return cls(int(sizes.size), s[pos_idx], codes[i], s[top], codes[ti], codes[tj], int(n_neg),
                   float(max_fpr), identity_sizes=sizes)

    # -- storage -------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for ``np.savez_compressed`` (identity codes as uint16 where they fit)."""
        small = np.uint16 if self.num_identities <= 65535 else np.int64
        out = {"num_identities": np.array(self.num_identities), "n_neg": np.array(self.n_neg),
               "max_fpr": np.array(self.max_fpr), "pos_scores": self.pos_scores.astype(np.float32),
               "pos_ids": self.pos_ids.astype(small), "neg_scores": self.neg_scores.astype(np.float32),
               "neg_a": self.neg_a.astype(small), "neg_b": self.neg_b.astype(small)}
        for name in ("identity_sizes", "block_a", "block_b", "block_n"):
            if getattr(self, name) is not None:
                out[name] = np.asarray(getattr(self, name), dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict) -> PairTail:
        """Inverse of :meth:`to_arrays` (accepts an ``np.load`` result)."""
        get = {k: np.asarray(arrays[k]) for k in arrays}
        opt = {k: get[k].astype(np.int64) if k in get else None
               for k in ("identity_sizes", "block_a", "block_b", "block_n")}
        return cls(int(get["num_identities"]), get["pos_scores"].astype(np.float64),
                   get["pos_ids"].astype(np.int64), get["neg_scores"].astype(np.float64),
                   get["neg_a"].astype(np.int64), get["neg_b"].astype(np.int64), int(get["n_neg"]),
                   float(get["max_fpr"]), **opt)

    # -- weights -------------------------------------------------------------------------------
    def impostor_weight(self, counts: np.ndarray) -> np.ndarray:
        """Total impostor multiplicity of each resample (``counts``: ``[R, K]``)."""
        c = counts.astype(np.float64)
        if self.identity_sizes is not None:
            cn = c * self.identity_sizes[None, :]
            return 0.5 * (cn.sum(1) ** 2 - (cn ** 2).sum(1))
        return (c[:, self.block_a] * c[:, self.block_b]) @ self.block_n.astype(np.float64)


def identity_counts(num_identities: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, K]`` draw counts: each row draws the ``K`` identities with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_identities, np.full(num_identities, 1.0 / num_identities), size=resamples)


def weighted_tpr_at_fpr(tail: PairTail, counts: np.ndarray, fprs: Sequence[float]) -> np.ndarray:
    """``[R, len(fprs)]`` TPR of each resample (``counts``: ``[R, K]``), NaN where FPR ``f``
    cannot be measured (less than one false positive allowed)."""
    counts = np.atleast_2d(np.asarray(counts))
    if counts.shape[1] != tail.num_identities:
        raise DataError(f"counts have {counts.shape[1]} identities, the pair set {tail.num_identities}")
    c = counts.astype(np.float64)
    w_neg = c[:, tail.neg_a] * c[:, tail.neg_b]  # [R, N]
    cum = np.cumsum(w_neg, axis=1)
    total = tail.impostor_weight(counts)
    w_pos = c[:, tail.pos_ids]
    pos_total = w_pos.sum(1)
    out = np.full((counts.shape[0], len(fprs)), np.nan)
    for col, f in enumerate(fprs):
        if not 0 < f <= tail.max_fpr:
            raise DataError(f"FPR {f} is outside (0, {tail.max_fpr}] that this tail was stored for")
        k = _max_false_positives(float(f), total)
        if np.any((k >= 1) & (cum[:, -1] <= k)):
            raise DataError(f"a resample's threshold at FPR {f} lies below the {tail.neg_scores.size} "
                            "stored impostor scores; store a longer tail (tail_factor)")
        j = (cum <= k[:, None]).sum(1).clip(max=cum.shape[1] - 1)  # first index with cum > k
        v = tail.neg_scores[j]
        tpr = (w_pos * (tail.pos_scores[None, :] > v[:, None])).sum(1) / np.maximum(pos_total, 1e-300)
        out[:, col] = np.where((k >= 1) & (pos_total > 0), tpr, np.nan)
    return out


def bootstrap_tpr(tail: PairTail, fprs: Sequence[float], resamples: int = 1000, seed: int = 0,
                  chunk: int = 64) -> np.ndarray:
    """``[resamples, len(fprs)]`` TPRs over identity resamples (``seed`` fixes the draws, so two
    models on the same pair set get the same resamples)."""
    counts = identity_counts(tail.num_identities, resamples, seed)
    return np.concatenate([weighted_tpr_at_fpr(tail, counts[i:i + chunk], fprs)
                           for i in range(0, resamples, chunk)])


def paired_difference(a: PairTail, b: PairTail, fprs: Sequence[float], resamples: int = 1000,
                      seed: int = 0) -> np.ndarray:
    """``[resamples, len(fprs)]`` of TPR(a) - TPR(b) on the same identity resamples."""
    same_set = a.num_identities == b.num_identities and a.n_neg == b.n_neg and \
        (a.identity_sizes is None) == (b.identity_sizes is None) and \
        (a.identity_sizes is None or np.array_equal(a.identity_sizes, b.identity_sizes))
    if not same_set:
        raise DataError("paired difference needs both models scored on the same pair set")
    return bootstrap_tpr(a, fprs, resamples, seed) - bootstrap_tpr(b, fprs, resamples, seed)


def interval(samples: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile interval ``[..., 2]`` (low, high) over axis 0; NaN samples are ignored (an
    all-NaN column, an FPR no resample could measure, gives NaN without a warning)."""
    tail = 50.0 * (1.0 - level)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        return np.moveaxis(np.nanpercentile(samples, [tail, 100.0 - tail], axis=0), 0, -1)


def verdict(low: float, high: float) -> str:
    """A paired difference's interval ``[low, high]`` in words: ``better`` (above 0), ``worse``
    (below 0), ``within noise`` (holds 0) or ``not measurable`` (NaN: too few impostors)."""
    if np.isnan(low) or np.isnan(high):
        return "not measurable"
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


# -- accuracy and AUC of a pair list ------------------------------------------------------------
@dataclass
class PairScores:
    """One model's scores on every pair of a pair list (LFW View-2, CFP, a user's list), with
    the pairs' identity codes: what the identity bootstrap of accuracy and AUC needs.

    ``scores``: cosine similarities; ``distances``: squared L2 distances as
    :func:`ekd.eval.metrics.verification_accuracy` computes them; ``id1``/``id2``: identity
    codes ``0..K-1`` of both sides; ``nfolds``: the accuracy protocol's folds.
    """

    scores: np.ndarray
    distances: np.ndarray
    same: np.ndarray
    id1: np.ndarray
    id2: np.ndarray
    nfolds: int = 10

    @property
    def num_identities(self) -> int:
        return int(max(self.id1.max(), self.id2.max())) + 1


def pair_weights(counts: np.ndarray, id1: np.ndarray, id2: np.ndarray, same: np.ndarray) -> np.ndarray:
    """``[R, n]`` multiplicity of every pair in each resample (``counts``: ``[R, K]``): the
    scheme of this module, ``c_a`` for a genuine pair of identity ``a``, ``c_a * c_b`` for an
    impostor pair."""
    c = np.atleast_2d(np.asarray(counts)).astype(np.float64)
    return np.where(np.asarray(same, dtype=bool)[None, :], c[:, id1], c[:, id1] * c[:, id2])


def weighted_auc(scores: np.ndarray, same: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[R]`` AUC of weighted pairs: :func:`ekd.eval.metrics.roc_auc`'s Mann-Whitney statistic
    ``P(pos > neg) + P(pos == neg) / 2`` with every pair counted ``weights[r]`` times (equal to it
    for unit weights). NaN where a resample has no genuine or no impostor weight."""
    s, y = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(same, dtype=bool).reshape(-1)
    w = np.atleast_2d(weights)
    order = np.argsort(s[~y], kind="stable")
    neg = s[~y][order]
    cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w[:, ~y][:, order], axis=1)], axis=1)
    below = np.searchsorted(neg, s[y], side="left")
    upto = np.searchsorted(neg, s[y], side="right")
    w_pos = w[:, y]
    wins = (w_pos * cum[:, below]).sum(1)
    ties = (w_pos * (cum[:, upto] - cum[:, below])).sum(1)
    total = w_pos.sum(1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (wins + 0.5 * ties) / total, np.nan)


def weighted_fold_accuracy(distances: np.ndarray, same: np.ndarray, weights: np.ndarray,
                           nfolds: int = 10) -> np.ndarray:
    """``[R]`` accuracy of weighted pairs under the protocol of
    :func:`ekd.eval.metrics.verification_accuracy` (InsightFace's ``verification.py``): the
    same contiguous folds and threshold grid, the threshold of most correct weight on the other
    folds (ties: the smallest), the mean of the held-out folds' accuracies; equal to it for unit
    weights. A fold a resample gives no weight is left out of its mean."""
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    y = np.asarray(same, dtype=bool).reshape(-1)
    w = np.atleast_2d(weights)
    thresholds = np.arange(0, 4, 0.01)
    bounds = kfold_bounds(d.size, nfolds)
    correct = np.empty((len(bounds), w.shape[0], thresholds.size))
    fold_weight = np.empty((len(bounds), w.shape[0]))
    for k, (a, b) in enumerate(bounds):
        parts = []
        for genuine in (True, False):
            mask = np.flatnonzero(y[a:b] == genuine) + a
            order = mask[np.argsort(d[mask], kind="stable")]
            cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w[:, order], axis=1)], axis=1)
            below = cum[:, np.searchsorted(d[order], thresholds, side="left")]  # weight with d < t
            parts.append(below if genuine else cum[:, -1:] - below)  # TP, then TN
        correct[k] = parts[0] + parts[1]
        fold_weight[k] = w[:, a:b].sum(1)
    total = correct.sum(0)
    accs = np.full((len(bounds), w.shape[0]), np.nan)
    rows = np.arange(w.shape[0])
    for k in range(len(bounds)):
        train = total - correct[k] if len(bounds) > 1 else total
        best = np.argmax(train, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            accs[k] = np.where(fold_weight[k] > 0, correct[k][rows, best] / fold_weight[k], np.nan)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        return np.nanmean(accs, axis=0)


def bootstrap_pair_metrics(pairs: PairScores, resamples: int = 1000, seed: int = 0,
                           chunk: int = 64) -> dict[str, np.ndarray]:
    """``{"accuracy": [R], "auc": [R]}`` over identity resamples of a pair list (the draws of
    :func:`bootstrap_tpr` for the same ``seed`` and identity count, so two models -- and their
    TPRs -- share them)."""
    counts = identity_counts(pairs.num_identities, resamples, seed)
    acc, auc = [], []
    for i in range(0, resamples, chunk):
        w = pair_weights(counts[i:i + chunk], pairs.id1, pairs.id2, pairs.same)
        acc.append(weighted_fold_accuracy(pairs.distances, pairs.same, w, pairs.nfolds))
        auc.append(weighted_auc(pairs.scores, pairs.same, w))
    return {"accuracy": np.concatenate(acc), "auc": np.concatenate(auc)}


# -- helpers ------------------------------------------------------------------------------------
def _check(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores).reshape(-1), np.asarray(same).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise DataError(f"{s.size} scores but {y.size} genuine flags")
    if not y.any() or y.all():
        raise DataError("the identity bootstrap needs both genuine and impostor pairs")
    if not np.all(np.isfinite(s)):
        raise DataError("scores contain NaN or inf")
    return s.astype(np.float64) if s.dtype != np.float32 else s, y


def _tail_size(n_neg: int, max_fpr: float, factor: float) -> int:
    if not 0 < max_fpr <= 1 or factor < 1:
        raise DataError(f"max_fpr must lie in (0, 1] and tail_factor be >= 1, got {max_fpr}, {factor}")
    return int(min(n_neg, np.ceil(factor * max_fpr * n_neg) + 1))


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values, by descending value (ties by index)."""
    idx = np.argpartition(-values, n - 1)[:n] if n < values.size else np.arange(values.size)
    return idx[np.lexsort((idx, -values[idx]))]


def _pair_rows(flat: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j)`` of row-major upper-triangle pair indices over ``n`` items."""
    starts = np.concatenate([[0], np.cumsum(np.arange(n - 1, 0, -1))])
    i = np.searchsorted(starts, flat, side="right") - 1
    return i, flat - starts[i] + i + 1


def _max_false_positives(f: float, total: np.ndarray) -> np.ndarray:
    """Vectorised :func:`ekd.eval.metrics.max_false_positives` for weighted totals."""
    k = np.floor(f * total)
    k = np.where((k + 1) / np.maximum(total, 1) <= f, k + 1, k)
    return np.where((k > 0) & (k / np.maximum(total, 1) > f), k - 1, k)
