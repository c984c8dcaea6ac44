"""BalancedBatchSampler: composition, K per identity, determinism, ranks."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from ekd.data.sampler import BalancedBatchSampler
from ekd.errors import ConfigError


def _labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 12, size=60)  # some identities with 1..3 images (< K)
    return np.repeat(np.arange(60), counts)


def test_composition_and_k_per_identity():
    labels = _labels()
    s = BalancedBatchSampler(labels, random_size=16, identities_per_batch=6, samples_per_identity=4)
    batches = list(s)
    assert len(batches) == len(s) == len(labels) // 16
    for batch in batches:
        assert len(batch) == 16 + 6 * 4 == s.batch_size
        balanced = labels[batch[16:]]
        counts = Counter(balanced.tolist())
        assert len(counts) == 6 and set(counts.values()) == {4}
        # consecutive groups of K belong to one identity
        assert all(len(set(balanced[i:i + 4])) == 1 for i in range(0, 24, 4))


def test_without_replacement_when_identity_has_k_images():
    labels = _labels()
    s = BalancedBatchSampler(labels, random_size=8, identities_per_batch=5, samples_per_identity=4)
    big = {int(c) for c, n in zip(*np.unique(labels, return_counts=True)) if n >= 4}
    for batch in s:
        part = batch[8:]
        for i in range(0, len(part), 4):
            group = part[i:i + 4]
            if int(labels[group[0]]) in big:
                assert len(set(group)) == 4
            else:  # fewer than K images: every image appears
                n = int((labels == labels[group[0]]).sum())
                assert len(set(group)) == n


def test_identities_with_one_image_are_never_balanced_samples():
    labels = _labels()
    singles = {int(c) for c, n in zip(*np.unique(labels, return_counts=True)) if n == 1}
    s = BalancedBatchSampler(labels, random_size=8, identities_per_batch=5)
    for batch in s:
        assert not singles & set(labels[batch[8:]].tolist())


def test_random_part_visits_each_sample_once_per_epoch():
    labels = _labels()
    s = BalancedBatchSampler(labels, random_size=10, identities_per_batch=2)
    seen = [i for b in s for i in b[:10]]
    assert len(seen) == len(set(seen)) == len(s) * 10


def test_deterministic_and_epoch_dependent():
    labels = _labels()
    a = BalancedBatchSampler(labels, 16, 6, seed=3)
    b = BalancedBatchSampler(labels, 16, 6, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    c = BalancedBatchSampler(labels, 16, 6, seed=4)
    assert list(a) != list(c)


def test_ranks_have_disjoint_random_parts_and_distinct_batches():
    labels = _labels()
    ranks = [BalancedBatchSampler(labels, 8, 4, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(labels) // 16
    r0, r1 = (list(s) for s in ranks)
    assert not {i for b in r0 for i in b[:8]} & {i for b in r1 for i in b[:8]}
    assert all(x != y for x, y in zip(r0, r1))


def test_ranks_draw_different_identity_balanced_parts():
    """Each rank draws its own P x K part (its own RNG stream): identical parts on every rank
    would shrink the global batch's identities to one rank's P."""
    labels = _labels()
    for random_size in (8, 0):
        ranks = [BalancedBatchSampler(labels, random_size, 4, rank=r, world_size=2)
                 for r in range(2)]
        r0, r1 = (list(s) for s in ranks)
        assert len(r0) == len(r1) > 1
        for x, y in zip(r0, r1):
            assert x[random_size:] != y[random_size:]
            # and not merely reordered: the ranks' identity sets differ too
            assert set(labels[x[random_size:]].tolist()) != set(labels[y[random_size:]].tolist())


def test_errors_are_clear():
    labels = _labels()
    with pytest.raises(ConfigError, match="identities_per_batch"):
        BalancedBatchSampler(labels, 8, 1000)
    with pytest.raises(ConfigError, match="rank"):
        BalancedBatchSampler(labels, 8, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="smaller than one"):
        BalancedBatchSampler(np.repeat(np.arange(3), 2), 6, 1, world_size=2)


def test_runs_on_this_python_and_311_plus():
    # The authors' sampler calls random.sample on dict keys, a TypeError from Python 3.11 on.
    code = ("import numpy as np; from ekd.data.sampler import BalancedBatchSampler as B; "
            "s = B(np.repeat(np.arange(20), 5), 8, 4); print(sum(len(b) for b in s))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(BalancedBatchSampler(np.repeat(np.arange(20), 5), 8, 4)) * 24
    assert sys.version_info >= (3, 10)
