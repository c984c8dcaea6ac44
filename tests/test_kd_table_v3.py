"""KD table v3 (cpu3, teacher T3) without real faces: the validation-split choices of the feature
baselines' weights and of the EKD preset (bench/kd_choices.py), the tuning plan
(bench/kd_tuning.py), the sanity gate and the cpu3 plan (bench/kd_profiles.py), and the no-KD
cells shared with cpu2."""

from __future__ import annotations

import pytest

import bench.kd_choices as H
import bench.kd_report as R
import bench.kd_table as K
import bench.kd_tuning as T
from bench.kd_cells import CellStore
from bench.kd_profiles import CPU3_UNCENTRED, V3_AUTO, V3_GATE, ZOO_V2, gate_statement, gate_verdict

from ekd.config import Config, from_dict, validate


def _val(tpr3, tpr4=0.05):
    """Validation metrics; the weight rule ranks by TPR@1e-3, then TPR@1e-4."""
    return {"val_tpr@1e-4": tpr4, "val_tpr@1e-3": tpr3, "val_tpr@1e-5": tpr4 / 2, "val_auc": 0.9}


def _tuning(tmp_path, phases=("grid", "preset")):
    return T.Tuning(tmp_path / "faces", tmp_path / "cache", tmp_path / "tuning", phases)


def _commit_tuning(table, row, seed, tpr3, tpr4=0.05):
    cell = K.Cell("T3", row, seed, 0.5)
    name = table.cell_name(cell)
    table.store.write(name, {"teacher": "T3", "method": row, "seed": seed, "width": 0.5, "name": name,
                             "config": table.portable(table.config_tree(cell)), "metrics": _val(tpr3, tpr4),
                             "train_seconds": 60.0, "eval_seconds": 1.0}, None)


def test_weight_rule_waits_for_the_grid_and_extends_it_past_a_best_largest_weight():
    rec = lambda t: {"metrics": _val(t)}  # noqa: E731
    assert H.choose_weight({1.0: rec(0.1), 10.0: rec(0.2)})[:2] == (None, None)
    chosen, nxt, why = H.choose_weight({1.0: rec(0.1), 10.0: rec(0.3), 100.0: rec(0.2)})
    assert (chosen, nxt) == (10.0, None) and "x10 chosen" in why
    chosen, nxt, _ = H.choose_weight({1.0: rec(0.1), 10.0: rec(0.2), 100.0: rec(0.3)})
    assert (chosen, nxt) == (None, 1000.0)
    chosen, nxt, _ = H.choose_weight({1.0: rec(0.1), 10.0: rec(0.2), 100.0: rec(0.3), 1000.0: rec(0.25)})
    assert (chosen, nxt) == (100.0, None)
    # ties at TPR@1e-3 go to the higher TPR@1e-4
    tie = {1.0: {"metrics": _val(0.2, 0.03)}, 10.0: {"metrics": _val(0.2, 0.05)}, 100.0: {"metrics": _val(0.1)}}
    assert H.choose_weight(tie)[0] == 10.0


def test_tuning_rows_are_valid_t3_configs_and_no_kd_shares_the_t2_ablation_hash(tmp_path):
    import bench.ekd_ablation as A

    table = _tuning(tmp_path)
    cells = table.plan()
    rows = {c.method for c in cells}
    assert {"cosine x1", "cosine x10", "cosine x100", "fitnet x1", "fitnet x10", "fitnet x100"} <= rows
    assert {"cosine auto", "fitnet auto"} <= rows  # weight auto beside the grid it is compared with
    auto = from_dict(Config, table.config_tree(K.Cell("T3", "cosine auto", 0, 0.5))).distill[0]
    assert auto.weight == "auto" and auto.target_share > 0
    assert set(H.PRESET_ROWS) <= rows and {c.seed for c in cells if c.method in H.PRESET_ROWS} == {0, 1}
    assert {c.seed for c in cells if c.method.startswith(("cosine", "fitnet"))} == {0}
    for cell in cells:
        cfg = from_dict(Config, table.config_tree(cell))
        validate(cfg)
        assert cfg.model.width == 0.5 and cfg.data.root == str(table.split / "train")
        if cell.method != "no KD":
            assert cfg.teacher.path == str(table.split / "teacher_t3")
    assert [d.weight for d in from_dict(Config, table.config_tree(K.Cell("T3", "cosine x100", 0, 0.5))).distill] == [100.0]
    ablation = A.Ablation(A.CPU2, tmp_path / "faces", tmp_path / "cache", tmp_path / "r", ["no KD"], 2)
    for seed in (0, 1):
        t3 = table.cell_name(K.Cell("T3", "no KD", seed, 0.5))
        assert t3 == "T3-" + ablation.cell_name(K.Cell("T2", "no KD", seed, 0.5)).split("-", 1)[1]
    # only the grid phase: no EKD rows
    assert {c.method for c in _tuning(tmp_path, ("grid",)).plan()} & set(H.PRESET_ROWS) == set()


def test_the_grid_grows_while_its_largest_weight_is_best_and_the_choice_reaches_the_table(tmp_path):
    table = _tuning(tmp_path, ("grid",))
    for w, t in ((1, 0.10), (10, 0.12), (100, 0.15)):
        _commit_tuning(table, f"cosine x{w}", 0, t)
    for w, t in ((1, 0.10), (10, 0.20), (100, 0.05)):
        _commit_tuning(table, f"fitnet x{w}", 0, t)
    assert "cosine x1000" in {c.method for c in table.plan()}
    settings, reasons = H.tuned_settings(table.store_records(), H.PRESET_ROWS, 2)
    assert "cosine" not in settings and settings["fitnet"] == [{"name": "fitnet", "weight": 10.0, "params": {}}]
    _commit_tuning(table, "cosine auto", 0, 0.5)  # not a grid point, whatever it scores
    _commit_tuning(table, "cosine x1000", 0, 0.14)
    settings, reasons = H.tuned_settings(table.store_records(), H.PRESET_ROWS, 2)
    assert settings["cosine"][0]["weight"] == 100.0
    assert settings["better baseline"] == "fitnet"  # 0.20 vs 0.15 at the chosen weights
    # the cpu3 table reads the choices from the committed tuning cells
    cpu3 = K.Table(K.CPU3, tmp_path / "faces", tmp_path / "cache", tmp_path / "results", tuning=tmp_path / "tuning")
    assert cpu3.profile.tuned["cosine"][0]["weight"] == 100.0
    tree = cpu3.config_tree(K.Cell("T3", "fitnet", 0))
    assert tree["distill"] == [{"name": "fitnet", "weight": 10.0, "params": {}}]
    assert tree["teacher"] == {"kind": "cache", "path": str((tmp_path / "cache" / "teacher_t3").resolve()),
                               "centers": "classifier", "center": "train_mean"}  # cpu3 distils from T3 centred
    validate(from_dict(Config, tree))
    # the tuning cells see the teacher as the table does; the first gate's profile as stored
    assert table.config_tree(K.Cell("T3", "cosine x10", 0, 0.5))["teacher"]["center"] == "train_mean"
    uncentred = K.Table(CPU3_UNCENTRED, tmp_path / "faces", tmp_path / "cache", tmp_path / "results",
                        tuning=tmp_path / "tuning")
    assert "center" not in uncentred.teacher_section("T3", "fitnet")
    assert "EKD (ours)" not in cpu3.profile.tuned  # the EKD rows have no cells yet


def _commit_table(table, cell, acc, tpr3):
    name = table.cell_name(cell)
    metrics = {"lfw_acc": acc, "lfw_tpr@1e-3": tpr3, "lfw_tpr@1e-4": tpr3 / 2, "lfw_tpr@1e-5": tpr3 / 4}
    table.store.write(name, {"teacher": cell.teacher, "method": cell.method, "seed": cell.seed,
                             "width": cell.width, "name": name, "metrics": metrics}, None)


def _cpu3(tmp_path, tuned):
    table = K.Table(K.CPU3, tmp_path / "faces", tmp_path / "cache", tmp_path / "results", tuning=tmp_path / "none")
    table.profile = K.dataclasses.replace(table.profile, tuned=tuned)
    return table


TUNED = {"cosine": [{"name": "cosine", "weight": 10.0, "params": {}}],
         "fitnet": [{"name": "fitnet", "weight": 100.0, "params": {}}],
         "EKD (ours)": [{"name": "ekd", "weight": 1.0, "params": {"one_sided": True}}], "better baseline": "cosine"}


def test_the_gate_runs_alone_first_and_a_failed_gate_stops_the_plan(tmp_path):
    table = _cpu3(tmp_path, TUNED)
    gate = {(c.method, c.seed, c.width) for c in table.plan()}
    assert gate == {(m, s, 1.0) for m in V3_GATE for s in range(3)}
    assert "waiting for its cells." in gate_statement(table.profile, table.result)
    for s in range(3):  # cosine ahead at both metrics by more than the seed spread; FitNet not
        _commit_table(table, K.Cell("T3", "no KD", s), 0.80 + 0.001 * s, 0.20 + 0.001 * s)
        _commit_table(table, K.Cell("T3", "cosine", s), 0.84 + 0.001 * s, 0.25 + 0.001 * s)
        _commit_table(table, K.Cell("T3", "fitnet", s), 0.80 + 0.001 * s, 0.30 + 0.001 * s)
    passed, reasons = gate_verdict(table.profile, table.result)
    assert passed and any(r.startswith("fitnet vs no KD, lfw_acc: +0.0000") for r in reasons)
    statement = gate_statement(table.profile, table.result)
    assert ": **passed** (cosine vs no KD, lfw_acc: +0.0400 (seed spread 0.0020);" in statement
    assert gate_statement(K.CPU2, table.result) == ""
    assert statement in R.markdown(table, [], {}, [], 0.0, ["python"])[0]  # the report says it
    plan = table.plan()
    assert {(c.method, c.seed, c.width) for c in plan[:9]} == gate  # the gate's cells stay first
    full = {(c.method, c.seed) for c in plan if c.width == 1.0}
    for m in ("EKD (authors)", "EKD (ours)", "AdaDistill", "proxylesskd"):
        assert {(m, s) for s in range(3)} <= full
    half = {(c.method, c.seed) for c in plan if c.width == 0.5}
    assert half == {(m, s) for m in ("no KD", "EKD (authors)", "EKD (ours)", "cosine") for s in range(3)}
    dropped = set(K.CPU3.drop)  # one-seed rows left out for the budget (really worse under T2 first)
    assert dropped and not dropped & {m for m, _ in full}
    assert ("gkd", 0) in full and ("gkd", 1) not in full  # the only ZOO_V2 row left: seeds 1-2 once s0 is in
    _commit_table(table, K.Cell("T3", "gkd", 0), 0.85, 0.26)
    assert {("gkd", 1), ("gkd", 2)} <= {(c.method, c.seed) for c in table.plan()}
    assert {m for m, s in full if s == 0} >= (set(ZOO_V2) | set(V3_AUTO)) - dropped
    assert not dropped & {"no KD", "EKD (authors)", "EKD (ours)", "cosine", "fitnet", "AdaDistill", "proxylesskd"}
    # one-seed rows get weight auto unless the term replaces the margin softmax
    darkrank = table.config_tree(K.Cell("T3", "darkrank", 0))["distill"]
    assert darkrank[0]["weight"] == "auto" and darkrank[0]["target_share"] > 0
    validate(from_dict(Config, table.config_tree(K.Cell("T3", "darkrank", 0))))
    assert table.config_tree(K.Cell("T3", "margin_distill", 0))["distill"][0]["weight"] == 1.0
    assert table.config_tree(K.Cell("T3", "EKD (ours)", 0))["distill"] == TUNED["EKD (ours)"]
    # a gate that fails: neither baseline ahead
    failed = _cpu3(tmp_path / "f", TUNED)
    for s in range(3):
        for m in V3_GATE:
            _commit_table(failed, K.Cell("T3", m, s), 0.80 + 0.01 * s, 0.20 + 0.01 * s)
    assert gate_verdict(failed.profile, failed.result)[0] is False
    assert {c.method for c in failed.plan()} == set(V3_GATE)


def test_cpu3_adopts_cpu2_no_kd_cells_and_keeps_cpu2_hashes(tmp_path):
    results = tmp_path / "results"
    cpu2 = K.Table(K.CPU2, tmp_path / "faces", tmp_path / "cache", results)
    cpu3 = _cpu3(tmp_path, {})
    cpu3.store = CellStore(results / "cpu3")
    source = cpu2.cell_name(K.Cell("T2", "no KD", 1))
    cpu2.store.write(source, {"name": source, "hash": source.rsplit("-", 1)[1], "teacher": "T2",
                              "method": "no KD", "seed": 1, "metrics": {"lfw_acc": 0.8}},
                     {"protocol": "p", "seed": 0, "fprs": [1e-3], "tpr_millionths": [[1]]})
    assert cpu3.adopt_no_kd() == ["T3-" + source.split("-", 1)[1]]
    record = cpu3.result(K.Cell("T3", "no KD", 1))
    assert record["teacher"] == "T3" and record["adopted_from"] == f"cpu2/{source}"
    assert cpu3.store.load_boot(record["name"]) is not None
    assert cpu3.adopt_no_kd() == []  # once
    with pytest.raises(KeyError, match="not chosen on the validation split yet"):
        cpu3.config_tree(K.Cell("T3", "cosine", 0))


def test_tuning_adopts_the_t2_ablations_no_kd_cells(tmp_path):
    import bench.ekd_ablation as A

    ablation = A.Ablation(A.CPU2, tmp_path / "faces", tmp_path / "cache", tmp_path / "ekd_ablation", ["no KD"], 2)
    source = ablation.cell_name(K.Cell("T2", "no KD", 0, 0.5))
    ablation.store.write(source, {"name": source, "hash": source.rsplit("-", 1)[1], "method": "no KD",
                                  "seed": 0, "metrics": _val(0.13)}, None)
    table = _tuning(tmp_path, ("grid",))  # results: tmp_path/"tuning"/cpu3, beside tmp_path/"ekd_ablation"
    table.store = CellStore(tmp_path / "kd_tuning" / "cpu3")
    assert table.adopt_no_kd() == ["T3-" + source.split("-", 1)[1]]
    record = table.result(K.Cell("T3", "no KD", 0, 0.5))
    assert record["adopted_from"] == f"ekd_ablation/ablation-cpu2/{source}" and record["teacher"] == "T3"


def test_cells_run_without_the_divergence_guard_and_it_is_outside_the_hash(tmp_path):
    """A diverged cell is a result of the table (named "trained to chance"), not an error."""
    table = K.Table(K.CPU2, tmp_path / "faces", tmp_path / "cache", tmp_path / "results")
    cell = K.Cell("T2", "no KD", 0)
    tree = table.config_tree(cell)
    cfg = from_dict(Config, tree)
    assert cfg.train.guard.enabled is False
    tree["train"]["guard"] = {"enabled": True}
    assert table.digest(tree) == table.digest(table.config_tree(cell))
    assert table.cell_name(cell) == "T2-no_kd-s0-252ce14930bc"  # the committed cpu2 cell


def test_a_cell_stopped_before_its_first_checkpoint_starts_again(tmp_path):
    """A cell killed before its first epoch checkpoint left a run folder with nothing to resume:
    the next invocation starts it again instead of being refused as "another run"."""
    import json

    import bench.kd_cells as kd_cells
    from conftest import synthetic_run_tree

    cell_dir = tmp_path / "cell"
    tree = synthetic_run_tree(tmp_path, "ignored", [], max_steps_per_epoch=2)
    cell_dir.mkdir()
    (cell_dir / "cell.json").write_text(json.dumps({"config": tree, "threads": 1}))
    run = cell_dir / "run"
    run.mkdir()
    (run / "config.yaml").write_text("stale: true\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    _, trained, _ = kd_cells.train_cell(cell_dir)
    assert trained.model_path.is_file() and not trained.interrupted
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss") != 99.0 for r in rows)  # the stale rows went with the stale run
    # with an epoch checkpoint the cell resumes (here: nothing left to train, no step logged twice)
    kd_cells.train_cell(cell_dir)
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in again if "lr" in r]
    assert logged and logged == [r["step"] for r in rows if "lr" in r]


def test_a_table_reads_choices_committed_after_it_started(tmp_path):
    cpu3 = K.Table(K.CPU3, tmp_path / "faces", tmp_path / "cache", tmp_path / "results", tuning=tmp_path / "tuning")
    assert {c.method for c in cpu3.plan()} == {"no KD"}  # nothing chosen yet: the gate has no rows
    table = _tuning(tmp_path, ("grid",))
    for w, t in ((1.0, 0.10), (10.0, 0.20), (100.0, 0.15)):
        _commit_tuning(table, f"cosine x{w:g}", 0, t)
    assert {c.method for c in cpu3.plan()} == {"no KD"}  # the running table's plan is stale ...
    cpu3.refresh()  # ... until it reads the choices again, as the runner does before each plan
    assert {c.method for c in cpu3.plan()} == {"no KD", "cosine"}
    assert cpu3.config_tree(K.Cell("T3", "cosine", 0))["distill"][0]["weight"] == 10.0


def test_the_runner_reads_the_choices_again_before_each_plan():
    from bench.kd_cells import run_all

    class Fake:
        profile, refreshed = K.CPU3, 0

        def refresh(self):
            self.refreshed += 1

        def pending(self):
            return []

        def plan(self):
            return []

        def result(self, cell):
            return None

    fake = Fake()
    run_all(fake, jobs=1)
    assert fake.refreshed == 1


def test_a_row_whose_config_is_another_rows_adopts_its_cells_instead_of_training_again(tmp_path):
    # the validation split chose the authors' settings for "EKD (ours)": both rows are one config
    authors = {**TUNED, "EKD (ours)": [{"name": "ekd", "weight": 1.0, "params": {}}]}
    table = _cpu3(tmp_path, authors)
    ours, theirs = K.Cell("T3", "EKD (ours)", 1, 0.5), K.Cell("T3", "EKD (authors)", 1, 0.5)
    assert table.cell_name(ours).rsplit("-", 1)[1] == table.cell_name(theirs).rsplit("-", 1)[1]
    for s in range(3):  # a passed gate plans the EKD rows
        _commit_table(table, K.Cell("T3", "no KD", s), 0.80 + 0.001 * s, 0.20 + 0.001 * s)
        _commit_table(table, K.Cell("T3", "cosine", s), 0.84 + 0.001 * s, 0.25 + 0.001 * s)
        _commit_table(table, K.Cell("T3", "fitnet", s), 0.80 + 0.001 * s, 0.30 + 0.001 * s)
    pending = {name for name, _, _ in table.pending()}
    assert (table.cell_name(ours) in pending) != (table.cell_name(theirs) in pending)  # one run per config
    _commit_table(table, theirs, 0.83, 0.22)
    pending = {name for name, _, _ in table.pending()}
    assert table.cell_name(ours) not in pending  # adopted, not trained twice
    adopted = table.store.load(table.cell_name(ours))
    assert adopted["method"] == "EKD (ours)" and adopted["metrics"]["lfw_acc"] == 0.83
    assert adopted["adopted_from"] == f"cpu3/{table.cell_name(theirs)}"
    # a different setting keeps its own cells
    other = _cpu3(tmp_path / "o", TUNED)
    assert other.cell_name(ours).rsplit("-", 1)[1] != other.cell_name(theirs).rsplit("-", 1)[1]


def test_adopted_cells_are_named_in_the_compute_line_but_not_counted(tmp_path):
    from bench.ekd_ablation import collect_rows, compute_lines

    table = _tuning(tmp_path, ("grid",))
    _commit_tuning(table, "cosine x1", 0, 0.10)  # trained here: 61 s
    adopted = K.Cell("T3", "no KD", 0, 0.5)
    name = table.cell_name(adopted)
    table.store.write(name, {"teacher": "T3", "method": "no KD", "seed": 0, "width": 0.5, "name": name,
                             "metrics": _val(0.1), "train_seconds": 3599.0, "eval_seconds": 1.0,
                             "adopted_from": "ekd_ablation/ablation-cpu2/x"}, None)
    planned = len(table.plan())  # the plan fixes the table's rows
    line = compute_lines(table, collect_rows(table))[0]
    assert line.startswith(f"2 of {planned} cells committed; 0.02 h of cell time")
    assert "not counted: 1 cells adopted" in line and "(1.00 h when they were trained)" in line
