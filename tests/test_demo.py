"""End to end: ``ekd demo --quick`` trains a teacher and two students and writes the table."""

from __future__ import annotations

import json
import math

from ekd.cli import main


def test_demo_quick_writes_finite_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "student EKD" in printed and "teacher" in printed
    assert (out / "results.md").is_file()
    results = json.loads((out / "metrics.json").read_text())
    assert set(results) == {"teacher IResNet-18", "student no KD", "student EKD"}
    for res in results.values():
        assert res["parameters"] > 0
        for metrics in res["sets"].values():
            assert math.isfinite(metrics["auc"]) and 0.0 <= metrics["auc"] <= 1.0
            if "accuracy" in metrics:
                assert 0.0 <= metrics["accuracy"] <= 1.0
            tprs = [v for k, v in metrics.items() if k.startswith("tpr@") and v is not None]
            assert tprs and all(0.0 <= v <= 1.0 for v in tprs)
    for run in ("teacher", "student_nokd", "student_ekd"):
        assert (out / run / "model.pt").is_file()
        assert (out / run / "checkpoints" / "last.pt").is_file()
        assert (out / run / "config.yaml").is_file()
    ekd_rows = [json.loads(line) for line in (out / "student_ekd" / "metrics.jsonl").read_text().splitlines()]
    assert any("ekd_neg" in row for row in ekd_rows)
