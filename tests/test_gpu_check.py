"""bench/gpu_check.py: the CPU dry run end to end (every row, CUDA-only rows skipped, the
GPU-profile cells timed with the smoke profile, files written where --out says), a failing row
not stopping the others, and the projection arithmetic behind the GPU_EPOCHS recommendation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench.gpu_check as gpu_check
from bench.kd_profiles import GPU_EPOCHS

REPO = Path(__file__).resolve().parents[1]

CUDA_ONLY = {spec.name for spec in gpu_check.ROWS if spec.cuda_only}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu-dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), proc.stdout


def test_dry_run_checks_every_path_and_skips_the_cuda_only_ones(dry_run):
    _, result, _, stdout = dry_run
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [spec.name for spec in gpu_check.ROWS]
    assert {"bf16 autocast", "fp16 autocast + grad scaler", "NCCL under torchrun"} <= CUDA_ONLY
    without_extra = {spec.name for spec in gpu_check.ROWS if gpu_check.missing_packages(spec)}
    for name, row in rows.items():
        if name in CUDA_ONLY:
            assert row["status"] == gpu_check.SKIPPED_NO_CUDA, row
        elif name in without_extra:  # e.g. ONNX export in an environment without the onnx extra
            assert row["status"].startswith("skipped: ") and "not installed" in row["status"], row
        else:
            assert row["status"] == "pass", row
    reference = rows["fp32 reference (CPU)"]["figures"]["first_step_terms"]
    assert {"ce", "loss"} <= set(reference) and all(math.isfinite(v) for v in reference.values())
    for name in ("channels_last", "preloaded training set on the device", "Partial FC + sharded centres (proxylesskd)"):
        figures = rows[name]["figures"]
        assert figures["steps"] >= 1 and figures["step_ms"] > 0 and figures["images_per_s"] > 0
    assert rows["preloaded training set on the device"]["figures"]["loader"] != "DataLoader"
    sharded = rows["Partial FC + sharded centres (proxylesskd)"]["figures"]
    assert sharded["partial_fc"] is True and sharded["class_shard"] is not None
    if "ONNX export from a CUDA model" not in without_extra:
        assert rows["ONNX export from a CUDA model"]["figures"]["max_abs_diff"] < 1e-4
    assert rows["evaluation on the device"]["figures"]["images_per_s"] > 0
    assert result["environment"]["torch"] and result["dry_run"] is True
    assert "0 row(s) failed" in stdout


def test_dry_run_times_the_gpu_profile_cells_and_projects_the_table(dry_run):
    _, result, _, _ = dry_run
    timing = result["timing"]
    assert timing["profile"] == "gpu-smoke"
    assert set(timing["cells"]) == {gpu_check.T1_CELL, gpu_check.NO_KD_CELL, gpu_check.T1_STUDENT_CELL,
                                    gpu_check.T2_STUDENT_CELL}
    for cell in timing["cells"].values():
        assert cell["status"] == "pass" and cell["epoch_s"] > 0 and 0 <= cell["data_wait"] <= 1
    assert timing["eval"]["total_s"] > 0
    epochs = [p["epochs"] for p in result["projection"]]
    assert GPU_EPOCHS in epochs and 1 in epochs
    assert isinstance(result["recommended_epochs"], int) and result["gpu_epochs"] == GPU_EPOCHS
    assert isinstance(result["whole_table_epochs"], int)


def test_dry_run_writes_the_report_where_out_says(dry_run):
    out, result, md, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert "CPU dry run" in md and "GPU_EPOCHS recommendation" in md and "Incomplete" not in md
    assert result["complete"] is True
    for spec in gpu_check.ROWS:
        assert f"| {spec.name} |" in md
    assert md.count(gpu_check.SKIPPED_NO_CUDA) == len(CUDA_ONLY)
    assert "driver" in md and result["environment"]["torch"] in md and "Bundle parts on this machine" in md


def test_a_failing_row_is_recorded_and_the_next_one_runs(monkeypatch, tmp_path):
    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    spec = gpu_check.RowSpec
    rows = [spec("fp32 reference (CPU)", lambda ctx: {"step_ms": 1.0}, False, "the reference"),
            spec("broken path", broken, False, "x"), spec("next path", lambda ctx: {"images_per_s": 5.0}, False, "x"),
            spec("off by far", lambda ctx: {"max_abs_diff": 3.0, "rel_diff": 0.3}, False, "x", 0.1),
            spec("nan loss", lambda ctx: {"first_step_terms": {"ce": float("nan")}}, False, "x"),
            spec("cuda path", broken, True, "x")]
    monkeypatch.setattr(gpu_check, "ROWS", rows)
    ctx = gpu_check.Context("cpu", gpu_check.DRY_SHAPES, tmp_path, reference_model=tmp_path / "model.pt")
    logged = []
    got = {r.name: r for r in gpu_check.run_rows(ctx, logged.append)}
    assert got["broken path"].status == "fail"
    assert got["broken path"].error == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert got["next path"].status == "pass" and got["next path"].figures == {"images_per_s": 5.0}
    assert got["cuda path"].status == gpu_check.SKIPPED_NO_CUDA
    assert got["off by far"].status == "fail" and "relative diff 0.3 above the tolerance 0.1" in got["off by far"].error
    assert got["nan loss"].status == "fail" and "non-finite first-step loss terms" in got["nan loss"].error
    assert gpu_check.judge({"rel_diff": 0.05, "first_step_terms": {"ce": 1.0}}, 0.1) is None
    assert any("Traceback" in line for line in logged)


def test_projection_and_recommended_epochs():
    cell = lambda epoch_s: {"status": "pass", "epoch_s": epoch_s, "setup_s": 2.0}  # noqa: E731
    timing = {"import_s": 3.0, "eval": {"total_s": 5.0},
              "cells": {gpu_check.T1_CELL: cell(10.0), gpu_check.NO_KD_CELL: cell(1.0),
                        gpu_check.T1_STUDENT_CELL: cell(3.0), gpu_check.T2_STUDENT_CELL: cell(2.0)}}
    p = gpu_check.project(timing, 4)
    fixed = 3.0 + 5.0 + 2.0  # Python start, evaluation, setup: per cell
    assert p["t1_s"] == pytest.approx(fixed + 40.0)
    assert p["t1_key_rows_s"] == pytest.approx(5 * fixed + 4 * (1.0 + 4 * 3.0))  # no KD + 4 rows with T1
    assert p["t2_key_rows_s"] == pytest.approx(5 * fixed + 4 * (1.0 + 4 * 2.0))
    assert p["table_s"] == pytest.approx(p["t1_s"] + p["t1_key_rows_s"] + p["t2_key_rows_s"])
    # T1 + T1 rows = 6 * 10 s fixed + 23 s per epoch: 540 s hold 20 epochs, not 21
    assert gpu_check.recommend_epochs(timing) == 20
    assert gpu_check.project(timing, 20)["t1_and_t1_rows_s"] <= 540 < gpu_check.project(timing, 21)["t1_and_t1_rows_s"]
    # the whole table = 11 cells * 10 s fixed + 32 s per epoch: 13 epochs
    assert gpu_check.recommend_epochs(timing, part="table_s") == 13
    timing["cells"][gpu_check.T1_CELL] = {"status": "fail", "error": "x"}
    assert gpu_check.project(timing, 4) is None and gpu_check.recommend_epochs(timing) is None


def test_the_nccl_rows_config_is_one_ekd_train_reads(tmp_path):
    """The NCCL row hands ``ekd train`` a YAML dump of the check config: it must load as is."""
    import yaml

    from ekd.config import load_config

    ctx = gpu_check.Context("cuda", gpu_check.GPU_SHAPES, tmp_path, tmp_path / "faces", tmp_path / "teacher_t2")
    tree = gpu_check.check_tree(ctx)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.train.device == "cuda" and cfg.teacher.kind == "cache" and cfg.distill[0].name == "ekd"
    assert cfg.data.input_size == 112 and cfg.train.max_steps_per_epoch == gpu_check.GPU_SHAPES.steps


def test_bundle_parts_are_listed_with_their_sizes(tmp_path):
    for name, size in (("part1", 3 << 20), ("part2", 1 << 19)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.json").write_text(json.dumps({"bytes": size, "files": {}}))
    assert gpu_check.bundle_parts(tmp_path) == {"part1": 3.0, "part2": 0.5}
    assert gpu_check.bundle_parts(tmp_path / "absent") == {}


def test_a_report_written_while_running_says_it_is_incomplete(tmp_path):
    result = {"dry_run": False, "complete": False, "command": "python bench/gpu_check.py", "seconds": 42.0,
              "environment": {"device": "NVIDIA H200", "gpus": 1, "driver": "580", "torch": "2.11", "cuda": "13.0",
                              "cudnn": 91000, "nccl": "2.27", "python": "3.12", "platform": "linux", "cpu_count": 16,
                              "git_commit": "abc"},
              "shapes": {}, "bundle_parts": {"part1": 49.9}, "timing": None, "projection": None,
              "rows": [{"name": "bf16 autocast", "status": "pass", "figures": {"step_ms": 12.5, "rel_diff": 0.01,
                                                                              "max_abs_diff": 0.4},
                        "error": None, "note": "first-step loss terms vs CPU fp32"}]}
    md, js = gpu_check.write_report(tmp_path, result)
    text = md.read_text()
    assert "**Incomplete**" in text and "after 42 s" in text and "Not projected" in text
    assert "| bf16 autocast | pass | 12.5 |" in text and "part1 49.9 MiB" in text and "NVIDIA H200" in text
    assert json.loads(js.read_text())["complete"] is False
