"""Deployment: ONNX export parity and metadata, model statistics, ``ekd embed`` / ``ekd verify``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ekd.commands.cli import main
from ekd.data import generate_identity_folder, load_image, to_tensor
from ekd.deploy.embedding_model import OnnxEmbeddingModel, collect_images, read_threshold
from ekd.deploy.onnx_export import export_checkpoint, export_onnx, onnx_parity, read_metadata
from ekd.deploy.stats import count_macs, model_stats, stats_table
from ekd.errors import ConfigError, DataError, EkdError
from ekd.eval.evaluate import embed_paths
from ekd.models import build_backbone, count_parameters
from ekd.utils.checkpoint_io import FORMAT, VERSION, save_atomic

TOL = 1e-4
# (backbone, input size, embedding size): small inputs keep CPU time low; one 112 px export.
CONFIGS = [("iresnet18", 48, 128), ("mobilefacenet", 48, 128), ("mbf", 48, 128),
           ("mobilefacenet", 112, 512)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _trained_like(name: str, size: int, emb: int, seed: int = 0) -> nn.Module:
    """A backbone with randomised BN statistics/affines and PReLU slopes, as after training."""
    torch.manual_seed(seed)
    model = build_backbone(name, emb, size)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.4)
    return model.eval()


def _save_checkpoint(model: nn.Module, name: str, size: int, emb: int, path: Path) -> Path:
    meta = {"backbone": name, "embedding_size": emb, "input_size": size}
    return save_atomic({"format": FORMAT, "version": VERSION, "model_meta": meta,
                        "model": model.state_dict()}, path)


def _lfw_faces(faces: Path, count: int) -> list[Path]:
    root = faces / "lfw" / "images"
    paths: list[Path] = []
    for person in sorted(root.iterdir()):
        paths += sorted(person.glob("*.jpg"))
        if len(paths) >= count:
            return paths[:count]
    pytest.skip(f"fewer than {count} LFW faces under {root}")


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}px")
def exported(request, tmp_path_factory):
    """(model, onnx path, config, export result with random-input parity at batch 1 and 32)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    name, size, emb = request.param
    tmp = tmp_path_factory.mktemp(f"export-{name}-{size}")
    model = _trained_like(name, size, emb)
    ckpt = _save_checkpoint(model, name, size, emb, tmp / "model.pt")
    result = export_checkpoint(ckpt, tmp / "model.onnx", check=True, batch_sizes=(1, 32))
    return model, result.path, request.param, result


def test_export_parity_random(exported):
    result = exported[3]
    assert set(result.parity) == {1, 32}
    assert max(result.parity.values()) <= TOL, result.parity


def test_export_parity_real_faces(exported, lfw_images):
    model, path, (_, size, _), _ = exported
    faces = _lfw_faces(lfw_images, 32)
    batch = torch.stack([to_tensor(load_image(p), size) for p in faces])
    assert onnx_parity(model, path, batch) <= TOL


def test_export_metadata_and_dynamic_batch(exported):
    import onnx

    _, path, (name, size, emb), _ = exported
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "embedding")
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, size, size]
    meta = read_metadata(path)
    assert meta["backbone"] == name and meta["input_size"] == str(size)
    assert meta["embedding_size"] == str(emb) and meta["color_order"] == "RGB"
    assert meta["mean"] == meta["std"] == "0.5,0.5,0.5" and meta["precision"] == "fp32"
    assert meta["ekd_version"]
    runner = OnnxEmbeddingModel(path)
    for b in (3, 5):
        assert runner.forward(np.zeros((b, 3, size, size), np.float32)).shape == (b, emb)


def test_export_fp16_cli(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = _trained_like("mobilefacenet", 48, 128, seed=1)
    ckpt = _save_checkpoint(model, "mobilefacenet", 48, 128, tmp_path / "m.pt")
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "h.onnx"), "--fp16", "--check"]) == 0
    text = capsys.readouterr().out
    assert "fp16" in text and "parity batch 32" in text
    assert read_metadata(tmp_path / "h.onnx")["precision"] == "fp16"
    x = torch.rand(4, 3, 48, 48) * 2 - 1
    assert onnx_parity(model, tmp_path / "h.onnx", x) <= 1e-2


def test_export_errors(tmp_path, monkeypatch, capsys):
    model = build_backbone("mobilefacenet", 128, 48)
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", backbone="mobilefacenet", input_size=48, opset=13)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(EkdError, match=r"'onnx' extra.*ekd\[onnx\]"):
        export_onnx(model, tmp_path / "x.onnx", backbone="mobilefacenet", input_size=48)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    (tmp_path / "y.onnx").write_bytes(b"")
    with pytest.raises(EkdError, match="onnxruntime.*'onnx' extra"):
        OnnxEmbeddingModel(tmp_path / "y.onnx")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bare.pth")
    assert main(["export", str(tmp_path / "bare.pth"), "--onnx", str(tmp_path / "z.onnx")]) == 2
    assert "--backbone" in capsys.readouterr().err


# -- statistics ---------------------------------------------------------------------------------
def test_macs_match_hand_count_for_tiny_model():
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.PReLU(4),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 16, bias=False))
    macs, emb = count_macs(tiny, 8)
    assert macs == 8 * 8 * 4 * 3 * 3 * 3 + 256 * 16 and emb == 16
    stats = model_stats(tiny, 8, name="tiny", batch_sizes=(1, 4), repeats=3, warmup=1)
    assert stats.parameters == count_parameters(tiny) == 108 + 8 + 4 + 4096
    assert set(stats.latency_ms) == {1, 4} and all(v > 0 for v in stats.latency_ms.values())
    table = stats_table([stats])
    assert "| tiny | - | 8x8 |" in table and "batch 4 (per image)" in table


def test_mobilefacenet_macs_match_paper():
    macs, emb = count_macs(build_backbone("mobilefacenet", 512, 112), 112)
    assert 215e6 < macs < 230e6 and emb == 512  # Chen et al. 2018: 221M MAdds at 112x112


def test_stats_cli(tmp_path, capsys):
    out = tmp_path / "stats.json"
    ckpt = _save_checkpoint(build_backbone("mbf", 128, 32), "mbf", 32, 128, tmp_path / "c.pt")
    args = ["stats", "mobilefacenet", str(ckpt), "--input-size", "32", "--repeats", "2",
            "--warmup", "0", "--batch-sizes", "1,2", "--threads", str(torch.get_num_threads()),
            "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| mobilefacenet | - | 32x32 |" in table  # a backbone name: no file
    assert f"| mbf | {ckpt} | 32x32 |" in table  # a checkpoint: its backbone and its file
    rows = json.loads(out.read_text())
    assert [r["backbone"] for r in rows] == ["mobilefacenet", "mbf"]
    assert [r["file"] for r in rows] == ["", str(ckpt)]
    assert rows[0]["parameters"] == count_parameters(build_backbone("mobilefacenet", 512, 32))
    assert [r["embedding_size"] for r in rows] == [512, 128]
    assert all(r["macs"] > 1e6 and r["latency_ms"]["2"] > 0 for r in rows)
    assert main(["stats", "resnet9000"]) == 2
    assert "neither a model file nor a backbone name" in capsys.readouterr().err


# -- embed / verify -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """An ekd checkpoint (mobilefacenet, 48 px) and a small synthetic identity folder."""
    tmp = tmp_path_factory.mktemp("embed")
    model = _trained_like("mobilefacenet", 48, 128, seed=2)
    ckpt = _save_checkpoint(model, "mobilefacenet", 48, 128, tmp / "student.pt")
    faces = generate_identity_folder(tmp / "faces", 3, 3, image_size=56, seed=3)
    return model, ckpt, faces, tmp


def test_embed_cli_matches_eval_and_onnx(synthetic, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, ckpt, faces, tmp = synthetic
    assert main(["embed", "--model", str(ckpt), str(faces), "-o", str(tmp / "pt.npy")]) == 0
    paths = (tmp / "pt.paths.txt").read_text().splitlines()
    assert paths == collect_images([faces]) and len(paths) == 9
    emb = np.load(tmp / "pt.npy")
    assert emb.shape == (9, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, embed_paths(model, paths, 48), atol=1e-5)  # as `ekd eval`
    onnx_path = tmp / "student.onnx"
    assert main(["export", str(ckpt), "--onnx", str(onnx_path)]) == 0
    assert main(["embed", "--model", str(onnx_path), *paths[:4], "-o", str(tmp / "ox")]) == 0
    assert (tmp / "ox.paths.txt").read_text().splitlines() == paths[:4]
    assert np.abs(np.load(tmp / "ox.npy") - emb[:4]).max() <= TOL
    import onnx  # a foreign ONNX file without ekd metadata: RGB, (x-127.5)/127.5, input shape

    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp / "bare.onnx"))
    bare = OnnxEmbeddingModel(tmp / "bare.onnx")
    assert (bare.input_size, bare.embedding_size, bare.backbone) == (48, 128, "")
    assert np.abs(bare.embed_paths(paths[:4]) - emb[:4]).max() <= TOL
    capsys.readouterr()


def _verify(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["verify", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_verify_with_thresholds_from_eval(synthetic, capsys):
    _, ckpt, faces, tmp = synthetic
    run = tmp / "run"
    assert main(["eval", "--model", str(ckpt), "--folder", str(faces), "--out", str(run)]) == 0
    a, b = str(faces / "id_00000" / "0000.png"), str(faces / "id_00000" / "0001.png")
    model = ["--model", str(ckpt), a, b]
    # 9 images have 27 impostor pairs: ekd eval stores null thresholds -> clear error.
    code, _, err = _verify(model + ["--fpr", "1e-4", "--thresholds", str(run)], capsys)
    assert code == 2 and "too few different-identity pairs" in err and "1e-4" in err
    code, out, _ = _verify(model + ["--threshold", "-1"], capsys)
    score = float(out.split("cosine similarity:")[1].split()[0])
    assert code == 0 and "decision: SAME" in out
    metrics = json.loads((run / "metrics.json").read_text())
    metrics[str(ckpt)]["sets"]["all-pairs"]["thresholds"] = {
        "1e-3": score - 0.01, "1e-4": score + 0.01, "1e-5": score + 0.05}
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, out, _ = _verify(model + ["--fpr", "0.001", "--thresholds", str(run / "metrics.json")],
                           capsys)
    assert code == 0 and "decision: SAME" in out and "FPR 1e-3 on set 'all-pairs'" in out
    code, out, _ = _verify(model + ["--fpr", "1e-4", "--thresholds", str(run), "--set",
                                    "all-pairs"], capsys)
    assert code == 0 and "decision: DIFFERENT" in out
    assert f"cosine similarity: {score:.6f}" in out


def test_verify_threshold_errors(synthetic, capsys, tmp_path):
    _, ckpt, faces, _ = synthetic
    pair = ["--model", str(ckpt), str(faces / "id_00000" / "0000.png"),
            str(faces / "id_00001" / "0000.png")]
    code, _, err = _verify(pair + ["--fpr", "1e-4", "--thresholds", str(tmp_path / "nope.json")],
                           capsys)
    assert code == 2 and "thresholds file not found" in err and "nope.json" in err
    metrics = {"student": {"backbone": "iresnet50", "sets": {
        "lfw": {"thresholds": {"1e-3": 0.2, "1e-4": 0.3, "1e-5": 0.4}},
        "cfp_fp": {"thresholds": {"1e-3": 0.25, "1e-4": 0.35, "1e-5": None}}}}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    code, _, err = _verify(pair + ["--fpr", "1e-6", "--thresholds", str(path), "--set", "lfw"],
                           capsys)
    assert code == 2 and "no threshold at FPR 1e-6" in err and "1e-3, 1e-4, 1e-5" in err
    code, _, err = _verify(pair + ["--fpr", "1e-4", "--thresholds", str(path)], capsys)
    assert code == 2 and "--set" in err and "lfw, cfp_fp" in err
    code, _, err = _verify(pair + ["--fpr", "1e-4"], capsys)
    assert code == 2 and "--threshold" in err
    code, out, err = _verify(pair + ["--fpr", "1e-3", "--thresholds", str(path), "--set", "lfw"],
                             capsys)
    assert code == 0 and "threshold: 0.200000" in out and "measured with backbone iresnet50" in err
    assert read_threshold(path, "1e-04", "cfp_fp")[0] == 0.35
    with pytest.raises(ConfigError, match="no thresholds for set 'ijb'"):
        read_threshold(path, 1e-4, "ijb")
    with pytest.raises(ConfigError, match="FPR must be"):
        read_threshold(path, "often", "lfw")
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_threshold(path, 1e-4)


def test_embed_errors(synthetic, tmp_path, capsys):
    _, ckpt, _, _ = synthetic
    (tmp_path / "empty").mkdir()
    assert main(["embed", "--model", str(ckpt), str(tmp_path / "empty"), "-o",
                 str(tmp_path / "e.npy")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["embed", "--model", str(tmp_path / "missing.onnx"), str(tmp_path), "-o",
                 str(tmp_path / "e.npy")]) == 2
    assert "model file not found" in capsys.readouterr().err
