"""A new user's first day (issue: "signs of life"): readable warnings, errors naming the data
subcommand, the colour-order guess of ``ekd data info``, and the other first-run messages."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ekd.cli import main


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
