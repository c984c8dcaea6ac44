"""A new user's first day (issue: "signs of life"): readable warnings, errors naming the data
subcommand, the colour-order guess of ``ekd data info``, and the other first-run messages."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ekd.commands.cli import main
from ekd.config import load_config
from ekd.data import generate_identity_folder, write_pairs
from ekd.deploy.embedding_model import read_threshold
from ekd.engine.trainer import Trainer, train
from ekd.errors import ConfigError
from test_scale import _die_after_first_epoch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _tiny_run(tmp_path: Path, validation: bool = True) -> list[str]:
    """Overrides of a tiny training run on synthetic faces (2 steps per epoch), with
    a validation pair list ``pl`` unless ``validation`` is false."""
    generate_identity_folder(tmp_path / "train", 8, 4, image_size=32, seed=2)
    out = ["data.kind=folder", f"data.root={tmp_path / 'train'}", "data.input_size=32",
           "model.embedding_size=16", "sampler.random_size=8", "sampler.identities_per_batch=4",
           "train.device=cpu", "train.max_steps_per_epoch=2"]
    if validation:
        generate_identity_folder(tmp_path / "faces", 5, 3, image_size=32, seed=3)
        write_pairs(tmp_path / "faces", tmp_path / "pairs.txt", 30, seed=0)
        out.append(f"val.sets=[{{path: {tmp_path / 'pairs.txt'}, root: {tmp_path / 'faces'}, "
                   "name: pl}]")
    return out


def _faces_on_blue_backdrop(root: Path, ids: int = 3, per: int = 3, size: int = 64) -> Path:
    """RGB JPEG faces (skin-coloured centre) in front of a strongly blue backdrop."""
    rng = np.random.default_rng(0)
    for i in range(ids):
        (root / f"id{i}").mkdir(parents=True)
        for j in range(per):
            img = np.empty((size, size, 3), np.float64)
            img[:] = (40, 60, 200)  # blue studio backdrop: most of the pixels
            q = size // 4
            img[q:size - q, q:size - q] = (205, 150, 120)  # skin
            img += rng.normal(0, 6, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / f"id{i}" / f"{j}.jpg", quality=95)
    return root


def test_data_info_calls_rgb_faces_rgb_whatever_the_backdrop(tmp_path, capsys):
    faces = _faces_on_blue_backdrop(tmp_path / "faces")
    assert main(["data", "pack", str(faces), str(tmp_path / "train.rec")]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "train.rec")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["colour_order"].startswith("looks RGB"), info["colour_order"]


def test_data_info_flags_faces_stored_with_swapped_channels(tmp_path, capsys):
    faces = _faces_on_blue_backdrop(tmp_path / "faces")
    for f in faces.rglob("*.jpg"):  # what cv2.imencode of an RGB array produces
        arr = np.asarray(Image.open(f))
        Image.fromarray(np.ascontiguousarray(arr[:, :, ::-1])).save(f, quality=95)
    assert main(["data", "pack", str(faces), str(tmp_path / "train.rec")]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "train.rec")]) == 0
    assert json.loads(capsys.readouterr().out)["colour_order"].startswith("possibly BGR")


def test_data_errors_name_the_subcommand(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "nothing.txt")]) == 2
    assert capsys.readouterr().err.startswith("ekd data info: error: ")
    assert main(["data", "unpack", str(tmp_path / "missing.rec"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("ekd data unpack: error: ")


def test_warnings_print_one_line_without_source_code(tmp_path, capsys):
    faces = _faces_on_blue_backdrop(tmp_path / "faces")
    assert main(["data", "pack", str(faces), str(tmp_path / "train.rec")]) == 0
    (tmp_path / "train.idx").unlink()  # ekd warns that it indexes by a sequential scan
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["data", "info", str(tmp_path / "train.rec")]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "sequential scan" in err
    assert "warnings.warn" not in err and "UserWarning" not in err and ".py:" not in err, err


# -- training logs --------------------------------------------------------------------------------
def test_training_log_says_one_epoch_resumed_and_best_validation(tmp_path, caplog):
    base = _tiny_run(tmp_path) + ["train.progress=false"]
    with caplog.at_level(logging.INFO, logger="ekd"):
        train(load_config(None, base + ["train.epochs=1", f"train.output_dir={tmp_path / 'a'}"]))
    finished = [m for m in caplog.messages if m.startswith("finished ")]
    assert finished and finished[0].startswith("finished 1 epoch in "), finished
    best = [m for m in caplog.messages if m.startswith("best validation")]
    assert len(best) == 1 and "pl/auc" in best[0] and "(step 2)" in best[0], best
    assert caplog.messages[-1] == best[0]  # the run's last line

    caplog.clear()
    keep = base + ["train.epochs=2", f"train.output_dir={tmp_path / 'b'}", "val.keep_best=pl/auc"]
    _die_after_first_epoch(Trainer(load_config(None, keep)))
    with caplog.at_level(logging.INFO, logger="ekd"):
        train(load_config(None, keep + ["train.resume=auto"]))
    resumed = [m for m in caplog.messages if m.startswith("resumed from ")]
    assert len(resumed) == 1 and "last.pt at epoch 2/2, step 2" in resumed[0], caplog.messages
    assert any(m.startswith("finished 2 epochs in ") for m in caplog.messages)
    assert caplog.messages[-1].startswith("best validation pl/auc = ")
    assert "checkpoints/best.pt" in caplog.messages[-1]


def test_verify_advice_names_a_usable_larger_fpr_or_none(tmp_path):
    def metrics(thresholds: dict) -> str:
        file = tmp_path / "metrics.json"
        file.write_text(json.dumps({"m": {"backbone": "mbf", "sets": {"lfw": {
            "thresholds": thresholds}}}}))
        return str(file)

    small = metrics({"1e-3": None, "1e-4": None, "1e-5": None})
    with pytest.raises(ConfigError) as err:
        read_threshold(small, "1e-3")
    assert "larger FPR" in str(err.value) and "no larger FPR has a usable stored threshold" in \
        str(err.value) and "use a larger FPR" not in str(err.value)
    some = metrics({"1e-3": 0.41, "1e-4": None, "1e-5": None})
    with pytest.raises(ConfigError, match=r"use --fpr 1e-3 \(the next larger FPR stored\)"):
        read_threshold(some, "1e-5")
    top = metrics({"1e-3": float("inf"), "1e-4": None, "1e-5": None})
    with pytest.raises(ConfigError, match="no larger FPR has a usable"):
        read_threshold(top, "1e-3")


def test_training_without_a_bar_logs_a_progress_line_every_heartbeat(tmp_path, caplog,
                                                                       monkeypatch):
    import ekd.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "HEARTBEAT_S", 0.0)  # every step is "30 s later"
    cfg = load_config(None, _tiny_run(tmp_path, validation=False)
                      + ["train.progress=false", "train.epochs=1", "train.max_steps_per_epoch=3",
                         f"train.output_dir={tmp_path / 'r'}"])
    with caplog.at_level(logging.INFO, logger="ekd"):
        trainer_module.train(cfg)
    beats = [m for m in caplog.messages if m.startswith("epoch 1/1: batch ")]
    assert [b.split(" of ")[0] for b in beats] == [f"epoch 1/1: batch {i}" for i in (1, 2, 3)]


def test_eval_bars_name_the_model_and_the_set(tmp_path, capsys):
    from test_deploy import _save_checkpoint, _trained_like

    ckpt = _save_checkpoint(_trained_like("mobilefacenet", 32, 16), "mobilefacenet", 32, 16,
                            tmp_path / "run" / "model.pt")
    faces = generate_identity_folder(tmp_path / "faces", 3, 3, image_size=32, seed=1)
    assert main(["eval", "--model", str(ckpt), "--folder", str(faces), "--device", "cpu"]) == 0
    assert "embedding run/model.pt on all-pairs" in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--label", "student", "--folder", str(faces),
                 "--device", "cpu"]) == 0
    assert "embedding student on all-pairs" in capsys.readouterr().err


def test_data_pack_check_unpack_show_progress(tmp_path, capsys):
    faces = _faces_on_blue_backdrop(tmp_path / "faces")
    main(["data", "check", str(faces)])
    assert "checking faces: 100%" in capsys.readouterr().err
    assert main(["data", "pack", str(faces), str(tmp_path / "train.rec")]) == 0
    assert "packing train.rec: 100%" in capsys.readouterr().err
    assert main(["data", "unpack", str(tmp_path / "train.rec"), str(tmp_path / "back")]) == 0
    assert "unpacking train.rec: 100%" in capsys.readouterr().err


def test_validation_shows_a_bar_naming_the_set(tmp_path, capsys):
    base = _tiny_run(tmp_path) + ["train.epochs=1"]
    train(load_config(None, base + [f"train.output_dir={tmp_path / 'a'}"]))
    assert "validation of the student on pl" in capsys.readouterr().err
    train(load_config(None, base + [f"train.output_dir={tmp_path / 'b'}", "train.progress=false"]))
    assert "validation of the student" not in capsys.readouterr().err  # no bars asked for
