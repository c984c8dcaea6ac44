"""Identity bootstrap of TPR at FPR (ekd.eval.bootstrap): known answers, the metric it must
reproduce without resampling, paired differences and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from ekd.errors import DataError
from ekd.eval.bootstrap import (PairTail, bootstrap_tpr, identity_counts, interval,
                                paired_difference, weighted_tpr_at_fpr)
from ekd.eval.metrics import tpr_at_fpr
from ekd.eval.protocols import all_pairs_scores

FPRS = (1e-1, 1e-2, 1e-3)


def _embeddings(n_ids: int = 40, per_id: int = 5, dim: int = 8, noise: float = 1.2, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    emb = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


def _tail(emb, labels, **kw) -> tuple[PairTail, np.ndarray, np.ndarray]:
    scores, same = all_pairs_scores(emb, labels)
    return PairTail.from_all_pairs(scores, same, labels, **kw), scores, same


def test_unit_counts_reproduce_tpr_at_fpr_including_ties() -> None:
    emb, labels = _embeddings()
    scores, same = all_pairs_scores(emb, labels)
    scores = np.round(scores, 2)  # many ties
    tail = PairTail.from_all_pairs(scores, same, labels, max_fpr=0.1)
    got = weighted_tpr_at_fpr(tail, np.ones((1, 40), dtype=int), FPRS)[0]
    ref = tpr_at_fpr(scores, same, FPRS)
    np.testing.assert_allclose(got, [ref[f] for f in FPRS], rtol=0, atol=1e-12)


def test_generic_pair_list_matches_the_all_pairs_form() -> None:
    emb, labels = _embeddings(n_ids=12, per_id=4)
    scores, same = all_pairs_scores(emb, labels)
    i, j = np.triu_indices(labels.size, 1)
    generic = PairTail.from_pairs(scores, same, labels[i], labels[j], max_fpr=0.1)
    allp = PairTail.from_all_pairs(scores, same, labels, max_fpr=0.1)
    counts = identity_counts(12, 50, seed=3)
    np.testing.assert_allclose(generic.impostor_weight(counts), allp.impostor_weight(counts))
    np.testing.assert_allclose(weighted_tpr_at_fpr(generic, counts, FPRS), weighted_tpr_at_fpr(allp, counts, FPRS))


def test_impostor_weight_is_the_count_of_impostor_pairs_of_the_resampled_set() -> None:
    sizes = np.array([2, 3, 1, 4])
    labels = np.repeat(np.arange(4), sizes)
    counts = np.array([[2, 0, 1, 1]])
    # brute force: build the resampled image set, count pairs of different identity copies
    copies = [(a, c) for a in range(4) for c in range(counts[0, a])]
    brute = sum(sizes[a] * sizes[b] for x, (a, _) in enumerate(copies) for (b, _) in copies[x + 1:] if a != b)
    scores, same = all_pairs_scores(_embeddings(4, 1)[0][labels], labels)
    tail = PairTail.from_all_pairs(scores, same, labels, max_fpr=1.0)
    assert tail.impostor_weight(counts)[0] == brute


def test_separable_scores_give_a_zero_width_interval() -> None:
    emb, labels = _embeddings(noise=0.01)  # genuine ~1, impostors far below
    tail, *_ = _tail(emb, labels, max_fpr=0.01, tail_factor=100)  # impostors cluster by identity pair
    lo_hi = interval(bootstrap_tpr(tail, (1e-2, 1e-3), resamples=200, seed=1))
    np.testing.assert_array_equal(lo_hi, [[1.0, 1.0], [1.0, 1.0]])


def test_tpr_distribution_of_a_binomial_construction() -> None:
    """K identities of 2 images; impostors all score 0.5; half the identities' genuine pair
    scores 1, the other half 0. Then TPR = (draws of the first half) / K ~ Binomial(K, 1/2) / K."""
    k = 100
    labels = np.repeat(np.arange(k), 2)
    i, j = np.triu_indices(2 * k, 1)
    same = labels[i] == labels[j]
    scores = np.where(same, np.where(labels[i] < k // 2, 1.0, 0.0), 0.5)
    # the impostors are one tie group, so the whole of it is stored
    tail = PairTail.from_all_pairs(scores, same, labels, max_fpr=1e-3, tail_factor=1000)
    tpr = bootstrap_tpr(tail, (1e-3,), resamples=1000, seed=0)[:, 0]
    assert abs(tpr.mean() - 0.5) < 3 * np.sqrt(0.25 / k / 1000)
    assert abs(tpr.std() / np.sqrt(0.25 / k) - 1) < 0.1
    lo, hi = interval(tpr[:, None])[0]
    assert lo == pytest.approx(0.5 - 1.96 * np.sqrt(0.25 / k), abs=0.02)
    assert hi == pytest.approx(0.5 + 1.96 * np.sqrt(0.25 / k), abs=0.02)


def test_paired_difference_of_identical_models_is_exactly_zero_and_of_better_model_positive() -> None:
    emb, labels = _embeddings()
    tail, *_ = _tail(emb, labels, max_fpr=0.1)
    d = paired_difference(tail, tail, FPRS, resamples=100, seed=5)
    np.testing.assert_array_equal(interval(d), np.zeros((3, 2)))
    better = emb.copy()
    centres = np.stack([emb[labels == a].mean(0) for a in range(40)])
    better = better + 2 * centres[labels]
    better /= np.linalg.norm(better, axis=1, keepdims=True)
    good, *_ = _tail(better, labels, max_fpr=0.1)
    assert np.all(interval(paired_difference(good, tail, (0.1,), resamples=200))[:, 0] > 0)


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    emb, labels = _embeddings()
    tail, *_ = _tail(emb, labels, max_fpr=0.1)
    a = bootstrap_tpr(tail, FPRS, resamples=50, seed=7)
    np.testing.assert_array_equal(a, bootstrap_tpr(tail, FPRS, resamples=50, seed=7, chunk=7))
    assert not np.array_equal(a, bootstrap_tpr(tail, FPRS, resamples=50, seed=8))


def test_round_trip_through_arrays_and_clear_errors(tmp_path) -> None:
    emb, labels = _embeddings()
    tail, scores, same = _tail(emb, labels, max_fpr=0.1)
    np.savez_compressed(tmp_path / "t.npz", **tail.to_arrays())
    back = PairTail.from_arrays(np.load(tmp_path / "t.npz"))
    np.testing.assert_array_equal(bootstrap_tpr(back, FPRS, 20), bootstrap_tpr(tail, FPRS, 20))
    with pytest.raises(DataError, match="outside"):
        bootstrap_tpr(tail, (0.5,), 5)
    short = PairTail.from_all_pairs(scores, same, labels, max_fpr=0.1, tail_factor=1.0)
    with pytest.raises(DataError, match="longer tail"):
        bootstrap_tpr(short, (0.1,), 200)
    with pytest.raises(DataError, match="all-pairs count"):
        PairTail.from_all_pairs(scores[:-1], same[:-1], labels)
    with pytest.raises(DataError, match="genuine"):
        PairTail.from_all_pairs(scores, ~same, labels)


# -- accuracy and AUC of a pair list (ekd compare) ------------------------------------------------
def _pair_list(seed: int, n: int = 500, identities: int = 50):
    from ekd.eval.bootstrap import PairScores

    rng = np.random.default_rng(seed)
    id1 = rng.integers(0, identities, n)
    same = rng.random(n) < 0.5
    id2 = np.where(same, id1, (id1 + rng.integers(1, identities, n)) % identities)
    e1 = rng.standard_normal((n, 8))
    e2 = np.where(same[:, None], e1 + 0.9 * rng.standard_normal((n, 8)), rng.standard_normal((n, 8)))
    e1, e2 = ((e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32) for e in (e1, e2))
    e2[:20] = e1[:20]  # exact ties at distance 0 / score 1
    pairs = PairScores(np.sum(e1 * e2, axis=1), np.sum(np.square(np.subtract(e1, e2)), axis=1),
                       same, id1, id2)
    return pairs, e1, e2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_weights_reproduce_the_protocol_accuracy_and_auc_exactly(seed: int) -> None:
    from ekd.eval.bootstrap import weighted_auc, weighted_fold_accuracy
    from ekd.eval.metrics import roc_auc, verification_accuracy

    pairs, e1, e2 = _pair_list(seed)
    ones = np.ones((1, pairs.same.size))
    assert weighted_fold_accuracy(pairs.distances, pairs.same, ones)[0] == \
        verification_accuracy(e1, e2, pairs.same)["accuracy"]
    assert weighted_auc(pairs.scores, pairs.same, ones)[0] == roc_auc(pairs.scores, pairs.same)


def test_weighted_auc_equals_the_auc_of_the_repeated_pairs() -> None:
    from ekd.eval.bootstrap import pair_weights, weighted_auc
    from ekd.eval.metrics import roc_auc

    pairs, _, _ = _pair_list(3)
    counts = identity_counts(pairs.num_identities, 4, seed=7)
    weights = pair_weights(counts, pairs.id1, pairs.id2, pairs.same)
    got = weighted_auc(pairs.scores, pairs.same, weights)
    for r in range(4):
        times = weights[r].astype(np.int64)
        expected = roc_auc(np.repeat(pairs.scores, times), np.repeat(pairs.same, times))
        assert got[r] == pytest.approx(expected, abs=1e-12)


def test_pair_metrics_of_identical_models_have_zero_difference_and_a_better_model_wins() -> None:
    from dataclasses import replace

    from ekd.eval.bootstrap import bootstrap_pair_metrics

    pairs, _, _ = _pair_list(4)
    same_draws = [bootstrap_pair_metrics(pairs, 200, seed=3) for _ in range(2)]
    assert all(np.array_equal(same_draws[0][m], same_draws[1][m]) for m in ("accuracy", "auc"))
    better = replace(pairs, scores=np.where(pairs.same, 1.0, pairs.scores - 0.5),
                     distances=np.where(pairs.same, 0.0, pairs.distances + 1.0))
    drawn = bootstrap_pair_metrics(better, 200, seed=3)
    for metric in ("accuracy", "auc"):
        low, high = interval(drawn[metric] - same_draws[0][metric])
        assert low > 0, metric
