"""First-hour messages: empty configs, unsafe-load advice, doubled prefixes, folders for images,
unaligned inputs, ``ekd --help`` / ``--version``, the embed progress bar, the demo log."""

from __future__ import annotations

import logging
import os
import pickle
import pty
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ekd import __version__
from ekd.commands.cli import build_parser, main
from ekd.models import build_backbone
from ekd.utils.checkpoint_io import FORMAT, VERSION, save_atomic


class Gadget:
    """A class a malicious or foreign pickle would need."""


def _error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and len(err.splitlines()) == 1, captured.err
    assert err.startswith(f"ekd {command}: error: ") and \
        not err.startswith(f"ekd {command}: error: ekd "), err  # no doubled prefix
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 32 px MobileFaceNet checkpoint and three images: two 32x32 crops and a 64x48 photo."""
    tmp = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet", 32, 32).eval()
    save_atomic({"format": FORMAT, "version": VERSION, "model": model.state_dict(),
                 "model_meta": {"backbone": "mobilefacenet", "embedding_size": 32,
                                "input_size": 32}}, tmp / "m.pt")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (32, 32), "b.png": (32, 32), "photo.png": (48, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp / name)
    return tmp


# -- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_empty_yaml_is_an_error(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert main(["train", str(path)]) == 2
    assert f"{path}: the file is empty" in _error(capsys, "train")
    assert not (tmp_path / "runs").exists() and not Path("runs/default").exists()


def test_config_without_data_section_is_refused(tmp_path, capsys):
    path = tmp_path / "nodata.yaml"
    path.write_text("train: {epochs: 1}\n")
    assert main(["train", str(path)]) == 2
    err = _error(capsys, "train")
    assert f"{path}: no 'data' section" in err and "kind: synthetic" in err


def test_set_into_an_empty_distiller_list(tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text("data: {kind: synthetic, input_size: 32}\n")
    assert main(["train", str(path), "--set", "distill.0.weight=1"]) == 2
    assert "--set distill.0.weight: the list distill is empty" in _error(capsys, "train")
    path.write_text("data: {kind: synthetic, input_size: 32}\ndistill: []\n")
    assert main(["train", str(path), "--set", "distill.0.weight=1"]) == 2
    assert "the list distill is empty" in _error(capsys, "train")


# -- model files that are not checkpoints -------------------------------------------------------
def _not_checkpoints(tmp: Path) -> dict[str, tuple[Path, str]]:
    text = tmp / "README.md"
    text.write_text("# a readme\n\nnot a model\n")
    archive = tmp / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "hello")
    plain = tmp / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    gadget = tmp / "gadget.pt"
    torch.save({"model": Gadget()}, gadget)
    return {"text": (text, "not a PyTorch checkpoint / ONNX model: it is a text file"),
            "zip": (archive, "not a PyTorch checkpoint / ONNX model: it is a zip archive"),
            "pickle": (plain, "refused to load: it contains objects other than tensors"),
            "torch.save of an object": (gadget, f"it needs the Python class {__name__}.Gadget")}


@pytest.mark.parametrize("kind", ["text", "zip", "pickle", "torch.save of an object"])
def test_not_a_checkpoint_never_advises_unsafe_loading(tiny, tmp_path, capsys, kind):
    path, expected = _not_checkpoints(tmp_path)[kind]
    assert main(["verify", "--model", str(path), str(tiny / "a.png"), str(tiny / "b.png"),
                 "--threshold", "0.3"]) == 2
    err = _error(capsys, "verify")
    assert err.startswith(f"ekd verify: error: {path}: ") and expected in err
    assert "weights_only=False" not in err and "set to `False`" not in err
    assert "will likely succeed" not in err


# -- messages -----------------------------------------------------------------------------------
def test_no_doubled_prefix(capsys):
    assert main(["eval", "--model", "m.pt"]) == 2
    assert _error(capsys, "eval") == ("ekd eval: error: give at least one of --pairs, "
                                      "--lfw-pairs, --folder, --bin, --cfp, --ijb")


def test_folder_where_an_image_is_expected(tiny, capsys):
    assert main(["verify", "--model", str(tiny / "m.pt"), str(tiny), str(tiny / "a.png"),
                 "--threshold", "0.3"]) == 2
    err = _error(capsys, "verify")
    assert f"{tiny}: a folder where an image file is expected" in err
    assert "not found" not in err


def test_unaligned_inputs_warned_once(tiny, capsys, caplog):
    caplog.set_level(logging.WARNING, logger="ekd.embed")
    args = ["verify", "--model", str(tiny / "m.pt"), "--threshold", "0.3"]
    assert main(args + [str(tiny / "a.png"), str(tiny / "b.png")]) == 0
    assert not caplog.records  # aligned crops of the model's size: no warning
    assert main(args + [str(tiny / "photo.png"), str(tiny / "photo.png")]) == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "2 of 2 image(s) are not 32×32" in warnings[0] and "is 64×48" in warnings[0]
    assert "ekd expects aligned 32×32 crops (docs/deploy.md)" in warnings[0]


# -- help and version ---------------------------------------------------------------------------
def test_help_lists_every_command_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    parser = build_parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices).choices
    lines = text.splitlines()
    for name in commands:
        line = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert line is not None and len(line.split()) > 2, f"{name}: no one-line help in\n{text}"
        assert len(line) <= 80
    description = text.split("\n\n")[1]
    assert description.rstrip().endswith("."), description  # a whole sentence, not cut off


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"ekd {__version__}"


# -- embed progress bar -------------------------------------------------------------------------
def _embed_on_a_terminal(tiny, tmp_path, monkeypatch, batch_size: int) -> str:
    """Run ``ekd embed`` with stderr on a fresh pseudo-terminal (0 columns) and return its text."""
    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        assert main(["embed", "--model", str(tiny / "m.pt"), str(tiny / "a.png"),
                     str(tiny / "b.png"), str(tiny / "a.png"), "-o", str(tmp_path / "e.npy"),
                     "--batch-size", str(batch_size)]) == 0
        terminal.flush()
        os.set_blocking(master, False)
        chunks = []
        while True:
            try:
                chunks.append(os.read(master, 65536))
            except BlockingIOError:
                break
        return b"".join(chunks).decode(errors="replace")
    finally:
        terminal.close()
        os.close(master)


def test_embed_progress_bar_on_a_terminal(tiny, tmp_path, monkeypatch):
    shown = _embed_on_a_terminal(tiny, tmp_path, monkeypatch, batch_size=1)
    # a bar for the 3 images (tqdm may close it before its first refresh on a fast machine)
    assert "embedding" in shown and "/3" in shown, repr(shown)
    quiet = _embed_on_a_terminal(tiny, tmp_path, monkeypatch, batch_size=8)  # one batch: no bar
    assert "embedding" not in quiet, repr(quiet)


# -- demo log -----------------------------------------------------------------------------------
def test_demo_jobs_below_one_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--jobs", "0", "--out", str(out)]) == 2
    assert "--jobs must be at least 1, got 0" in _error(capsys, "demo")
    assert not out.exists()



def test_demo_log_names_the_teacher(tmp_path, monkeypatch, caplog):
    import ekd.commands.demo as demo
    from ekd.engine.trainer import TrainResult

    def fake_train(cfg):
        run = Path(cfg.train.output_dir)
        return TrainResult(run, run / "model.pt", 0.0, {})

    monkeypatch.setattr(demo, "train_side_by_side", lambda cfgs, jobs: [fake_train(c) for c in cfgs])
    monkeypatch.setattr(demo, "cache_for_data", lambda *a, **k: tmp_path / "demo" / "teacher_cache")
    monkeypatch.setattr(demo, "evaluate_and_compare", lambda *a, **k: ({}, "", ""))
    caplog.set_level(logging.INFO, logger="ekd.demo")
    demo.run_demo(tmp_path / "demo", quick=True, device="cpu")
    assert f"teacher saved to {tmp_path / 'demo' / 'teacher' / 'model.pt'}" in caplog.text
