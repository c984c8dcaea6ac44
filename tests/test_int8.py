"""INT8 deployment: ``ekd export --int8 --calib`` and the INT8 model in ``ekd eval``, ``embed``,
``verify`` and ``stats`` (a small randomly initialised student; the measured table on real faces
is ``bench/int8_parity.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ekd.commands.cli import main
from ekd.data import generate_identity_folder
from ekd.deploy.embedding_model import OnnxEmbeddingModel
from ekd.deploy.stats import Latency, ModelStats, busy_warnings

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 32 px MobileFaceNet checkpoint, a synthetic identity folder, and its INT8 export."""
    from test_deploy import _save_checkpoint, _trained_like

    tmp = tmp_path_factory.mktemp("int8")
    ckpt = _save_checkpoint(_trained_like("mobilefacenet", 32, 128, seed=4), "mobilefacenet", 32,
                            128, tmp / "student.pt")
    faces = generate_identity_folder(tmp / "faces", 6, 5, image_size=32, seed=5)
    int8 = tmp / "student_int8.onnx"
    fp32 = tmp / "student.onnx"
    assert main(["export", str(ckpt), "--onnx", str(fp32)]) == 0
    return ckpt, faces, fp32, int8, tmp


def test_export_int8_writes_a_qdq_model_and_reports_parity(exported, capsys):
    import onnx

    ckpt, faces, fp32, int8, _ = exported
    capsys.readouterr()
    assert main(["export", str(ckpt), "--onnx", str(int8), "--int8", "--calib", str(faces),
                 "--calib-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "INT8 (QDQ, per-channel weights) calibrated on 16 image(s)" in out
    line = next(x for x in out.splitlines() if x.startswith("INT8 parity on"))
    mean = float(line.split("mean ")[1].split(",")[0])
    assert 0.9 < mean <= 1.0001  # a faithful quantization, not a broken one
    proto = onnx.load(str(int8))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    inits = {t.name: t for t in proto.graph.initializer}
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and inits.get(n.input[0]) is not None
                   and inits[n.input[0]].data_type == onnx.TensorProto.INT8
                   and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1]
    assert per_channel, "no per-channel int8 weights"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and meta["input_size"] == "32"
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size


def test_int8_model_runs_in_eval_embed_verify_and_stats(exported, capsys):
    ckpt, faces, fp32, int8, tmp = exported
    if not int8.is_file():
        assert main(["export", str(ckpt), "--onnx", str(int8), "--int8", "--calib", str(faces),
                     "--calib-size", "16"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(int8), "--model", str(ckpt), "--label", "int8",
                 "--label", "fp32", "--folder", str(faces), "--device", "cpu",
                 "--out", str(tmp / "eval")]) == 0
    metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
    assert metrics["int8"]["backbone"] == "mobilefacenet"
    assert metrics["int8"]["parameters"] == metrics["fp32"]["parameters"]
    auc8, auc32 = (metrics[k]["sets"]["all-pairs"]["auc"] for k in ("int8", "fp32"))
    assert abs(auc8 - auc32) < 0.05  # the same model, quantized
    assert main(["embed", "--model", str(int8), str(faces), "-o", str(tmp / "e8.npy")]) == 0
    assert main(["embed", "--model", str(fp32), str(faces), "-o", str(tmp / "e32.npy")]) == 0
    e8, e32 = np.load(tmp / "e8.npy"), np.load(tmp / "e32.npy")
    assert e8.shape == e32.shape == (30, 128)
    assert np.mean(np.sum(e8 * e32, axis=1)) > 0.9
    a, b = sorted((faces / "id_00000").iterdir())[:2]
    capsys.readouterr()
    assert main(["verify", "--model", str(int8), str(a), str(b), "--threshold", "0.5"]) == 0
    assert "decision:" in capsys.readouterr().out
    assert main(["stats", str(int8), str(fp32), "--repeats", "3", "--warmup", "0",
                 "--batch-sizes", "1,4", "--json", str(tmp / "stats.json")]) == 0
    table = capsys.readouterr().out
    assert "onnxruntime int8" in table and "refused" not in table
    rows = json.loads((tmp / "stats.json").read_text())
    assert [r["precision"] for r in rows] == ["int8", "fp32"]
    assert rows[0]["parameters"] == rows[1]["parameters"] > 0 and rows[0]["macs"] > 0
    for r in rows:
        for b in ("1", "4"):
            lo, hi = r["latency_spread_ms"][b]
            assert 0 < lo <= r["latency_ms"][b] <= hi


def test_int8_export_needs_calibration_images(exported, capsys):
    ckpt, faces, _, _, tmp = exported
    assert main(["export", str(ckpt), "--onnx", str(tmp / "x.onnx"), "--int8"]) == 2
    assert "--int8 needs --calib" in capsys.readouterr().err
    few = tmp / "few"
    generate_identity_folder(few, 1, 3, image_size=32, seed=1)
    assert main(["export", str(ckpt), "--onnx", str(tmp / "x.onnx"), "--int8", "--calib",
                 str(few)]) == 2
    assert "INT8 calibration needs at least" in capsys.readouterr().err


def test_busy_machine_warning_follows_the_spread():
    def stats(times: list[float]) -> ModelStats:
        row = ModelStats("m", "mobilefacenet", 32, 128, 1, 1, repeats=len(times))
        row.record(1, Latency.from_times(times))
        return row

    assert busy_warnings([stats([10.0, 10.2, 9.9, 10.1, 10.0])]) == []
    warned = busy_warnings([stats([21.0, 1556.0, 30.0, 900.0, 25.0])])
    assert len(warned) == 1 and "busy" in warned[0] and "batch 1" in warned[0]


def test_onnx_backbone_feeds_bgr_models_as_their_metadata_says(exported):
    from ekd.deploy.embedding_model import OnnxBackbone

    _, _, fp32, _, _ = exported
    model = OnnxEmbeddingModel(fp32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    native = OnnxBackbone(model)(x)
    model.color_order = "BGR"  # a model that expects BGR gets the channels swapped
    swapped = OnnxBackbone(model)(x.flip(1))
    np.testing.assert_allclose(native.numpy(), swapped.numpy(), atol=1e-4)
