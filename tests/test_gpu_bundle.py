"""bench/gpu_bundle.py: pack what the GPU table reads into parts, restore the faces layout from
them (byte-identical files, same protocols, a T2 cache valid for the restored train/), and clear
errors for a missing or changed part. Runs on a tiny faces tree made here (no ../shared)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bench.gpu_bundle as gpu_bundle
from bench.kd_profiles import GPU, Cell
from bench.kd_protocols import load_protocols
from bench.kd_table import Table

from ekd.config import Config, from_dict
from ekd.data import ImageFolderDataset
from ekd.data.kinds.registry import fingerprint_of
from ekd.engine.build import build_train_set
from ekd.teachers.cache import TeacherCache
from ekd.teachers import build_teacher
from ekd.errors import DataError

REPO = Path(__file__).resolve().parents[1]

# LFW: A has 3 images, B 2, C 1, D 12 (all-pairs keeps D's first 10; View-2 also reads D_0012)
LFW = {"A": 3, "B": 2, "C": 1, "D": 12, "E": 4}
LFW_PAIRS = "1\t2\nA\t1\t2\nD\t1\t12\nA\t1\tC\t1\nB\t2\tD\t3\n"


def _jpeg(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8), "L").save(path, quality=90)


def _npz(path: Path, paths: list[str], rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = rng.standard_normal((len(paths), 8)).astype(np.float32)
    np.savez(path, paths=np.array(paths), emb=emb, emb_flip=emb + 0.5)


def make_faces(root: Path) -> Path:
    """A faces folder with the layout of the shared one (train/, lfw/, cfp/, teacher npz files)."""
    rng = np.random.default_rng(0)
    train = [f"id-{i}/{j:06d}.jpg" for i in range(3) for j in range(2 + i)]
    lfw = [f"images/{n}/{n}_{k:04d}.jpg" for n, c in LFW.items() for k in range(1, c + 1)]
    cfp = []
    for ident in (1, 451, 452):  # fold 10 = identities 451-500
        cfp += [f"Data/Images/{ident:03d}/frontal/{k:02d}.jpg" for k in (1, 2)]
        cfp += [f"Data/Images/{ident:03d}/profile/{k:02d}.jpg" for k in (1,)]
    for rel in train:
        _jpeg(root / "train" / rel, rng)
    for rel in lfw:
        _jpeg(root / "lfw" / rel, rng)
    for rel in cfp:
        _jpeg(root / "cfp" / rel, rng)
    (root / "lfw" / "pairs.txt").write_text(LFW_PAIRS)
    proto = root / "cfp" / "Protocol"
    frontal = [p for p in cfp if "/frontal/" in p]
    profile = [p for p in cfp if "/profile/" in p]
    proto.mkdir(parents=True)
    (proto / "Pair_list_F.txt").write_text("".join(f"{i} ../{p}\n" for i, p in enumerate(frontal, 1)))
    (proto / "Pair_list_P.txt").write_text("".join(f"{i} ../{p}\n" for i, p in enumerate(profile, 1)))
    # frontal numbers: 1-2 identity 001, 3-4 identity 451, 5-6 identity 452; profile: 1, 2, 3
    folds = {("FF", 1): ("1,2", "1,3"), ("FF", 10): ("3,4", "3,5"),
             ("FP", 1): ("1,1", "1,2"), ("FP", 10): ("3,2", "4,3")}
    for (split, fold), (same, diff) in folds.items():
        d = proto / "Split" / split / f"{fold:02d}"
        d.mkdir(parents=True)
        (d / "same.txt").write_text(same + "\n")
        (d / "diff.txt").write_text(diff + "\n")
    for teacher in ("teacher_dlib_r29", "teacher_dlib_r29_view32"):
        _npz(root / teacher / "train.npz", train, rng)
        _npz(root / teacher / "lfw.npz", lfw, rng)
        _npz(root / teacher / "cfp.npz", cfp, rng)
    return root


def _relative(paths: list[str], root: Path) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


@pytest.fixture
def packed(tmp_path, capsys):
    faces = make_faces(tmp_path / "faces")
    out = tmp_path / "bundle"
    assert gpu_bundle.main(["pack", "--faces", str(faces), "--out", str(out), "--with-t3"]) == 0
    return faces, out, capsys.readouterr().out


def test_pack_writes_parts_with_sizes_and_only_what_the_protocols_read(packed):
    faces, out, printed = packed
    summary = json.loads((out / "bundle.json").read_text())
    assert set(summary["parts"]) == {"part1", "part2", "part3"}
    for name, part in summary["parts"].items():
        files = [p for p in (out / name).rglob("*") if p.is_file() and p.name != "part.json"]
        assert part["bytes"] == sum(p.stat().st_size for p in files) > 0
    assert summary["total_bytes"] == sum(p["bytes"] for p in summary["parts"].values())
    assert "part1:" in printed and "with the checkout" in printed
    # eval images: all-pairs (A, B, D's first 10, E) + View-2 (adds D_0012 and C_0001); CFP fold 10 only
    names = (out / "part2" / "eval_paths.txt").read_text().split()
    assert "lfw/images/D/D_0012.jpg" in names and "lfw/images/C/C_0001.jpg" in names
    assert "lfw/images/D/D_0011.jpg" not in names
    assert not [n for n in names if n.startswith("cfp/Data/Images/001/")]
    assert sorted(n for n in names if n.startswith("cfp/")) == [
        f"cfp/Data/Images/{v}.jpg" for v in ("451/frontal/01", "451/frontal/02", "451/profile/01",
                                             "452/frontal/01", "452/profile/01")]
    cut = np.load(out / "part2" / "teacher_dlib_r29" / "lfw.npz")
    assert [f"lfw/{p}" for p in cut["paths"]] == [n for n in names if n.startswith("lfw/")]


def test_restore_rebuilds_the_faces_the_table_reads(packed, tmp_path):
    faces, out, _ = packed
    dest, cache = tmp_path / "restored", tmp_path / "cache"
    assert gpu_bundle.main(["restore", "--bundle", str(out), "--faces", str(dest), "--cache", str(cache)]) == 0
    for rel in (p.relative_to(faces / "train") for p in (faces / "train").rglob("*.jpg")):
        assert (dest / "train" / rel).read_bytes() == (faces / "train" / rel).read_bytes()
    a, b = load_protocols(faces), load_protocols(dest)
    assert _relative(a.all_pairs_paths, faces) == _relative(b.all_pairs_paths, dest)
    assert list(a.all_pairs_labels) == list(b.all_pairs_labels)
    assert _relative(a.lfw_pairs.paths2, faces) == _relative(b.lfw_pairs.paths2, dest)
    for split in ("FF", "FP"):
        assert _relative(a.cfp[split].paths1, faces) == _relative(b.cfp[split].paths1, dest)
    for p in b.image_paths():
        assert Path(p).read_bytes() == (faces / os.path.relpath(p, dest)).read_bytes()
    for teacher in ("teacher_dlib_r29", "teacher_dlib_r29_view32"):
        for name in ("lfw", "cfp"):
            full, cut = np.load(faces / teacher / f"{name}.npz"), np.load(dest / teacher / f"{name}.npz")
            row = {str(p): i for i, p in enumerate(full["paths"])}
            idx = [row[str(p)] for p in cut["paths"]]
            assert np.array_equal(cut["emb"], full["emb"][idx]) and np.array_equal(cut["emb_flip"], full["emb_flip"][idx])
    # the T2 cache is valid for the restored train/ (what kd_table.py would have imported)
    restored_train = ImageFolderDataset(dest / "train")
    cache_view = TeacherCache(cache / "teacher_t2", dataset_fp=fingerprint_of(restored_train))
    emb = np.load(faces / "teacher_dlib_r29" / "train.npz")["emb"]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert np.allclose(cache_view.embeddings[:, 0].astype(np.float32), unit, atol=1e-3)
    # ... and the GPU table's T2 cell config, on the restored folders, opens it
    cfg = from_dict(Config, Table(GPU, dest, cache).config_tree(Cell("T2", "EKD (ours)", 0)))
    assert cfg.data.root == str(dest.resolve() / "train") and cfg.teacher.path == str(cache.resolve() / "teacher_t2")
    teacher = build_teacher(cfg.teacher, cfg.data.input_size, build_train_set(cfg), "cpu")
    assert teacher.embedding_size == 8


def test_restore_names_a_missing_or_changed_part(packed, tmp_path, capsys):
    _, out, _ = packed
    moved = tmp_path / "part2-elsewhere"
    (out / "part2").rename(moved)
    assert gpu_bundle.main(["restore", "--bundle", str(out), "--faces", str(tmp_path / "r")]) == 2
    assert "part2 not here" in capsys.readouterr().err
    moved.rename(out / "part2")
    with open(out / "part2" / "lfw" / "pairs.txt", "a") as fh:
        fh.write("\n")
    with pytest.raises(DataError, match="pairs.txt: missing or changed"):
        gpu_bundle.restore_bundle(out, tmp_path / "r", tmp_path / "c")


def test_pack_refuses_an_incomplete_faces_folder_or_a_used_output(tmp_path, capsys):
    faces = make_faces(tmp_path / "faces")
    (faces / "teacher_dlib_r29" / "cfp.npz").unlink()
    assert gpu_bundle.main(["pack", "--faces", str(faces), "--out", str(tmp_path / "b")]) == 2
    assert "missing teacher_dlib_r29/cfp.npz" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        gpu_bundle.pack_bundle(make_faces(tmp_path / "faces2"), used)
