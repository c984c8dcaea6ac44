"""KD table v2 machinery without real faces: pinned v1 hashes, the cpu2 plan (two students),
committed cells, significance rule, the convergence criterion and report arithmetic from
synthetic per-cell JSONs."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import bench.kd_convergence as C
import bench.kd_convergence_criterion as V
import bench.kd_significance as S
import bench.kd_table as K
import bench.kd_report as R
import bench.kd_summary as M
from bench.kd_profiles import V2_SEEDED
from bench.kd_protocols import METRICS


def _table(tmp_path, profile=K.CPU2):
    return K.Table(profile, tmp_path / "faces", tmp_path / "cache", tmp_path / "results")


def test_cpu_profile_cell_hashes_are_those_of_v1(tmp_path):
    # names computed with the v1 bench/kd_table.py (before profiles, widths and the store)
    table = _table(tmp_path, K.CPU)
    assert table.cell_name(K.Cell("T2", "no KD", 0)) == "T2-no_kd-s0-29a490af92ed"
    assert table.cell_name(K.Cell("T2", "EKD (ours)", 1)) == "T2-ekd__ours-s1-ffca02577dc9"
    assert table.cell_name(K.Cell("T2", "sp", 0)) == "T2-sp-s0-04d43649856a"


def test_adopting_a_preset_changes_ekd_ours_in_v2_only(tmp_path, monkeypatch):
    """The ablation's preset replaces kd_profiles.EKD_OURS: the v2 table's "EKD (ours)" cells
    change with it, the v1 table's committed cells keep their names."""
    import bench.kd_profiles as kd_profiles

    v1, v2 = _table(tmp_path, K.CPU), _table(tmp_path, K.CPU2)
    cell = K.Cell("T2", "EKD (ours)", 1)
    before = v2.cell_name(cell)
    preset = {**kd_profiles.EKD_OURS, "params": {**kd_profiles.EKD_OURS["params"], "memory_size": 8192}}
    monkeypatch.setattr(kd_profiles, "EKD_OURS", preset)
    assert v1.cell_name(cell) == "T2-ekd__ours-s1-ffca02577dc9"
    assert v2.cell_name(cell) != before
    assert v2.config_tree(K.Cell("T2", "EKD + AdaDistill", 0))["distill"][0] == preset


def test_cpu2_plan_two_students_rows_and_seeds(tmp_path):
    assert K.CPU2.drop == ()  # the cpu2 profile runs every row (it fits its budget)
    table = _table(tmp_path)
    plan = table.plan()
    full = {(c.method, c.seed) for c in plan if c.width == 1.0}
    half = {(c.method, c.seed) for c in plan if c.width == 0.5}
    assert half == {(m, s) for m in ("no KD", "EKD (authors)", "EKD (ours)", "proxylesskd") for s in range(3)}
    for m in ("no KD", "EKD (authors)", "EKD (ours)", "AdaDistill", "proxylesskd"):
        assert {s for mm, s in full if mm == m} == {0, 1, 2}
    for m in ("EKD + AdaDistill", "rkd", "kd", "coupleface", "gkd", "icd_face", "unified_kd"):
        assert {s for mm, s in full if mm == m} == {0}
    assert len(plan) == 15 + 12 + 11 + 4
    # every seed of the three-seed rows runs before the one-seed rows
    seeded = [i for i, c in enumerate(plan) if c.method in V2_SEEDED or c.width == 0.5]
    assert seeded == list(range(len(seeded))) and plan[len(seeded)].method not in V2_SEEDED
    for i, m in enumerate(("coupleface", "gkd", "icd_face", "unified_kd")):
        _commit(table, K.Cell("T2", m, 0), tpr={"icd_face": 0.3}.get(m, 0.1 + 0.01 * i))
    plan = table.plan()
    assert len(plan) == 44 and {c.seed for c in plan if c.method == "icd_face"} == {0, 1, 2}
    assert [(c.method, c.seed) for c in plan[-2:]] == [("icd_face", 1), ("icd_face", 2)]
    # over budget, `drop` removes the three weakest v1 one-seed rows first, no three-seed row
    from bench.kd_profiles import WEAKEST_V1

    dropped = _table(tmp_path, dataclasses.replace(K.CPU2, drop=WEAKEST_V1)).plan()
    assert WEAKEST_V1 == ("kd", "margin_distill", "fitnet")
    assert not {c.method for c in dropped} & set(WEAKEST_V1) and len(dropped) == 41
    assert {c.method for c in dropped if c.seed == 0} >= {"no KD", "EKD (ours)", "proxylesskd", "rkd", "EKD + AdaDistill"}


def test_half_width_config_and_loader_settings_outside_the_hash(tmp_path):
    table = _table(tmp_path)
    half, full = K.Cell("T2", "EKD (ours)", 0, 0.5), K.Cell("T2", "EKD (ours)", 0)
    assert table.config_tree(half)["model"]["width"] == 0.5 and "width" not in table.config_tree(full)["model"]
    assert table.cell_name(half).startswith("T2-w0.5-ekd__ours-s0-") and table.cell_name(half) != table.cell_name(full)
    tree = table.config_tree(full)
    loaded = {**tree, "data": {**tree["data"], "preload": True, "num_workers": 8}}
    assert table.digest(loaded) == table.digest(tree)


def test_memory_layout_is_recorded_but_outside_the_hash(tmp_path):
    from bench.kd_cells import layout_summary, recorded_channels_last

    cell = K.Cell("T2", "EKD (ours)", 0, 0.5)
    assert _table(tmp_path).config_tree(cell)["train"]["channels_last"] is True  # cpu2: NHWC
    assert _table(tmp_path, K.CPU).config_tree(cell)["train"]["channels_last"] is False  # v1 as run
    tree = _table(tmp_path).config_tree(cell)
    flipped = {**tree, "train": {**tree["train"], "channels_last": False}}
    assert _table(tmp_path).digest(flipped) == _table(tmp_path).digest(tree)
    assert _table(tmp_path).digest({**tree, "train": {**tree["train"], "seed": 1}}) != _table(tmp_path).digest(tree)
    # a record without the key was trained in NCHW (the trainer ignored the key on CPU then)
    old, new = {"config": {"train": {"seed": 0}}}, {"config": {"train": {"channels_last": True}}}
    assert not recorded_channels_last(old) and recorded_channels_last(new)
    assert "1 cell(s) NHWC" in layout_summary([old, new]) and "1 NCHW" in layout_summary([old, new])


def test_compiled_step_is_recorded_but_outside_the_hash(tmp_path):
    from bench.kd_cells import layout_summary, recorded_compile

    cell = K.Cell("T2", "EKD (ours)", 0)
    tree = _table(tmp_path).config_tree(cell)
    assert tree["train"]["compile"] is True  # cpu2 cells compile the student's step
    assert _table(tmp_path, K.CPU).config_tree(cell)["train"]["compile"] is False  # v1 as run
    eager = {**tree, "train": {**tree["train"], "compile": False}}
    assert _table(tmp_path).digest(eager) == _table(tmp_path).digest(tree)
    assert _table(tmp_path).cell_name(cell).endswith(_table(tmp_path).digest(eager))
    old, new = {"config": {"train": {"seed": 0}}}, {"config": {"train": {"compile": True}}}
    assert not recorded_compile(old) and recorded_compile(new)
    assert "1 compiled (`train.compile`), 1 eager" in layout_summary([old, new])


def test_cell_runner_replans_only_when_a_cell_ends(tmp_path, monkeypatch):
    """run_all starts ``jobs`` cells at a time and reads the plan again only when one ends (it
    used to re-plan, reading every committed record, every 2 s while cells ran)."""
    import os
    import types

    import bench.kd_cells as kd_cells

    real_sleep = kd_cells.time.sleep
    monkeypatch.setattr(kd_cells.time, "sleep", lambda s: real_sleep(0.02))  # poll often

    runner = tmp_path / "runner.py"
    runner.write_text("import pathlib, sys, time\nd = pathlib.Path(sys.argv[2])\ntime.sleep(0.5)\n"
                      "(d / 'done').write_text('1')\n")

    class FakeTable:
        profile = types.SimpleNamespace(name="fake", threads=1)

        def __init__(self):
            self.runner, self.calls, self.started = runner, 0, []
            self.dirs = [tmp_path / f"c{i}" for i in range(5)]

        def pending(self):
            self.calls += 1
            return [(d.name, d, {}) for d in self.dirs if not (d / "done").exists()]

        def plan(self):
            return self.dirs

        def result(self, d):
            return (d / "done").exists()

        def write_cell(self, d, spec):
            d.mkdir(exist_ok=True)
            self.started.append(d.name)

    table = FakeTable()
    elsewhere = table.dirs[0]  # run by another runner's process (this one): skipped
    elsewhere.mkdir()
    (elsewhere / kd_cells.LOCK).write_text(str(os.getpid()))
    kd_cells.run_all(table, jobs=2)
    assert table.started == [d.name for d in table.dirs[1:]] and not (elsewhere / "done").exists()
    assert all((d / "done").exists() for d in table.dirs[1:])
    assert table.calls <= 1 + len(table.dirs)  # the start, then once per ended cell


def test_a_cell_run_by_another_runner_is_skipped(tmp_path):
    """A cell's cache folder holds the pid of the process running it: a second runner on the same
    cache does not start it (two trainings would write the same checkpoints), a second process
    cannot take it, and the lock of a process that has ended is free."""
    import os
    import subprocess
    import sys

    from bench.kd_cells import LOCK, hold_lock, lock_holder

    busy, free = tmp_path / "busy", tmp_path / "free"
    busy.mkdir()
    free.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (busy / LOCK).write_text(str(other.pid))
        assert lock_holder(busy) == other.pid and lock_holder(free) is None
        with pytest.raises(SystemExit, match=f"already running in process {other.pid}"):
            hold_lock(busy)
    finally:
        other.kill()
        other.wait()
    assert lock_holder(busy) is None  # its process ended: free again
    hold_lock(busy)
    assert lock_holder(busy) == os.getpid()


def _commit(table, cell, tpr, acc=0.8, boot_shift=None, seconds=100.0):
    """A committed cell (record + bootstrap samples) as kd_cells writes it."""
    name = table.cell_name(cell)
    metrics = {m: acc for m in METRICS}
    metrics.update({"lfw_tpr@1e-3": tpr + 0.1, "lfw_tpr@1e-4": tpr, "lfw_tpr@1e-5": tpr / 2,
                    "roc_fpr": [1e-4, 1.0], "roc_tpr": [tpr, 1.0]})
    record = {"teacher": cell.teacher, "method": cell.method, "seed": cell.seed, "width": cell.width,
              "name": name, "metrics": metrics, "train_seconds": seconds, "eval_seconds": 10.0,
              "bootstrap_seconds": 5.0}
    rng = np.random.default_rng(cell.seed)  # same "resamples" noise for every cell of a seed
    base = np.clip(tpr + 0.02 * rng.standard_normal((1000, 3)), 0, 1)
    samples = base + (0.0 if boot_shift is None else boot_shift)
    boot = {"protocol": "p", "seed": 0, "resamples": 1000, "fprs": [1e-3, 1e-4, 1e-5],
            "tpr_millionths": np.round(samples.T * 1e6).astype(int).tolist()}
    table.store.write(name, record, boot)
    return name


def test_committed_cells_are_results_and_are_skipped(tmp_path):
    table = _table(tmp_path)
    cell = K.Cell("T2", "no KD", 1, 0.5)
    before = [p[0] for p in table.pending()]
    name = _commit(table, cell, 0.2)
    assert name in before and name not in [p[0] for p in table.pending()]
    assert table.result(cell)["metrics"]["lfw_tpr@1e-4"] == 0.2
    np.testing.assert_allclose(table.store.load_boot(name)["samples"].shape, (1000, 3))


def test_cache_results_of_v1_are_committed_with_hash_and_portable_config(tmp_path):
    table = _table(tmp_path, K.CPU)
    cell = K.Cell("T2", "sp", 0)
    d = table.cell_dir(cell)
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"teacher": "T2", "method": "sp", "seed": 0, "metrics": {},
                                               "train_seconds": 1.0, "eval_seconds": 1.0}))
    assert table.commit_cached() == [table.cell_name(cell)]
    record = table.store.load(table.cell_name(cell))
    assert record["migrated_from_cache"] and record["hash"] == "04d43649856a"
    assert record["config"]["data"]["root"] == "<faces>/train"
    assert table.commit_cached() == []


def test_real_difference_needs_every_seed_on_one_side():
    up, zero, down = np.array([[0.01, 0.03]]), np.array([[-0.01, 0.02]]), np.array([[-0.03, -0.01]])
    assert S.verdict([up, up, up]) == ["+"]
    assert S.verdict([up, zero, up]) == [""]
    assert S.verdict([down, down]) == ["-"]
    assert S.verdict([up, down]) == [""]
    a = {"protocol": "p", "seed": 0, "fprs": [1e-3], "samples": np.full((10, 1), 0.5)}
    np.testing.assert_array_equal(S.paired_interval(a, a), [[0.0, 0.0]])
    with pytest.raises(ValueError, match="different resamples"):
        S.paired_interval(a, {**a, "protocol": "q"})


def test_paired_difference_keeps_negative_differences():
    """A method below its reference on every resample has a paired interval below 0 (a worse
    method must be reported as worse, not as an interval of only its rare positive resamples);
    unmeasurable resamples (-1) drop out of both the TPR and the difference."""
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.2, 0.3, size=(1000, 3))
    worse = ref - rng.uniform(0.01, 0.02, size=(1000, 3))
    worse[0, 0] = -1.0  # not measurable in resample 0 at the first FPR
    a = {"protocol": "p", "seed": 0, "fprs": [1e-3, 1e-4, 1e-5], "samples": worse}
    b = {**a, "samples": ref}
    d = S.paired_interval(a, b)
    assert np.all(d[:, 1] < 0) and np.all(d[:, 0] >= -0.02 - 1e-9)
    diff = worse - ref
    diff[0, 0] = np.nan
    np.testing.assert_allclose(d, np.nanpercentile(diff, [2.5, 97.5], axis=0).T)
    assert S.verdict([d]) == ["-", "-", "-"]
    runs = [{"name": "x", "method": "EKD (ours)", "seed": 0}, {"name": "y", "method": "no KD", "seed": 0}]
    sig = S.significance(runs, {"x": a, "y": b})
    assert sig["EKD (ours)"]["real"]["no KD"] == ["-", "-", "-"]
    assert sig["EKD (ours)"]["tpr"][0][0][0] >= 0  # the -1 entry is not a TPR


def test_report_from_synthetic_committed_cells(tmp_path):
    table = _table(tmp_path)
    teacher = {m: 0.9 for m in METRICS} | {"lfw_tpr@1e-4": 0.6, "roc_fpr": [1e-4, 1.0], "roc_tpr": [0.6, 1.0]}
    table.store.write("T2-teacher", {"teacher": "T2", "method": "teacher", "metrics": teacher}, None)
    for seed in range(3):
        for width, base in ((1.0, 0.2), (0.5, 0.1)):
            _commit(table, K.Cell("T2", "no KD", seed, width), base)
            # EKD (ours) is better on every resample of every seed; EKD (authors) only equal
            _commit(table, K.Cell("T2", "EKD (ours)", seed, width), base + 0.1, boot_shift=0.1)
            _commit(table, K.Cell("T2", "EKD (authors)", seed, width), base)
    out = R.write_report(table, tmp_path / "out", 0.0, ["python", "bench/kd_table.py", "--profile", "cpu2"])
    text = out.read_text()
    # gap closed at TPR@1e-4 per student: full (0.3-0.2)/(0.6-0.2) = 25%, half (0.2-0.1)/(0.6-0.1) = 20%
    assert "| EKD (ours) (T2) | +25.0% | +20.0% |" in text
    assert "Incomplete" in text and "MobileFaceNet ×0.5 width" in text
    real = [line for line in text.splitlines() if line.startswith("| EKD (ours) | real |")]
    assert len(real) == 2 and all("no KD: @1e-3 ✓+, @1e-4 ✓+, @1e-5 ✓+" in line for line in real)
    assert not any(line.startswith("| EKD (authors) | real |") for line in text.splitlines())
    assert (tmp_path / "out" / "kd_table_cpu2_capacity.png").stat().st_size > 1000
    assert (tmp_path / "out" / "kd_table_cpu2_t2_w0.5_roc.png").is_file()
    # compute: 18 cells x (100 + 10 + 5) s
    assert f"{18 * 115 / 3600:.2f} h of cell time" in text
    # the README block: numbers and words from the same cells
    summary = (tmp_path / "out" / "kd_table_cpu2_summary.md").read_text()
    assert summary.startswith(M.markers("cpu2")[0]) and summary.rstrip().endswith(M.markers("cpu2")[1])
    assert "T2 → MobileFaceNet ×0.5 width" in summary and "table complete" not in summary
    half = next(p for p in summary.split("\n\n") if p.startswith("**T2 → MobileFaceNet ×0.5"))
    assert "best at TPR@1e-4 is **EKD (ours)** (0.2000 ± 0.0000, +20.0% of the gap; difference to no KD better)" in half
    assert "EKD (authors) closes +0.0%; EKD (ours) closes +20.0%." in half
    assert "Really better than no KD at TPR@1e-4 (every seed's interval): EKD (ours)." in half
    assert "| T2 → MobileFaceNet ×0.5 width (0.33 M parameters) | EKD (authors) | 3 | 0.8000 | 0.1000 ± 0.0000 | +0.0% | within noise |" in summary
    assert "Trained to chance" not in text + summary
    assert text.count("No run trained to chance (LFW accuracy below 0.55): none diverged.") == 2  # per student


def test_a_run_at_chance_is_named_in_report_and_summary(tmp_path):
    """A diverged seed (LFW accuracy at chance) stays in the means and is named, per student."""
    table = _table(tmp_path)
    teacher = {m: 0.9 for m in METRICS} | {"lfw_tpr@1e-4": 0.6, "roc_fpr": [1e-4, 1.0], "roc_tpr": [0.6, 1.0]}
    table.store.write("T2-teacher", {"teacher": "T2", "method": "teacher", "metrics": teacher}, None)
    for seed in range(2):
        _commit(table, K.Cell("T2", "no KD", seed), 0.2)
        _commit(table, K.Cell("T2", "no KD", seed, 0.5), 0.1)
    _commit(table, K.Cell("T2", "AdaDistill", 0), 0.2)
    _commit(table, K.Cell("T2", "AdaDistill", 1), 0.0003, acc=0.5005)
    out = R.write_report(table, tmp_path / "out", 0.0, ["python", "bench/kd_table.py"])
    said = "Trained to chance: AdaDistill seed 1 (LFW accuracy 0.5005)"
    sections = out.read_text().split("## ")
    assert [said in sec for sec in sections if sec.startswith("T2")] == [True, False]  # full, half width
    summary = (tmp_path / "out" / "kd_table_cpu2_summary.md").read_text()
    assert summary.count(said) == 1
    assert "| AdaDistill | 2 | " in out.read_text()  # kept in the means


def test_summary_says_when_no_distiller_wins_and_readme_block_is_replaced(tmp_path):
    summary = {"no KD": {"seeds": [0, 1], "mean": {"lfw_acc": 0.8, "lfw_tpr@1e-4": 0.1}, "std": {"lfw_tpr@1e-4": 0.01}},
               "EKD (ours)": {"seeds": [0, 1], "mean": {"lfw_acc": 0.85, "lfw_tpr@1e-4": 0.09},
                              "std": {"lfw_tpr@1e-4": 0.01}}}
    sig = {"EKD (ours)": {"real": {"no KD": ["", "-", ""]}}}
    rows, words = M.student_summary("S", summary, {"lfw_tpr@1e-4": 0.6}, sig)
    assert "**no distiller beats no KD at TPR@1e-4**; the closest is EKD (ours) (0.0900 ± 0.0100, -2.0% of the gap)" in words
    assert "Really worse than no KD at TPR@1e-4 (every seed's interval): EKD (ours)." in words
    assert "Best LFW accuracy: EKD (ours) (0.8500; no KD 0.8000)." in words
    assert rows[1] == "| S | EKD (ours) | 2 | 0.8500 | 0.0900 ± 0.0100 | -2.0% | worse |"
    begin, end = M.markers("cpu2")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
    assert M.update_readme(readme, "cpu2", f"{begin}\nnew\n{end}")
    assert readme.read_text() == f"intro\n{begin}\nnew\n{end}\noutro\n"
    readme.write_text("no markers\n")
    assert not M.update_readme(readme, "cpu2", f"{begin}\nnew\n{end}")
    assert readme.read_text() == "no markers\n"


def test_convergence_criterion_and_report(tmp_path):
    def runs(accs, tprs):
        return [{"metrics": {"lfw_acc": a, "lfw_tpr@1e-3": t}} for a, t in zip(accs, tprs)]

    ok = V.verdict(runs([0.83, 0.832], [0.20, 0.21]), runs([0.835, 0.836], [0.205, 0.215]))
    assert ok["converged"] and ok["d_acc"] == pytest.approx(0.0045)
    by_spread = V.verdict(runs([0.83, 0.83], [0.20, 0.26]), runs([0.83, 0.83], [0.25, 0.27]))
    assert by_spread["rel_tpr3"] > 0.05 and by_spread["converged"]  # 0.03 < spread 0.06
    assert not V.verdict(runs([0.80, 0.80], [0.2, 0.2]), runs([0.82, 0.82], [0.2, 0.2]))["converged"]
    sweep = C.Sweep(tmp_path / "faces", tmp_path / "cache", tmp_path / "results", (32,), (2,), 2)
    assert len(sweep.plan()) == 4 and len(sweep.pending()) == 4
    # several E share their cells: 2 -> 4 and 4 -> 8 need 2, 4 and 8 epochs
    chain = C.Sweep(tmp_path / "faces", tmp_path / "cache", tmp_path / "results", (32,), (4, 2), 2)
    assert sorted({e for _, e, _ in chain.plan()}) == [2, 4, 8] and len(chain.plan()) == 6
    chained = C.report(chain, tmp_path / "chain").read_text()
    assert "| 32 | 2 → 4 | (incomplete)" in chained and "| 32 | 4 → 8 | (incomplete)" in chained
    # at cpu2's own size and epochs a sweep cell is the cpu2 no-KD cell
    same = C.Sweep(tmp_path / "faces", tmp_path / "cache", tmp_path / "results",
                   (K.CPU2.input_size,), (K.CPU2.epochs,), 1)
    assert same.name((K.CPU2.input_size, K.CPU2.epochs, 0)).endswith(
        _table(tmp_path).cell_name(K.Cell("T2", "no KD", 0)))
    text = C.report(sweep, tmp_path / "out").read_text()
    assert "0 of 4 cells committed" in text and "(incomplete)" in text


def test_table_report_shows_the_convergence_evidence(tmp_path):
    import bench.kd_cells as kd_cells

    table = _table(tmp_path)
    s, e = K.CPU2.input_size, K.CPU2.epochs
    store = kd_cells.CellStore(tmp_path / "results" / "convergence")
    for epochs, acc, tpr in ((e, 0.82, 0.20), (2 * e, 0.823, 0.205)):
        for seed in range(2):
            store.write(f"{s}px-{epochs}ep-T2-no_kd-s{seed}-x",
                        {"input_size": s, "epochs": epochs, "seed": seed, "train_seconds": 60.0, "eval_seconds": 0.0,
                         "metrics": {"lfw_acc": acc, "lfw_tpr@1e-3": tpr, "lfw_tpr@1e-4": tpr / 2, "lfw_tpr@1e-5": None}},
                        None)
    store.write("40px-12ep-T2-no_kd-s0-y", {"input_size": 40, "epochs": 12, "seed": 0, "train_seconds": 1.0,
                                            "eval_seconds": 0.0, "metrics": {}}, None)  # another size: left out
    lines = R.convergence_section(table)
    text = "\n".join(lines)
    assert lines[0] == "## Convergence of the no-KD student"
    assert f"The schedule ({e} epochs at {s} px) is converged by the criterion" in text
    assert f"| {s} | {e} → {2 * e} | +0.0030 | +0.0050 (2.5%) | 0.0000 | yes |" in text
    assert "| 40 |" not in text
    assert R.convergence_section(_table(tmp_path, K.CPU)) == []  # the v1 table has no sweep


def test_smoke_profile_and_limited_table(tmp_path):
    tiny = K.smoke(K.GPU)
    assert (tiny.device, tiny.input_size, tiny.epochs, tiny.steps_per_epoch, tiny.t1["epochs"]) == ("cpu", 32, 1, 2, 1)
    table = _table(tmp_path, tiny)
    assert [p[0] for p in table.pending()] == [table.t1_name()]  # T1 trains first
    limited = K.LimitedTable(table, 1, match="ekd__ours")
    assert [p[0] for p in limited.pending()] == [table.t1_name()]  # T1 passes any match
    half = K.LimitedTable(_table(tmp_path, K.CPU2), 2, match="w0.5-")
    names = [p[0] for p in half.pending()]
    assert len(names) == 2 and all("-w0.5-" in n for n in names)
    assert [p[0] for p in half.pending()] == names  # the same two, not the next ones


def test_cell_training_time_adds_up_over_interrupted_invocations(tmp_path):
    import time

    import bench.kd_cells as kd_cells

    clock = tmp_path / "train_clock.json"

    def interrupted():
        time.sleep(0.2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kd_cells.timed(clock, interrupted)
    first = json.loads(clock.read_text())["seconds"]
    assert first >= 0.2
    result, total = kd_cells.timed(clock, lambda: time.sleep(0.1) or "trained")
    assert result == "trained"
    assert total >= first + 0.1 and json.loads(clock.read_text())["seconds"] == pytest.approx(total, abs=0.01)


def test_convergence_cells_become_the_no_kd_cells(tmp_path):
    import bench.kd_cells as kd_cells

    table = _table(tmp_path)
    sweep = C.Sweep(tmp_path / "faces", tmp_path / "cache", tmp_path / "results",
                    (K.CPU2.input_size,), (K.CPU2.epochs,), 1)
    key = (K.CPU2.input_size, K.CPU2.epochs, 0)
    name = table.cell_name(K.Cell("T2", "no KD", 0))
    kd_cells.CellStore(tmp_path / "results" / "convergence").write(
        sweep.name(key), {"hash": name.rsplit("-", 1)[1], "teacher": "none", "metrics": {"lfw_acc": 0.8}},
        {"seed": 0})
    assert table.adopt_convergence() == [name]
    got = table.result(K.Cell("T2", "no KD", 0))
    assert got["metrics"]["lfw_acc"] == 0.8 and got["adopted_from"] == f"convergence/{sweep.name(key)}"
    assert got["teacher"] == "T2"  # the sweep trains without a teacher; the row is the T2 table's
    assert (table.store.root / f"{name}.boot.json").is_file()
    assert table.adopt_convergence() == []  # once
    assert name not in [j[0] for j in table.pending()]
