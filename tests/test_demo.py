"""End to end: ``ekd demo --quick`` trains a teacher, no-KD, cosine, AdaDistill and EKD students x
two seeds
and writes the per-run table and each method's comparison with no KD."""

from __future__ import annotations

import json
import math

from ekd.commands.cli import main
from ekd.commands.demo_report import BETTER, NOISE, WORSE

RUNS = {"teacher MobileFaceNet x0.5", "student no KD (seed 0)", "student no KD (seed 1)",
        "student cosine (seed 0)", "student cosine (seed 1)", "student AdaDistill (seed 0)",
        "student AdaDistill (seed 1)", "student EKD (seed 0)", "student EKD (seed 1)"}


def test_demo_quick_writes_finite_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "student EKD (seed 1)" in printed and "teacher" in printed
    assert "gap closed" in printed and "seed spread" in printed
    report = (out / "results.md").read_text()
    assert "## cosine vs no KD" in report and "## EKD vs no KD" in report and "mean of 2" in report
    assert "## AdaDistill vs no KD" in report
    results = json.loads((out / "metrics.json").read_text())
    assert set(results) == RUNS
    for res in results.values():
        assert res["parameters"] > 0
        for metrics in res["sets"].values():
            assert math.isfinite(metrics["auc"]) and 0.0 <= metrics["auc"] <= 1.0
            if "accuracy" in metrics:
                assert 0.0 <= metrics["accuracy"] <= 1.0
            tprs = [v for k, v in metrics.items() if k.startswith("tpr@") and v is not None]
            assert tprs and all(0.0 <= v <= 1.0 for v in tprs)
    rows = json.loads((out / "comparison.json").read_text())
    # the quick set is too small for TPR at 1e-4 and below: those metrics are named as skipped
    assert rows and rows[0]["metric"] == "pairs accuracy"
    skipped = [line for line in report.splitlines() if line.startswith("Not compared")]
    assert len(skipped) == 3 and all("all-pairs TPR@FPR=1e-5" in line for line in skipped)
    assert {r["method"] for r in rows} == {"cosine", "AdaDistill", "EKD"}
    for method in ("cosine", "AdaDistill", "EKD"):  # every metric is compared or named, per method
        assert sum(r["method"] == method for r in rows) + skipped[0].count(",") + 1 == 5
    for row in rows:
        assert len(row["nokd"]) == len(row["distilled"]) == 2
        assert row["verdict"] in (BETTER, WORSE, NOISE)
        # the printed verdict follows the rule on the printed numbers
        diff = sum(row["distilled"]) / 2 - sum(row["nokd"]) / 2
        spread = max(abs(row["nokd"][0] - row["nokd"][1]), abs(row["distilled"][0] - row["distilled"][1]))
        assert (row["verdict"] == NOISE) == (abs(diff) <= spread)
    for run in ("teacher", "student_nokd_s0", "student_nokd_s1", "student_cosine_s0", "student_adadistill_s1",
                "student_ekd_s0", "student_ekd_s1"):
        assert (out / run / "model.pt").is_file()
        assert (out / run / "checkpoints" / "last.pt").is_file()
        assert (out / run / "config.yaml").is_file()
    ada_cfg = (out / "student_adadistill_s1" / "config.yaml").read_text()
    assert "name: adadistill" in ada_cfg and "replace_ce: true" in ada_cfg and "kind: cache" in ada_cfg
    ekd_cfg = (out / "student_ekd_s0" / "config.yaml").read_text()
    assert "kind: cache" in ekd_cfg and "name: ekd" in ekd_cfg and "params: {}" in ekd_cfg  # cpu3's preset
    # the students train on the first 24 of the teacher's 48 identities (QUICK)
    assert "kind: folder" in ekd_cfg and "train_students" in ekd_cfg
    assert "kind: synthetic" in (out / "teacher" / "config.yaml").read_text()
    plan = json.loads((out / "plan.json").read_text())  # what bench/demo_convergence.py reads
    assert plan["quick"] and plan["teacher_backbone"] == "mobilefacenet"
    assert f"width: {plan['student_width']}" in ekd_cfg
    assert results["student no KD (seed 0)"]["parameters"] < results["teacher MobileFaceNet x0.5"]["parameters"] / 2
    ekd_rows = [json.loads(line) for line in (out / "student_ekd_s1" / "metrics.jsonl").read_text().splitlines()]
    assert any("ekd_neg" in row for row in ekd_rows)


def test_the_demo_trains_and_compares_every_method_of_its_plan(tmp_path):
    from dataclasses import replace

    import pytest

    from ekd.commands import demo as D
    from ekd.errors import EkdError

    plan = replace(D.QUICK, methods=("cosine", "ekd"), train_identities=6, train_images=4, teacher_identities=12,
                   eval_identities=6, eval_images=4, num_pairs=40)
    out = tmp_path / "demo"
    results = D.run_demo(out, device="cpu", plan=plan)
    distilled = {f"student {name} (seed {s})" for name in ("cosine", "EKD") for s in (0, 1)}
    assert set(results) == {"teacher MobileFaceNet x0.5", "student no KD (seed 0)", "student no KD (seed 1)", *distilled}
    rows = json.loads((out / "comparison.json").read_text())
    assert {r["method"] for r in rows} == {"cosine", "EKD"}
    assert all(r["verdict"] in (f"{r['method']} better", f"{r['method']} worse", NOISE) for r in rows)
    report = (out / "results.md").read_text()
    assert "## cosine vs no KD" in report and "## EKD vs no KD" in report and "| cosine (mean of 2) |" in report
    cosine_cfg = (out / "student_cosine_s1" / "config.yaml").read_text()
    assert "name: cosine" in cosine_cfg and "weight: 10.0" in cosine_cfg and "kind: cache" in cosine_cfg
    with pytest.raises(EkdError, match="demo: unknown method 'fitnets'; valid: nokd, ekd, cosine"):
        D.student_config(plan, out, "fitnets", 0, "cpu")
