"""The EKD ablation bench without real faces: a fixed identity split, valid configs for every
row (each a distiller build away from training), and the report built from committed cells."""

from __future__ import annotations

import pytest

import bench.ekd_ablation as A
from ekd.config import Config, from_dict, validate
from ekd.distill import build_distiller


def test_split_is_fixed_disjoint_and_a_tenth(tmp_path):
    for i in range(50):
        (tmp_path / f"id{i:03d}").mkdir()
    train, val = A.split_identities(tmp_path)
    assert len(val) == 5 and not set(train) & set(val) and len(train) + len(val) == 50
    assert A.split_identities(tmp_path) == (train, val)  # no hidden state
    assert val != [f"id{i:03d}" for i in range(5)]  # permuted, not the first names


def test_every_row_is_a_valid_half_width_config(tmp_path):
    table = A.Ablation(A.CPU2, tmp_path / "faces", tmp_path / "cache", tmp_path / "results", list(A.ROWS), 2)
    cells = table.plan()
    assert len(cells) == 2 * len(A.ROWS) and {c.width for c in cells} == {0.5}
    names = set()
    for cell in cells:
        tree = table.config_tree(cell)
        cfg = from_dict(Config, tree)
        validate(cfg)
        assert cfg.data.root == str(table.split / "train") and cfg.model.width == 0.5
        assert cfg.data.input_size == A.CPU2.input_size and cfg.train.epochs == A.CPU2.epochs
        if A.ROWS[cell.method] is None:
            assert cfg.teacher.kind == "none" and not cfg.distill
        else:
            assert cfg.teacher.path == str(table.split / "teacher_t2")
            for d in cfg.distill:
                build_distiller(d.name, d.weight, **d.params, student_dim=128, teacher_dim=128)
        names.add(table.cell_name(cell))
    assert len(names) == len(cells)  # every (row, seed) its own cell
    variants = [r for r in A.ROWS if r.startswith("ours + ")]
    assert len(variants) >= 5


def test_report_from_committed_cells(tmp_path):
    table = A.Ablation(A.CPU2, tmp_path / "faces", tmp_path / "cache", tmp_path / "results",
                       ["no KD", "EKD (ours)"], 2)
    table.store.write("T2-teacher", {"metrics": {"val_tpr@1e-3": 0.5, "val_tpr@1e-4": 0.3, "val_auc": 0.9,
                                                 "val_images": 10, "val_pairs": 45}}, None)
    values = {("no KD", 0): 0.10, ("no KD", 1): 0.12, ("EKD (ours)", 0): 0.20, ("EKD (ours)", 1): 0.22}
    for (row, seed), v in values.items():
        cell = A.Cell("T2", row, seed, 0.5)
        table.store.write(table.cell_name(cell), {"metrics": {"val_tpr@1e-3": v, "val_tpr@1e-4": v / 2,
                                                              "val_tpr@1e-5": None, "val_auc": 0.8},
                                                  "train_seconds": 600.0, "eval_seconds": 60.0}, None)
    text = A.report(table, tmp_path / "out").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| EKD (ours)"))
    # gap closed @1e-3: (0.21 - 0.11) / (0.5 - 0.11) = 26%; @1e-4: (0.105 - 0.055) / (0.3 - 0.055) = 20%
    assert "0.2100 ± 0.0141" in row and "+26%" in row and "+20%" in row and "| 11 |" in row
    assert "4 of 4 cells committed; 0.73 h" in text
    assert "Chosen: **EKD (ours)**." in text  # no variant ran: plain EKD (ours)


def _rec(tpr4: float, tpr3: float) -> dict:
    return {"metrics": {"val_tpr@1e-4": tpr4, "val_tpr@1e-3": tpr3}}


def _rows(**variants: tuple[tuple[float, float], ...]) -> dict:
    rows = {"no KD": [_rec(0.060, 0.130), _rec(0.062, 0.132)],
            "EKD (authors)": [_rec(0.058, 0.140), _rec(0.060, 0.142)],
            "EKD (ours)": [_rec(0.064, 0.140), _rec(0.066, 0.141)]}
    rows.update({name: [_rec(*seed) for seed in seeds] for name, seeds in variants.items()})
    return rows


def test_preset_is_the_variant_that_beats_ours_beyond_the_seed_spread():
    rows = _rows(**{"ours + a": ((0.070, 0.140), (0.072, 0.141)),   # +0.006 > spread 0.002
                    "ours + b": ((0.064, 0.140), (0.070, 0.141)),   # +0.002 < its spread 0.006
                    "ours + c": ((0.080, 0.120), (0.080, 0.120))})  # 1e-3 falls by 0.0205
    chosen, reasons = A.choose_preset(rows, seeds=2)
    assert chosen == "ours + a"
    verdicts = {r.split(":")[0]: r.rsplit("-> ", 1)[1] for r in reasons if "->" in r}
    assert verdicts == {"ours + a": "helps", "ours + b": "does not help", "ours + c": "does not help"}


def test_preset_falls_back_to_the_better_plain_ekd_and_waits_for_every_seed():
    rows = _rows(**{"ours + a": ((0.065, 0.140), (0.066, 0.141))})
    assert A.choose_preset(rows, seeds=2)[0] == "EKD (ours)"
    rows["EKD (authors)"] = [_rec(0.080, 0.150), _rec(0.081, 0.150)]
    assert A.choose_preset(rows, seeds=2)[0] == "EKD (authors)"
    rows["ours + a"] = rows["ours + a"][:1]
    chosen, reasons = A.choose_preset(rows, seeds=2)
    assert chosen is None and "ours + a" in reasons[0]


def test_the_tables_ekd_ours_is_the_ablations_preset(tmp_path):
    """Once every ablation cell is committed, bench/kd_profiles.py's "EKD (ours)" must be the
    preset the rule chose (adopting it is a change of EKD_OURS; until then this skips)."""
    import bench.kd_profiles as kd_profiles

    table = A.Ablation(A.CPU2, tmp_path / "faces", tmp_path / "cache", A.RESULTS, list(A.ROWS), 2)
    rows = {r: [x for s in range(2) if (x := table.result(A.Cell("T2", r, s, A.WIDTH)))]
            for r in A.ROWS}
    done = sum(map(len, rows.values()))
    assert done >= 1, "the committed ablation cells are not found under their names"
    chosen, _ = A.choose_preset(rows, seeds=2)
    if chosen is None:
        pytest.skip(f"the ablation is incomplete ({done} of {2 * len(A.ROWS)} cells committed)")
    assert [kd_profiles.EKD_OURS] == A.ROWS[chosen]
