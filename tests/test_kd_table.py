"""The real-face KD table (``bench/kd_table*.py``): cell plan and seeds, config hashing, valid
cell configs, report arithmetic; with the shared faces, the teacher's reference values and one
real cell end to end."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

import bench.kd_table as K
import bench.kd_report as R
from bench.kd_protocols import METRICS

from ekd.config import Config, from_dict, validate


def _fake_result(table, cell, tpr4, acc=0.7):
    """A finished run in the cache (not committed)."""
    d = table.cell_dir(cell)
    d.mkdir(parents=True, exist_ok=True)
    metrics = {m: acc for m in METRICS}
    metrics.update({"lfw_tpr@1e-4": tpr4, "roc_fpr": [1e-3, 1.0], "roc_tpr": [tpr4, 1.0]})
    (d / "result.json").write_text(json.dumps({"teacher": cell.teacher, "method": cell.method,
                                               "seed": cell.seed, "metrics": metrics,
                                               "train_seconds": 10.0, "eval_seconds": 1.0}))


def test_plan_seeds_and_the_two_best_others(tmp_path):
    table = K.Table(K.CPU, tmp_path / "faces", tmp_path / "cache", tmp_path / "results")
    plan = table.plan()
    assert len(plan) == 5 * 3 + len(K.OTHERS)  # phase 2 waits for the one-seed sweep
    assert {c.method for c in plan if c.seed == 2} == set(K.SEEDED)
    for i, m in enumerate(K.OTHERS):
        _fake_result(table, K.Cell("T2", m, 0), tpr4={"sp": 0.5, "cosine": 0.4}.get(m, 0.1 + 0.01 * i))
    assert table.best_others("T2") == ["sp", "cosine"]
    plan = table.plan()
    assert len(plan) == 30
    assert [(c.method, c.seed) for c in plan[-4:]] == [("sp", 1), ("cosine", 1), ("sp", 2), ("cosine", 2)]
    assert {c.slug for c in plan} == {c.slug for c in set(plan)}  # no duplicates
    pending = [p[0] for p in table.pending()]  # the cache's finished runs are not committed
    assert len(pending) == 30 and any(p.startswith("T2-sp-s1-") for p in pending)


def test_hash_ignores_locations_but_not_settings(tmp_path):
    a = K.Table(K.CPU, tmp_path / "a" / "faces", tmp_path / "a" / "cache")
    b = K.Table(K.CPU, tmp_path / "b" / "faces", tmp_path / "b" / "cache")
    cell = K.Cell("T2", "EKD (ours)", 0)
    assert a.cell_dir(cell).name == b.cell_dir(cell).name
    assert a.cell_dir(cell).name != a.cell_dir(K.Cell("T2", "EKD (ours)", 1)).name
    longer = K.Table(dataclasses.replace(K.CPU, epochs=3), tmp_path / "a" / "faces", tmp_path / "a" / "cache")
    assert longer.cell_dir(cell).name != a.cell_dir(cell).name


@pytest.mark.parametrize("profile", [K.CPU, K.CPU2, K.GPU])
def test_every_cell_config_is_valid(tmp_path, profile):
    table = K.Table(profile, tmp_path / "faces", tmp_path / "cache", tmp_path / "results")
    for cell in table.plan():
        cfg = from_dict(Config, table.config_tree(cell))
        validate(cfg)
        assert cfg.teacher.kind == ("none" if cell.method == "no KD" else
                                    "cache" if cell.teacher == "T2" else "checkpoint")
        assert cfg.model.width == cell.width


def test_cell_configs_are_as_described(tmp_path):
    table = K.Table(K.GPU, tmp_path / "faces", tmp_path / "cache")

    def cfg(teacher, method):
        return from_dict(Config, table.config_tree(K.Cell(teacher, method, 0)))

    assert cfg("T2", "EKD (ours)").distill[0].params == {"bias_correction": True, "memory_size": 4096,
                                                         "pos_weight": 0.16, "neg_weight": 0.08,
                                                         "one_sided": True}
    assert cfg("T2", "EKD (authors)").distill[0].params == {}
    assert [d.name for d in cfg("T2", "EKD + AdaDistill").distill] == ["ekd", "adadistill"]
    assert cfg("T2", "kd").teacher.centers == "mean_embedding"
    assert cfg("T1", "kd").teacher.centers == "classifier"
    assert cfg("T2", "gkd").distill[0].params["logits"] == "teacher_centers"
    assert cfg("T1", "gkd").distill[0].params["logits"] == "heads"
    assert cfg("T2", "sp").model.embedding_size == 128
    assert from_dict(Config, table.t1_tree()).model.backbone == "iresnet50"


def test_summary_std_and_gap_closed():
    runs = [{"teacher": "T2", "method": m, "seed": s, "train_seconds": 1.0, "eval_seconds": 1.0,
             "metrics": {**{k: v for k in METRICS}, "roc_fpr": [0.1, 1.0], "roc_tpr": [v, 1.0]}}
            for m, s, v in (("no KD", 0, 0.5), ("no KD", 1, 0.7), ("EKD (ours)", 0, 0.8))]
    summary = R.summarise(runs, "T2")
    assert summary["no KD"]["mean"]["lfw_acc"] == pytest.approx(0.6)
    assert summary["no KD"]["std"]["lfw_acc"] == pytest.approx(0.1414214, rel=1e-5)  # ddof 1
    assert summary["EKD (ours)"]["std"]["lfw_acc"] is None
    assert summary["no KD"]["roc_tpr"] == pytest.approx([0.6, 1.0])
    gaps = R.gap_closed(summary, {k: 1.0 for k in METRICS})
    assert gaps["EKD (ours)"]["lfw_acc"] == pytest.approx(0.5)  # (0.8 - 0.6) / (1.0 - 0.6)
    assert gaps["no KD"]["cfp_fp_acc"] == pytest.approx(0.0)


def test_teacher_reference_values(shared_faces):
    from bench.kd_protocols import evaluate_teacher_npz, load_protocols

    faces = shared_faces
    m = evaluate_teacher_npz(load_protocols(faces), faces)
    assert m["lfw_acc"] == pytest.approx(0.989167, abs=1e-6)
    assert m["lfw_acc_std"] == pytest.approx(0.004099, abs=1e-6)
    assert [round(m[f"lfw_tpr@{e}"], 4) for e in ("1e-3", "1e-4", "1e-5")] == [0.9289, 0.7831, 0.5351]
    assert m["all_pairs"] == 20_604_990
    assert (round(m["cfp_ff_acc"], 4), round(m["cfp_fp_acc"], 4)) == (0.9857, 0.6629)


def test_one_real_cell_end_to_end(shared_faces, tmp_path):
    faces = shared_faces
    profile = dataclasses.replace(K.CPU, epochs=1, steps_per_epoch=2, threads=2)
    table = K.Table(profile, faces, tmp_path / "cache", tmp_path / "results")
    table.prepare()
    assert table.teachers()["T2"]["metrics"]["lfw_acc"] == pytest.approx(0.989167, abs=1e-6)
    cell = K.Cell("T2", "kd", 0)
    d = table.cell_dir(cell)
    name = table.cell_name(cell)
    table.write_cell(d, table.spec(name, table.config_tree(cell),
                                   {"teacher": "T2", "method": "kd", "seed": 0, "width": 1.0}))
    K.run_cell(d)
    record = json.loads((tmp_path / "results" / "cpu" / f"{name}.json").read_text())
    assert record["hash"] == name.rsplit("-", 1)[1] and record["git_commit"] and record["environment"]
    assert "<faces>" in json.dumps(record["config"]) and str(faces) not in json.dumps(record["config"])
    boot = table.store.load_boot(name)
    assert boot["samples"].shape == (1000, 3) and 0 <= boot["samples"][:, 0].mean() <= 1
    assert [p[0] for p in table.pending()].count(name) == 0  # committed: skipped
    result = table.result(cell)
    assert set(METRICS) <= set(result["metrics"]) and 0.3 < result["metrics"]["lfw_acc"] < 1.0
    assert {"ce", "kd"} <= set(result["final_terms"])
    out = R.write_report(table, tmp_path / "out", 1.0, ["python", "bench/kd_table.py"])
    text = out.read_text()
    assert "Incomplete" in text and "| kd | 1 |" in text and "| teacher | – | 0.9892" in text
    assert (tmp_path / "out" / "kd_table_cpu_t2_roc.png").stat().st_size > 1000
    rows = (tmp_path / "out" / "kd_table_cpu.csv").read_text().splitlines()
    assert rows[0].startswith("teacher,width,method,seed,lfw_acc") and len(rows) == 3
    # --reproduce: the committed cell retrained from scratch in its recorded layout (v1: NCHW)
    assert record["config"]["train"]["channels_last"] is False
    again = K.reproduce(table, name)
    assert again["max_abs_diff"] == 0.0 and again["committed"] == again["rerun"]
    assert (tmp_path / "results" / "cpu" / "reproduced" / f"{name}.json").is_file()


def test_report_command_shows_no_machine_paths(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    command = ["python", "bench/kd_table.py", "--cache", str(tmp_path / "kdcache"), "--out",
               str(repo / "docs" / "results"), "--jobs", "2", "--report-only"]
    shown = R.shown_command(command)
    assert shown == "python bench/kd_table.py --cache CACHE --out docs/results --jobs 2"
    assert str(tmp_path) not in shown


def test_a_cell_at_chance_keeps_its_training_log(tmp_path):
    from bench.kd_cells import CHANCE_ACC, keep_training_log

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"epoch": 0, "step": 20, "loss": 20.5}, {"epoch": 0, "step": 40, "epoch_end": True}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "results"
    assert keep_training_log(store, "T3-kd-s0-abc", {"lfw_acc": CHANCE_ACC + 0.2}, run) is None
    assert not store.exists()  # a healthy cell commits no log
    name = keep_training_log(store, "T3-kd-s0-abc", {"lfw_acc": 0.5005}, run)
    assert name == "T3-kd-s0-abc.metrics.jsonl.gz"
    with gzip.open(store / name, "rt") as fh:
        assert [json.loads(line) for line in fh] == rows  # the run's log, line for line
    assert keep_training_log(store, "T3-kd-s1-abc", {"lfw_acc": 0.5}, tmp_path / "gone") is None
