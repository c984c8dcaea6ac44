"""The demo's EKD vs no-KD comparison: gap closed, seed spread and the noise verdict."""

from __future__ import annotations

import pytest

from ekd.commands.demo_report import (BETTER, NOISE, WORSE, compare, comparison_table,
                                    comparisons_from_results, summary)
from ekd.errors import EkdError


def test_gap_closed_and_better_when_difference_exceeds_spread():
    row = compare("m", teacher=0.9, nokd=[0.5, 0.6], distilled=[0.7, 0.75])
    assert row.nokd_mean == pytest.approx(0.55)
    assert row.distilled_mean == pytest.approx(0.725)
    assert row.spread == pytest.approx(0.1)  # no-KD range 0.1 > EKD range 0.05
    assert row.gap_closed == pytest.approx(0.175 / 0.35)
    assert row.verdict == BETTER


def test_within_noise_when_difference_is_at_most_the_spread():
    row = compare("m", teacher=0.9, nokd=[0.5, 0.6], distilled=[0.6, 0.6])  # +0.05 vs spread 0.1
    assert row.verdict == NOISE
    assert row.gap_closed == pytest.approx(0.05 / 0.35)  # still reported
    assert compare("m", 0.9, [0.5, 0.6], [0.6, 0.65]).verdict == NOISE  # +0.075 <= 0.1


def test_worse_and_negative_gap_closed():
    row = compare("m", teacher=0.2, nokd=[0.10, 0.11], distilled=[0.05, 0.06])
    assert row.verdict == WORSE
    assert row.gap_closed == pytest.approx(-0.05 / 0.095)


def test_gap_closed_undefined_when_teacher_not_above_nokd():
    assert compare("m", teacher=0.5, nokd=[0.5, 0.5], distilled=[0.6, 0.6]).gap_closed is None
    assert compare("m", teacher=0.4, nokd=[0.5, 0.5], distilled=[0.6, 0.6]).gap_closed is None


def test_one_seed_is_never_called_significant():
    row = compare("m", teacher=0.9, nokd=[0.5], distilled=[0.8])
    assert row.spread is None and row.verdict == NOISE


def test_missing_values_are_errors():
    with pytest.raises(EkdError, match="missing"):
        compare("TPR", teacher=0.9, nokd=[None, 0.5], distilled=[0.6, 0.6])
    with pytest.raises(EkdError, match="seed"):
        compare("TPR", teacher=0.9, nokd=[], distilled=[0.6])


def test_table_and_summary_text():
    rows = [compare("acc", 0.9, [0.5, 0.6], [0.7, 0.75]),
            compare("tpr", 0.2, [0.10, 0.11], [0.05, 0.06]),
            compare("tpr2", 0.2, [0.10, 0.12], [0.11, 0.12])]
    table = comparison_table(rows).splitlines()
    assert "mean of 2" in table[0] and "gap closed" in table[0] and "verdict" in table[0]
    assert len(table) == 2 + 3
    assert table[2].startswith("| acc | 0.9000 | 0.5500 | 0.7250 | +0.1750 | 0.1000 | +50% | EKD better |")
    assert table[3].endswith("| EKD worse |") and table[4].endswith("| within noise |")
    text = summary(rows)
    assert "beats no KD by more than the seed spread on acc" in text
    assert "worse than no KD by more than the seed spread on tpr;" in text
    assert text.endswith("within seed noise on tpr2.")
    only_noise = summary([rows[2]])
    assert only_noise == "The difference between EKD and no KD is within seed noise on every metric: tpr2."


def test_comparisons_read_evaluation_results_and_skip_missing_metrics():
    def res(acc, tpr, tpr5=None):
        return {"sets": {"p": {"accuracy": acc}, "a": {"tpr@1e-4": tpr, "tpr@1e-5": tpr5}}}

    metrics = (("acc", "p", "accuracy"), ("tpr", "a", "tpr@1e-4"), ("tpr5", "a", "tpr@1e-5"))
    rows, skipped = comparisons_from_results(res(0.9, 0.5, 0.1), [res(0.6, 0.1), res(0.7, 0.2)],
                                             [res(0.8, 0.3), res(0.8, 0.4)], metrics)
    assert [r.metric for r in rows] == ["acc", "tpr"] and skipped == ["tpr5"]
    assert rows[0].nokd == (0.6, 0.7) and rows[1].distilled == (0.3, 0.4)
    assert rows[1].teacher == 0.5


def test_another_method_is_named_in_its_verdict_table_and_summary():
    rows = [compare("acc", 0.9, [0.5, 0.6], [0.7, 0.75], method="cosine"),
            compare("tpr", 0.9, [0.5, 0.6], [0.52, 0.58], method="cosine")]
    assert [r.verdict for r in rows] == ["cosine better", "within noise"]
    table = comparison_table(rows).splitlines()
    assert table[0].startswith("| metric | teacher | no KD (mean of 2) | cosine (mean of 2) | cosine − no KD |")
    assert summary(rows) == ("Cosine beats no KD by more than the seed spread on acc; "
                             "the difference is within seed noise on tpr.")
