"""`ekd compare`: identical models are within noise everywhere; a model with planted impostor
errors is worse at low FPR; the intervals are the benchmark's (bench/kd_cells.py +
bench/kd_significance.py) on the same inputs; reports (Markdown, JSON, one ROC plot per set
with every model) and ONNX models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ekd.commands.compare as compare_module
from ekd.commands.cli import main
from ekd.data import generate_identity_folder
from ekd.eval.evaluate import folder_set
from ekd.models import build_backbone
from ekd.utils.checkpoint_io import FORMAT, VERSION, save_atomic

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    generate_identity_folder(root / "faces", num_identities=40, images_per_identity=5, image_size=32, seed=5)
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet", embedding_size=32, input_size=32).eval()
    meta = {"backbone": "mobilefacenet", "embedding_size": 32, "input_size": 32}
    save_atomic({"format": FORMAT, "version": VERSION, "model_meta": meta, "model": model.state_dict()},
                root / "a.pt")
    shutil.copy(root / "a.pt", root / "b.pt")
    return root


def _compare(setup, *extra):
    return main(["compare", str(setup / "a.pt"), str(setup / "b.pt"), "--folder", str(setup / "faces"),
                 "--resamples", "200", "--device", "cpu", *extra])


def test_identical_models_are_within_noise(setup, tmp_path, capsys):
    assert _compare(setup, "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "Paired difference to" in out and "| within noise |" in out
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    rows = report["differences"][str(setup / "b.pt")]["all-pairs"]
    assert set(rows) == {"tpr@1e-2", "tpr@1e-3", "tpr@1e-4"}
    assert all(r["verdict"] == "within noise" and r["difference"] == 0 for r in rows.values())
    assert (tmp_path / "out" / "compare.md").is_file() and (tmp_path / "out" / "roc_all-pairs.png").is_file()
    assert {"auc", "tpr@1e-3"} <= set(report["models"][str(setup / "a.pt")]["sets"]["all-pairs"])


def _embeddings(paths, planted: bool) -> np.ndarray:
    """A good model's embeddings (identity centre + noise; genuine cosine ~0.7, impostor ~0),
    or with planted impostor errors: every image of identity 2k+1 also points at the centre
    of identity 2k, so those impostor pairs score like genuine ones, in every part of the set."""
    labels = np.array([Path(p).parent.name for p in paths])
    names = sorted(set(labels))
    centres = np.random.default_rng(0).standard_normal((len(names), 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    code = np.searchsorted(names, labels)
    noise = 0.12 * np.random.default_rng(1).standard_normal((len(paths), 32))
    emb = centres[code] + noise
    if planted:  # the same genuine scores (noise scaled alike), impostors 2k+1 vs 2k near them
        odd = code % 2 == 1
        emb[odd] = centres[code[odd]] + 2 * centres[code[odd] - 1] + np.sqrt(5) * noise[odd]
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def _plant_impostor_errors(monkeypatch):
    """The first model embedded gives :func:`_embeddings`, the second the planted ones."""
    calls = []

    def embed(module, dataset, *args, **kwargs):
        calls.append(module)
        return _embeddings(dataset.paths, planted=len(calls) == 2)

    monkeypatch.setattr(compare_module, "embed_dataset", embed)


def test_planted_impostor_errors_are_worse_at_low_fpr(setup, tmp_path, monkeypatch):
    _plant_impostor_errors(monkeypatch)
    assert _compare(setup, "--label", "A", "--label", "B", "--out", str(tmp_path)) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())["differences"]["B"]["all-pairs"]
    assert rows["tpr@1e-3"]["verdict"] == "worse" and rows["tpr@1e-3"]["high"] < 0
    assert rows["tpr@1e-4"]["verdict"] in ("worse", "not measurable")


def test_intervals_agree_with_the_benchmark(setup, tmp_path, monkeypatch):
    import bench.kd_cells as kd_cells
    import bench.kd_significance as kd_significance
    _plant_impostor_errors(monkeypatch)
    fprs = ",".join(f"{f:g}" for f in kd_cells.BOOT_FPRS)
    assert _compare(setup, "--label", "A", "--label", "B", "--out", str(tmp_path), "--fprs", fprs,
                    "--resamples", str(kd_cells.BOOT_RESAMPLES), "--seed", str(kd_cells.BOOT_SEED)) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())["differences"]["B"]["all-pairs"]
    # the benchmark's way: each model's .boot.json samples, then the paired interval of two cells
    vset = folder_set(setup / "faces", 32)
    embedded = [_embeddings(vset.dataset.paths, planted) for planted in (False, True)]
    boots = []
    for emb in embedded:
        boot, _ = kd_cells.bootstrap_record(vset.tail(emb, max(kd_cells.BOOT_FPRS), 64.0))
        boot["samples"] = np.asarray(boot["tpr_millionths"], dtype=np.float64).T / 1e6
        boots.append(boot)
    expected = kd_significance.paired_interval(boots[1], boots[0])
    for f, (low, high) in zip(kd_cells.BOOT_FPRS, expected):
        got = rows[f"tpr@{f:.0e}".replace("e-0", "e-")]
        if np.isnan(low):
            assert got["low"] is None
        else:
            assert got["low"] == pytest.approx(low, abs=2e-6) and got["high"] == pytest.approx(high, abs=2e-6)


def test_onnx_model_is_compared(setup, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["export", str(setup / "a.pt"), "--onnx", str(tmp_path / "a.onnx")]) == 0
    assert main(["compare", str(setup / "a.pt"), str(tmp_path / "a.onnx"), "--folder",
                 str(setup / "faces"), "--resamples", "100", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())["differences"]
    assert all(r["verdict"] == "within noise" for r in rows[str(tmp_path / "a.onnx")]["all-pairs"].values())


def test_compare_needs_two_models_and_known_sets(setup, capsys):
    assert main(["compare", str(setup / "a.pt"), "--folder", str(setup / "faces")]) == 2
    assert "at least two models" in capsys.readouterr().err
    assert main(["compare", str(setup / "a.pt"), str(setup / "b.pt")]) == 2
    assert main(["compare", str(setup / "a.pt"), str(setup / "missing.pt"), "--folder",
                 str(setup / "faces")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def _pair_file(setup) -> Path:
    """A pair list over the identity folder: for each identity two genuine pairs and two
    impostor pairs with the next identities."""
    names = sorted(p.name for p in (setup / "faces").iterdir() if p.is_dir())
    lines = []
    for k, name in enumerate(names):
        images = sorted((setup / "faces" / name).iterdir())
        lines += [f"{images[0]} {images[1]} 1", f"{images[2]} {images[3]} 1"]
        for step in (1, 2):
            other = sorted((setup / "faces" / names[(k + step) % len(names)]).iterdir())
            lines.append(f"{images[step]} {other[0]} 0")
    path = setup / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pair_list_gets_accuracy_and_auc_intervals(setup, tmp_path):
    pairs = _pair_file(setup)
    assert main(["compare", str(setup / "a.pt"), str(setup / "b.pt"), "--pairs", str(pairs),
                 "--resamples", "200", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())["differences"][str(setup / "b.pt")]["pairs"]
    assert {"accuracy", "auc"} <= set(rows)
    assert all(rows[m]["verdict"] == "within noise" and rows[m]["difference"] == 0 for m in ("accuracy", "auc"))


def test_planted_impostor_errors_lower_pair_list_accuracy_and_auc(setup, tmp_path, monkeypatch):
    _plant_impostor_errors(monkeypatch)
    pairs = _pair_file(setup)
    assert main(["compare", str(setup / "a.pt"), str(setup / "b.pt"), "--pairs", str(pairs),
                 "--label", "A", "--label", "B", "--resamples", "200", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())["differences"]["B"]["pairs"]
    for metric in ("accuracy", "auc"):
        assert rows[metric]["verdict"] == "worse" and rows[metric]["high"] < 0, (metric, rows[metric])
