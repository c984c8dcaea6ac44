"""The tail-agreement measures of bench/ekd_tail_transfer.py on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

import bench.ekd_tail_transfer as T


def _pairs(n: int = 20000, seed: int = 0):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.05
    scores = rng.normal(size=n) + 2.0 * same
    return scores.astype(np.float32), same


def test_a_model_agrees_fully_with_itself():
    s, same = _pairs()
    got = T.tail_agreement(s, s, same)
    assert got["spearman_all"] == pytest.approx(1.0) and got["spearman_impostor"] == pytest.approx(1.0)
    assert got["tail_overlap@1e-3"] == 1.0 and got["tail_overlap@1e-4"] == 1.0
    assert got["reference_tail_percentile@1e-3"] > 99.9


def test_a_reversed_impostor_order_shares_no_tail():
    s, same = _pairs()
    t = s.copy()
    t[~same] = -s[~same]  # the teacher's hardest impostors are the student's easiest
    got = T.tail_agreement(s, t, same)
    assert got["spearman_impostor"] == pytest.approx(-1.0)
    assert got["spearman_genuine"] == pytest.approx(1.0)
    assert got["tail_overlap@1e-3"] == 0.0 and got["reference_tail_percentile@1e-3"] < 0.1


def test_independent_orders_overlap_at_chance():
    s, same = _pairs(200000)
    t, _ = _pairs(200000, seed=1)
    got = T.tail_agreement(s, t, same)
    assert abs(got["spearman_impostor"]) < 0.01
    assert got["tail_overlap@1e-3"] < 0.05  # chance: REFERENCE_HARD = 1%
    assert 40 < got["reference_tail_percentile@1e-3"] < 60
