"""Reports: `ekd eval` over several models and set kinds (bin, CFP, IJB 1:1 + 1:N) writing
metrics.json, the Markdown tables and one ROC PNG per set; ROC points; and the LFW reference
results of the teacher embeddings on the real faces (skipped, naming what is missing, when ../shared lacks those faces)."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ekd.commands.cli import main
from ekd.commands.eval_report import markdown_table, write_report
from ekd.errors import ConfigError
from ekd.eval.metrics import l2_normalize, tpr_at_fpr, verification_accuracy
from ekd.eval.plots import roc_points, write_roc_plots
from ekd.eval.protocols import all_pairs_scores, cap_per_identity, read_lfw_pairs
from ekd.models import build_backbone
from ekd.utils.checkpoint_io import FORMAT, VERSION

sys.path.insert(0, os.path.dirname(__file__))
from test_cfp import make_cfp  # noqa: E402
from test_ijb import make_ijb  # noqa: E402
from test_verification_bin import pair_folder  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_model(path, seed: int) -> str:
    torch.manual_seed(seed)
    model = build_backbone("mobilefacenet", embedding_size=16, input_size=32)
    torch.save({"format": FORMAT, "version": VERSION, "model": model.state_dict(),
                "model_meta": {"backbone": "mobilefacenet", "embedding_size": 16, "input_size": 32}},
               path)
    return str(path)


def cfp_with_images(root):
    make_cfp(root, folds=(1,), n_same=5, n_diff=5, touch=False)
    proto = root / "Protocol"
    for lst in ("Pair_list_F.txt", "Pair_list_P.txt"):
        for i, line in enumerate((proto / lst).read_text().splitlines()):
            p = proto / line.split()[1]
            p.parent.mkdir(parents=True, exist_ok=True)
            arr = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(p, format="JPEG")
    return root


def test_eval_cli_several_models_and_sets(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "pairs").mkdir()
    pairs = pair_folder(tmp_path / "pairs", n_pairs=10)
    assert main(["data", "make-bin", str(pairs), str(tmp_path / "tiny.bin")]) == 0
    cfp = cfp_with_images(tmp_path / "cfp")
    ijb = make_ijb(tmp_path / "IJBC", subjects=4, per_subject=3, seed=1)
    out = tmp_path / "report"
    argv = ["eval", "--model", save_model(tmp_path / "a.pt", 0), "--label", "teacher",
            "--model", save_model(tmp_path / "b.pt", 1), "--label", "student EKD",
            "--bin", str(tmp_path / "tiny.bin"), "--cfp", str(cfp), "--cfp-folds", "1",
            "--ijb", str(ijb), "--ijb-1n", "--device", "cpu", "--batch-size", "16",
            "--out", str(out), "--plots"]
    capsys.readouterr()
    assert main(argv) == 0
    table = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student EKD"}
    sets = metrics["teacher"]["sets"]
    assert set(sets) == {"tiny", "cfp_ff", "cfp_fp", "IJBC 1:1"}
    assert "_roc" not in json.dumps(metrics) and "_scores" not in json.dumps(metrics)
    assert sets["cfp_fp"]["pairs"] == 10 and "CFP-FP folds [1]" in sets["cfp_fp"]["protocol"]
    assert 0 <= sets["IJBC 1:1"]["1:N"]["top1"] <= 1
    assert set(sets["IJBC 1:1"]["1:N"]["per_gallery"]) == {"G1", "G2"}
    for name in ("tiny", "cfp_ff", "cfp_fp", "IJBC_1_1"):
        png = (out / f"roc_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(png)).size[0] > 300
    md = (out / "results.md").read_text()
    assert md.strip() == table.strip()
    assert md.count("| teacher |") == 6 and "TPIR@FPIR=1e-2" in md and "mean of 2" in md
    assert "- IJBC 1:1: IJBC 1:1 as InsightFace ijb_11.py (TestMode N1D1F1" in md
    assert main(argv[:3] + ["--plots", "--bin", str(tmp_path / "tiny.bin")]) == 2  # no --out


def test_markdown_and_plot_without_matplotlib(tmp_path, monkeypatch):
    roc = {"fpr": [0.0, 0.01, 0.1, 1.0], "tpr": [0.2, 0.5, 0.8, 1.0]}
    res = {"m": {"parameters": 1_000_000, "sets": {
        "s": {"accuracy": 0.9, "accuracy_std": 0.01, "auc": 0.95, "tpr@1e-2": 0.5, "_roc": roc,
              "protocol": "demo protocol"}}}}
    table = markdown_table(res)
    assert "| m | s | 1.00 | 0.9000 ± 0.0100 | 0.9500 | 0.5000 | n/a | n/a | n/a |" in table
    assert table.endswith("- s: demo protocol")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConfigError, match=r"ekd\[plot\]"):
        write_roc_plots(res, tmp_path)
    write_report(res, tmp_path / "noplots")  # plots off: no matplotlib needed
    assert json.loads((tmp_path / "noplots" / "metrics.json").read_text())["m"]["sets"]["s"] == {
        "accuracy": 0.9, "accuracy_std": 0.01, "auc": 0.95, "tpr@1e-2": 0.5,
        "protocol": "demo protocol"}


def test_roc_points_lie_on_the_roc():
    rng = np.random.default_rng(0)
    y = rng.random(50_000) < 0.1
    s = rng.normal(size=y.size) + 2 * y
    pts = roc_points(s, y, num=50)
    f, t = np.array(pts["fpr"]), np.array(pts["tpr"])
    assert f[0] == 0 and f[-1] == t[-1] == 1 and np.all(np.diff(f) >= 0) and np.all(np.diff(t) >= 0)
    for fi, ti in zip(f[1:-1], t[1:-1]):
        assert tpr_at_fpr(s, y, [fi])[fi] == pytest.approx(ti)


LFW_REFERENCE = {"accuracy": 0.989167, "std": 0.004099, "pairs": 20_604_990, "genuine": 14_508,
                 "tpr": {1e-3: 0.9289, 1e-4: 0.7831, 1e-5: 0.5351}}


def test_real_lfw_teacher_reference(lfw_faces):
    faces = lfw_faces
    data = np.load(faces / "teacher_dlib_r29" / "lfw.npz")
    emb = l2_normalize(data["emb"] + data["emb_flip"]).astype(np.float32)
    paths = [str(p) for p in data["paths"]]
    index = {os.path.normpath(faces / "lfw" / p): i for i, p in enumerate(paths)}
    pairs = read_lfw_pairs(faces / "lfw" / "pairs.txt", faces / "lfw" / "images")
    res = verification_accuracy(emb[[index[p] for p in pairs.paths1]],
                                emb[[index[p] for p in pairs.paths2]], pairs.issame)
    assert round(res["accuracy"], 6) == LFW_REFERENCE["accuracy"]
    assert round(res["accuracy_std"], 6) == LFW_REFERENCE["std"]
    labels = np.array([p.split("/")[1] for p in paths])
    keep = cap_per_identity(paths, labels, 10)
    scores, same = all_pairs_scores(emb[keep], labels[keep])
    assert scores.size == LFW_REFERENCE["pairs"] and same.sum() == LFW_REFERENCE["genuine"]
    got = tpr_at_fpr(scores, same, list(LFW_REFERENCE["tpr"]))
    assert {f: round(v, 4) for f, v in got.items()} == LFW_REFERENCE["tpr"]
