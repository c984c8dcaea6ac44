"""Tests of the data layer: transforms, folder datasets and the synthetic face benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ekd.data import (
    ImageFolderDataset,
    ListDataset,
    generate_identity_folder,
    load_image,
    make_synthetic_benchmark,
    render_face,
    to_tensor,
    write_pairs,
)
from ekd.data import synthetic_benchmark, synthetic_faces
from ekd.errors import DataError


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _ramp(value: int, size: int = 8) -> np.ndarray:
    """An RGB image whose left column is ``value`` and the rest is black (asymmetric)."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:, 0] = value
    return arr


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    _save(root / "bob" / "2.png", _ramp(20))
    _save(root / "bob" / "10.png", _ramp(10))
    _save(root / "alice" / "b.jpg", _ramp(255))
    _save(root / "alice" / "a.png", _ramp(250))
    _save(root / "carol" / "x.bmp", _ramp(30))
    (root / "carol" / "notes.txt").write_text("not an image")
    (root / "empty_id").mkdir()
    (root / "README").write_text("files at the root are ignored")
    return root


# ----------------------------------------------------------------------------- folder dataset


def test_folder_labels_and_order(folder: Path) -> None:
    with pytest.warns(UserWarning, match="empty_id"):
        ds = ImageFolderDataset(folder, input_size=8)
    assert ds.classes == ["alice", "bob", "carol"]
    assert ds.num_classes == 3
    names = [Path(p).relative_to(folder).as_posix() for p, _ in ds.samples]
    assert names == ["alice/a.png", "alice/b.jpg", "bob/10.png", "bob/2.png", "carol/x.bmp"]
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    img, label, index = ds[3]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert (label, index) == (1, 3)


def test_folder_subset_and_max_per_identity(folder: Path) -> None:
    ds = ImageFolderDataset(folder, input_size=8, identities=["carol", "bob"], max_per_identity=1)
    assert ds.classes == ["bob", "carol"]
    assert [Path(p).name for p, _ in ds.samples] == ["10.png", "x.bmp"]
    assert ds.labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="dave"):
        ImageFolderDataset(folder, identities=["dave"])


def test_normalisation_range_and_resize(folder: Path) -> None:
    img = Image.fromarray(np.array([[[0, 255, 128]]], np.uint8).repeat(4, 0).repeat(4, 1))
    t = to_tensor(img, 4)
    assert torch.allclose(t[0], torch.full((4, 4), -1.0))
    assert torch.allclose(t[1], torch.full((4, 4), 1.0))
    assert torch.allclose(t[2], torch.full((4, 4), (128 / 255 - 0.5) / 0.5))
    assert to_tensor(img, 6).shape == (3, 6, 6)
    ds = ImageFolderDataset(folder, input_size=16, identities=["alice"])
    x = ds[0][0]
    assert x.shape == (3, 16, 16)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_eval_never_flips_train_flips_both_ways(folder: Path) -> None:
    ds = ImageFolderDataset(folder, input_size=8, identities=["alice"])
    for _ in range(5):
        assert float(ds[0][0][0, 0, 0]) > 0.9  # bright column stays on the left
    ds = ImageFolderDataset(folder, input_size=8, train=True, identities=["alice"],
                            generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(40):
        x = ds[0][0]
        left, right = float(x[0, 0, 0]), float(x[0, 0, -1])
        assert {left > 0.9, right > 0.9} == {True, False}  # original or its mirror image
        seen.add(left > 0.9)
    assert seen == {True, False}


def test_grayscale_and_palette_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert (arr[..., 0] == gray).all() and (arr[..., 1] == gray).all()
    Image.fromarray(gray, mode="L").convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), mode="RGBA").save(tmp_path / "a.png")
    assert to_tensor(load_image(tmp_path / "a.png"), 8).shape == (3, 8, 8)


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "noimg" / "id1").mkdir(parents=True)
    (tmp_path / "noimg" / "id1" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="noimg"):
        ImageFolderDataset(tmp_path / "noimg")
    bad = tmp_path / "bad" / "id1" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(bad)
    ds = ImageFolderDataset(tmp_path / "bad")
    with pytest.raises(DataError, match="broken.jpg"):
        ds[0]
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_list_dataset(folder: Path) -> None:
    paths = [folder / "alice" / "a.png", folder / "carol" / "x.bmp"]
    ds = ListDataset(paths, input_size=12)
    assert len(ds) == 2
    x = ds[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 12, 12)
    assert float(x[0, 0, 0]) > 0.9  # never flipped
    with pytest.raises(DataError, match="ghost.png"):
        ListDataset([folder / "ghost.png"])


# ----------------------------------------------------------------------------- synthetic data


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = generate_identity_folder(tmp_path / "a", 3, 3, image_size=32, seed=5)
    b = generate_identity_folder(tmp_path / "b", 3, 3, image_size=32, seed=5)
    ta, tb = _read_tree(a), _read_tree(b)
    assert sorted(ta) == [f"id_{i:05d}/{j:04d}.png" for i in range(3) for j in range(3)]
    assert ta == tb
    c = generate_identity_folder(tmp_path / "c", 3, 3, image_size=32, seed=6)
    assert _read_tree(c) != ta
    arr = np.asarray(Image.open(a / "id_00001" / "0002.png"))
    assert arr.shape == (32, 32, 3)
    assert np.array_equal(arr, render_face(5, 1, 2, 32))
    assert not np.array_equal(render_face(5, 1, 2, 32), render_face(5, 1, 3, 32))


def test_synthetic_identities_are_disjoint_and_stable(tmp_path: Path) -> None:
    whole = generate_identity_folder(tmp_path / "whole", 5, 2, image_size=24, seed=1)
    train = generate_identity_folder(tmp_path / "train", 3, 2, image_size=24, seed=1)
    held = generate_identity_folder(tmp_path / "held", 2, 2, image_size=24, seed=1,
                                    first_identity=3)
    names_train = {p.name for p in train.iterdir()}
    names_held = {p.name for p in held.iterdir()}
    assert names_train.isdisjoint(names_held)
    # identity k looks the same whichever call generates it
    tw = _read_tree(whole)
    assert tw == {**_read_tree(train), **_read_tree(held)}


def test_write_pairs_format(tmp_path: Path) -> None:
    folder = generate_identity_folder(tmp_path / "eval", 4, 3, image_size=16, seed=0)
    out = write_pairs(folder, tmp_path / "pairs.txt", num_pairs=21, seed=3)
    lines = out.read_text().splitlines()
    assert len(lines) == 21
    labels = []
    for line in lines:
        p1, p2, label = line.split(" ")
        assert (folder / p1).is_file() and (folder / p2).is_file() and p1 != p2
        assert label in ("0", "1")
        assert (label == "1") == (p1.split("/")[0] == p2.split("/")[0])
        labels.append(int(label))
    assert sum(labels) == 11
    assert len({tuple(sorted(line.split()[:2])) for line in lines}) == 21
    again = write_pairs(folder, tmp_path / "again.txt", num_pairs=21, seed=3)
    assert again.read_text() == out.read_text()
    with pytest.raises(DataError, match="nothing"):
        write_pairs(tmp_path / "nothing", tmp_path / "p.txt", 4, 0)


def test_make_synthetic_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = dict(train_identities=3, train_images=2, eval_identities=2, eval_images=3,
                image_size=16, num_pairs=6, seed=0)
    paths = make_synthetic_benchmark(tmp_path / "bench", **args)
    assert set(paths) == {"train", "eval", "pairs"}
    train_ids = {p.name for p in paths["train"].iterdir()}
    eval_ids = {p.name for p in paths["eval"].iterdir()}
    assert len(train_ids) == 3 and len(eval_ids) == 2 and train_ids.isdisjoint(eval_ids)
    assert len(paths["pairs"].read_text().splitlines()) == 6
    assert json.loads((tmp_path / "bench" / "DONE").read_text())["seed"] == 0

    def boom(*a, **k):  # a second call with the same parameters must not regenerate
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic_benchmark, "generate_identity_folder", boom)
    assert make_synthetic_benchmark(tmp_path / "bench", **args) == paths
    monkeypatch.undo()
    paths2 = make_synthetic_benchmark(tmp_path / "bench", **{**args, "train_identities": 2})
    assert len(list(paths2["train"].iterdir())) == 2
    assert {p.name for p in paths2["eval"].iterdir()} == {"id_00002", "id_00003"}
    # refuse to delete folders the generator did not make
    foreign = tmp_path / "foreign"
    (foreign / "train" / "keep").mkdir(parents=True)
    with pytest.raises(DataError, match="foreign"):
        make_synthetic_benchmark(foreign, **args)
    assert (foreign / "train" / "keep").is_dir()


def test_synthetic_identity_is_learnable_but_not_trivial() -> None:
    """Raw-pixel classifiers beat chance clearly but stay far from perfect."""
    classes, per_class, n_train = 20, 16, 10

    def feature(arr: np.ndarray) -> np.ndarray:
        x = np.asarray(Image.fromarray(arr).resize((16, 16), Image.BILINEAR), np.float64).ravel()
        x -= x.mean()
        return x / (np.linalg.norm(x) + 1e-9)

    x = np.stack([feature(render_face(0, c, j, 64))
                  for c in range(classes) for j in range(per_class)])
    y = np.repeat(np.arange(classes), per_class)
    train = np.tile(np.arange(per_class) < n_train, classes)
    xtr, ytr, xte, yte = x[train], y[train], x[~train], y[~train]
    means = np.stack([xtr[ytr == c].mean(0) for c in range(classes)])
    ncm = float(((xte @ means.T).argmax(1) == yte).mean())
    w = np.linalg.solve(xtr.T @ xtr + np.eye(x.shape[1]), xtr.T @ np.eye(classes)[ytr])
    ridge = float(((xte @ w).argmax(1) == yte).mean())
    chance = 1.0 / classes
    print(f"\nheld-out identity accuracy: chance {chance:.3f}, nearest class mean {ncm:.3f}, "
          f"ridge (linear) {ridge:.3f}")
    assert ncm > 2.5 * chance
    assert ridge > 5 * chance
    assert ncm < 0.9 and ridge < 0.95
