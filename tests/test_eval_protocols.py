"""Tests of ekd.eval.protocols, including the reference results on real LFW embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ekd.errors import DataError
from ekd.eval import (
    PairList,
    all_pairs_scores,
    cap_per_identity,
    l2_normalize,
    read_lfw_pairs,
    read_pair_list,
    tpr_at_fpr,
    verification_accuracy,
)

# --------------------------------------------------------------------------- LFW pairs.txt


def _touch_images(root: Path, names: dict[str, int], ext: str = "jpg") -> None:
    for name, count in names.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(1, count + 1):
            (root / name / f"{name}_{k:04d}.{ext}").write_bytes(b"")


LFW_TXT = """2\t2
Ann\t1\t2
Bob\t1\t3
Ann\t1\tBob\t2
Cid\t1\tAnn\t3
Bob\t2\t3
Cid\t1\t2
Ann\t2\tCid\t2
Bob\t1\tCid\t1
"""


def test_read_lfw_pairs(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _touch_images(images, {"Ann": 3, "Bob": 3, "Cid": 2})
    (tmp_path / "pairs.txt").write_text(LFW_TXT)
    pl = read_lfw_pairs(tmp_path / "pairs.txt", images)
    assert isinstance(pl, PairList) and len(pl) == 8 and pl.skipped == 0
    assert pl.issame.tolist() == [True, True, False, False] * 2
    assert pl.paths1[0] == str(images / "Ann" / "Ann_0001.jpg")
    assert pl.paths2[0] == str(images / "Ann" / "Ann_0002.jpg")
    assert pl.paths1[3] == str(images / "Cid" / "Cid_0001.jpg")
    assert pl.paths2[3] == str(images / "Ann" / "Ann_0003.jpg")
    assert pl.paths2[7] == str(images / "Cid" / "Cid_0001.jpg")
    assert len(pl.unique_paths()) == 8


def test_read_lfw_pairs_missing_and_malformed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _touch_images(images, {"Ann": 3, "Bob": 3, "Cid": 1})  # Cid_0002 is missing
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(LFW_TXT)
    with pytest.raises(DataError, match=r"pairs\.txt:7: image not found: .*Cid_0002\.jpg"):
        read_lfw_pairs(pairs, images)
    with pytest.warns(UserWarning, match="skipped 2 pair"):
        pl = read_lfw_pairs(pairs, images, missing="skip")
    assert len(pl) == 6 and pl.skipped == 2
    with pytest.raises(DataError, match="missing"):
        read_lfw_pairs(pairs, images, missing="ignore")

    _touch_images(images, {"Cid": 2})
    pairs.write_text(LFW_TXT.replace("Bob\t1\t3", "Bob\tone\t3"))
    with pytest.raises(DataError, match=r"pairs\.txt:3:"):
        read_lfw_pairs(pairs, images)
    pairs.write_text(LFW_TXT.replace("Cid\t1\t2", "Cid\t1"))
    with pytest.raises(DataError, match=r"pairs\.txt:7:"):
        read_lfw_pairs(pairs, images)
    pairs.write_text("ten 300\n")
    with pytest.raises(DataError, match=r"pairs\.txt:1: expected a header"):
        read_lfw_pairs(pairs, images)
    pairs.write_text(LFW_TXT + "Ann\t1\t3\n")
    with pytest.raises(DataError, match="9 pair lines"):
        read_lfw_pairs(pairs, images)
    with pytest.raises(DataError, match="not found"):
        read_lfw_pairs(tmp_path / "nope.txt", images)


# --------------------------------------------------------------------------- generic pair list


def test_read_pair_list(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        (tmp_path / "a" / name).write_bytes(b"")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "w.png").write_bytes(b"")
    lst = tmp_path / "pairs.lst"
    lst.write_text(
        "# a comment\n\n"
        "a/x.jpg a/y.jpg 1\n"
        f"a/x.jpg\t{other / 'w.png'}  FALSE  # trailing comment\n"
        "a/y.jpg a/z.jpg true\n"
        "a/z.jpg a/x.jpg 0\n"
    )
    pl = read_pair_list(lst)
    assert pl.issame.tolist() == [True, False, True, False]
    assert pl.paths1[0] == str(tmp_path / "a" / "x.jpg")
    assert pl.paths2[1] == str(other / "w.png")

    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "p.txt").write_text("x.jpg y.jpg 1\n")
    pl2 = read_pair_list(sub / "p.txt", root=tmp_path / "a")
    assert pl2.paths1 == [str(tmp_path / "a" / "x.jpg")]


def test_read_pair_list_errors(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"")
    lst = tmp_path / "bad.txt"
    lst.write_text("x.jpg x.jpg 1\n\nx.jpg x.jpg\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: expected 'path1 path2 label'"):
        read_pair_list(lst)
    lst.write_text("# only\nx.jpg x.jpg yes\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: label"):
        read_pair_list(lst)
    lst.write_text("x.jpg missing.jpg 0\n")
    with pytest.raises(DataError, match=r"bad\.txt:1: image not found: .*missing\.jpg"):
        read_pair_list(lst)
    lst.write_text("# nothing\n")
    with pytest.raises(DataError, match="no usable pairs"):
        read_pair_list(lst)


# --------------------------------------------------------------------------- all pairs


def test_all_pairs_scores_brute_force() -> None:
    rng = np.random.default_rng(0)
    emb = l2_normalize(rng.standard_normal((50, 16)).astype(np.float32))
    labels = rng.integers(0, 7, 50).astype(str)
    scores, same = all_pairs_scores(emb, labels, block_elems=300)  # forces many blocks
    ref_s, ref_y = [], []
    for i in range(50):
        for j in range(i + 1, 50):
            ref_s.append(float(emb[i] @ emb[j]))
            ref_y.append(labels[i] == labels[j])
    assert scores.dtype == np.float32 and scores.shape == (50 * 49 // 2,)
    np.testing.assert_allclose(scores, ref_s, atol=1e-6)
    assert same.tolist() == ref_y
    s2, y2 = all_pairs_scores(emb, labels)  # default: one block
    np.testing.assert_allclose(s2, scores, atol=1e-6)
    assert (y2 == same).all()
    with pytest.raises(DataError, match="labels"):
        all_pairs_scores(emb, labels[:10])


def test_cap_per_identity() -> None:
    paths = ["b/b_0003.jpg", "a/a_0001.jpg", "b/b_0001.jpg", "c/c_0001.jpg", "b/b_0002.jpg",
             "a/a_0002.jpg", "b/b_0004.jpg"]
    labels = np.array([p.split("/")[0] for p in paths])
    # c has one image: dropped; b keeps its first 3 in file-name order (0001, 0002, 0003).
    assert cap_per_identity(paths, labels, 3).tolist() == [0, 1, 2, 4, 5]
    assert cap_per_identity(paths, labels, None).tolist() == [0, 1, 2, 4, 5, 6]
    with pytest.raises(DataError, match="max_per_identity"):
        cap_per_identity(paths, labels, 1)


# --------------------------------------------------------------------------- real faces (LFW)


def _lfw(faces: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    data = np.load(faces / "teacher_dlib_r29" / "lfw.npz")
    emb = l2_normalize(data["emb"] + data["emb_flip"])
    return faces / "lfw", np.asarray(data["paths"]).astype(str), emb


def test_lfw_view2_teacher_accuracy(lfw_faces: Path) -> None:
    lfw, paths, emb = _lfw(lfw_faces)
    pairs = read_lfw_pairs(lfw / "pairs.txt", lfw / "images")
    assert len(pairs) == 6000
    index = {p: i for i, p in enumerate(paths)}
    rel = [[Path(p).relative_to(lfw).as_posix() for p in ps] for ps in (pairs.paths1, pairs.paths2)]
    absent = sorted({p for ps in rel for p in ps if p not in index})
    if absent:
        pytest.fail(f"{len(absent)} pair image(s) absent from lfw.npz, e.g. {absent[:3]}")
    i1 = np.array([index[p] for p in rel[0]])
    i2 = np.array([index[p] for p in rel[1]])
    r = verification_accuracy(emb[i1], emb[i2], pairs.issame)
    assert r["accuracy"] == pytest.approx(0.989167, abs=1e-6)
    assert r["accuracy_std"] == pytest.approx(0.004099, abs=1e-6)


def test_lfw_all_pairs_teacher_tpr(lfw_faces: Path) -> None:
    _, paths, emb = _lfw(lfw_faces)
    identities = np.array([Path(p).parent.name for p in paths])
    keep = cap_per_identity(list(paths), identities, 10)
    scores, same = all_pairs_scores(emb[keep], identities[keep])
    assert scores.size == 20_604_990
    assert int(same.sum()) == 14_508
    tpr = tpr_at_fpr(scores, same, (1e-3, 1e-4, 1e-5))  # its speed: bench/eval_speed.py
    assert tpr[1e-3] == pytest.approx(0.9289, abs=5e-5)
    assert tpr[1e-4] == pytest.approx(0.7831, abs=5e-5)
    assert tpr[1e-5] == pytest.approx(0.5351, abs=5e-5)
