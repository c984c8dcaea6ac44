"""The demo's data when the teacher trains on more identities than the students: the students'
folder holds exactly the teacher's first identities (byte-identical images), the evaluation
identities are disjoint from every training identity, and the configs point at the right data."""

from __future__ import annotations

import filecmp
from dataclasses import replace
from pathlib import Path

from ekd.commands import demo as D
from ekd.config import read_yaml

PLAN = replace(D.QUICK, train_identities=3, train_images=2, teacher_identities=6,
               eval_identities=3, eval_images=2, num_pairs=6, identities_per_batch=2,
               random_size=4)


def _ids(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_students_get_the_teachers_first_identities_and_eval_is_disjoint(tmp_path):
    root = D.prepare_data(PLAN, tmp_path)
    data = tmp_path / "data"
    assert root == data / "train_students"
    teacher_ids, student_ids, eval_ids = _ids(data / "train"), _ids(root), _ids(data / "eval")
    assert len(teacher_ids) == 6 and student_ids == teacher_ids[:3] and len(eval_ids) == 3
    assert not set(eval_ids) & set(teacher_ids)
    for ident in student_ids:
        files = sorted(p.name for p in (root / ident).iterdir())
        assert len(files) == 2
        match, mismatch, errors = filecmp.cmpfiles(root / ident, data / "train" / ident, files,
                                                   shallow=False)
        assert match == files and not mismatch and not errors


def test_prepared_students_folder_is_reused_then_remade_when_the_plan_changes(tmp_path):
    root = D.prepare_data(PLAN, tmp_path)
    image = root / "id_00000" / "0000.png"
    stamp = image.stat().st_mtime_ns
    D.prepare_data(PLAN, tmp_path)
    assert image.stat().st_mtime_ns == stamp  # same plan: nothing regenerated
    D.prepare_data(replace(PLAN, train_identities=2), tmp_path)
    assert _ids(root) == ["id_00000", "id_00001"]


def test_configs_train_teacher_on_all_and_students_on_their_subset(tmp_path):
    D.prepare_data(PLAN, tmp_path)
    teacher = D.teacher_config(PLAN, tmp_path, "cpu")
    assert teacher.data.kind == "synthetic" and teacher.data.synthetic.train_identities == 6
    student = D.student_config(PLAN, tmp_path, "nokd", 0, "cpu")
    assert student.data.kind == "folder"
    assert student.data.root == str(tmp_path / "data" / "train_students")
    same = replace(PLAN, teacher_identities=None)
    assert not same.students_subset and same.teacher_ids == 3
    assert D.student_config(same, tmp_path, "nokd", 0, "cpu").data.kind == "synthetic"


def test_the_demo_runs_the_measured_plan_g():
    import bench.demo_plans as demo_plans

    assert demo_plans.CANDIDATES["G"] == D.FULL  # docs/results/demo_synthetic.md measures G
    assert D.FULL.students_subset and D.QUICK.students_subset  # the quick run takes the same path
    assert D.QUICK.methods == D.FULL.methods == ("cosine", "adadistill", "ekd")
    assert D.QUICK.ekd == D.FULL.ekd == D.CPU3_EKD == {}  # cpu3's EKD preset: the authors' loss


def test_every_demo_method_distils_from_the_teacher_cache_with_its_tables_settings(tmp_path):
    D.prepare_data(PLAN, tmp_path)
    for method in D.DEMO_METHODS:
        cfg = D.student_config(PLAN, tmp_path, method, 1, "cpu")
        assert cfg.teacher.kind == "cache" and cfg.teacher.path == str(tmp_path / "teacher_cache")
        assert cfg.distill == D.DEMO_METHODS[method][1](PLAN) and cfg.train.seed == 1
    ada = D.student_config(PLAN, tmp_path, "adadistill", 0, "cpu").distill[0]
    zoo = read_yaml(Path(__file__).resolve().parents[1] / "configs" / "zoo" / "adadistill.yaml")["distill"][0]
    assert ada.name == "adadistill" and ada.weight == 1.0
    assert ada.params == zoo["params"]  # the cpu3 table's AdaDistill: the authors' settings


def test_the_demos_settings_are_the_cpu3_tables_committed_choices(tmp_path):
    """EKD's preset and cosine's weight come from the committed validation-split cells of cpu3."""
    import bench.kd_table as K

    tuned = K.Table(K.CPU3, tmp_path / "faces", tmp_path / "cache", None).profile.tuned
    assert tuned["EKD (ours)"] == [{"name": "ekd", "weight": 1.0, "params": D.CPU3_EKD}]
    cosine = D.cosine_section(D.FULL)[0]
    assert tuned["cosine"] == [{"name": "cosine", "weight": cosine.weight, "params": cosine.params}]
