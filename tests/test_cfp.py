"""CFP protocol reader: Pair_list_F/P numbering, FF/FP folds, interleaving, fold selection, errors;
and the teacher's reference results on the real CFP (skipped, naming what is missing, when ../shared lacks those faces)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ekd.errors import DataError
from ekd.eval.cfp import cfp_folds, read_cfp_list, read_cfp_pairs
from ekd.eval.metrics import l2_normalize, verification_accuracy


def make_cfp(root, folds=(1, 2), n_same=3, n_diff=3, touch=True):
    """Tiny CFP: 4 frontal + 2 profile images per identity; fold k pairs use numbers from 10k."""
    proto = root / "Protocol"
    (proto / "Split").mkdir(parents=True)
    f_lines, p_lines = [], []
    for i in range(1, 41):
        f_lines.append(f"{i} ../Data/Images/{(i - 1) // 4 + 1:03d}/frontal/{(i - 1) % 4 + 1:02d}.jpg")
    for i in range(1, 21):
        p_lines.append(f"{i} ../Data/Images/{(i - 1) // 2 + 1:03d}/profile/{(i - 1) % 2 + 1:02d}.jpg")
    (proto / "Pair_list_F.txt").write_text("\n".join(f_lines) + "\n")
    (proto / "Pair_list_P.txt").write_text("\n".join(p_lines) + "\n")
    for split in ("FF", "FP"):
        for k in folds:
            d = proto / "Split" / split / f"{k:02d}"
            d.mkdir(parents=True)
            (d / "same.txt").write_text("".join(f"{10 * k + j},{j + 1}\n" for j in range(n_same)))
            (d / "diff.txt").write_text("".join(f"{10 * k + j + 5},{j + 11}\n" for j in range(n_diff)))
    if touch:
        for line in f_lines + p_lines:
            p = proto / line.split()[1]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"")
    return root


def test_lists_folds_and_interleaving(tmp_path):
    root = make_cfp(tmp_path)
    flist = read_cfp_list(root / "Protocol" / "Pair_list_F.txt")
    assert flist[5] == os.path.normpath(root / "Data/Images/002/frontal/01.jpg")
    assert cfp_folds(root, "FP") == [1, 2]
    ff = read_cfp_pairs(root, "FF")
    assert len(ff) == 12 and ff.issame.tolist() == [True, False] * 6
    # fold 1: same "10,1" then diff "15,11", same "11,2", ...
    assert ff.paths1[0] == flist[10] and ff.paths2[0] == flist[1]
    assert ff.paths1[1] == flist[15] and ff.paths2[1] == flist[11]
    assert ff.paths1[2] == flist[11] and ff.paths2[2] == flist[2]
    assert ff.paths1[6] == flist[20]  # fold 2 starts after fold 1's six pairs
    fp = read_cfp_pairs(root / "Protocol", "fp", folds=[2])
    plist = read_cfp_list(root / "Protocol" / "Pair_list_P.txt")
    assert len(fp) == 6 and fp.paths1[0] == flist[20] and fp.paths2[0] == plist[1]
    assert "profile" in fp.paths2[1] and "frontal" in fp.paths1[1]


def test_unequal_same_diff_appends_rest(tmp_path):
    root = make_cfp(tmp_path, folds=(1,), n_same=3, n_diff=1)
    assert read_cfp_pairs(root, "FF").issame.tolist() == [True, False, True, True]


def test_errors(tmp_path):
    root = make_cfp(tmp_path, touch=False)
    with pytest.raises(DataError, match="image not found"):
        read_cfp_pairs(root, "FF")
    assert len(read_cfp_pairs(root, "FF", missing="ignore")) == 12
    with pytest.raises(DataError, match=r"fold\(s\) \[3\] not found"):
        read_cfp_pairs(root, "FF", folds=[3], missing="ignore")
    with pytest.raises(DataError, match="split must be"):
        read_cfp_pairs(root, "PP")
    with pytest.raises(DataError, match="no CFP protocol"):
        read_cfp_pairs(tmp_path / "nowhere", "FF")
    same = root / "Protocol" / "Split" / "FP" / "01" / "same.txt"
    same.write_text("10,1\n10;2\n")
    with pytest.raises(DataError, match=r"same.txt:2: expected 'a,b'"):
        read_cfp_pairs(root, "FP", missing="ignore")
    same.write_text("10,99\n")
    with pytest.raises(DataError, match="number 99 is not in Pair_list_P.txt"):
        read_cfp_pairs(root, "FP", missing="ignore")
    (root / "Protocol" / "Pair_list_F.txt").write_text("1 a.jpg\nfoo\n")
    with pytest.raises(DataError, match="Pair_list_F.txt:2"):
        read_cfp_pairs(root, "FF", missing="ignore")


# Reference results of the dlib teacher (shared/data/faces/README.md).
CFP_REFERENCE = {("FF", None): (0.9877, 0.0037), ("FP", None): (0.6684, 0.0225),
                 ("FF", (10,)): (0.9857, 0.0111), ("FP", (10,)): (0.6629, 0.0677)}


@pytest.mark.parametrize("split,folds", list(CFP_REFERENCE))
def test_real_cfp_teacher_reference(cfp_faces, split, folds):
    faces = cfp_faces
    data = np.load(faces / "teacher_dlib_r29" / "cfp.npz")
    emb = l2_normalize(data["emb"] + data["emb_flip"])
    index = {os.path.normpath(faces / "cfp" / p): i for i, p in enumerate(data["paths"])}
    pairs = read_cfp_pairs(faces / "cfp", split, folds)
    assert len(pairs) == (7000 if folds is None else 700)
    e1 = emb[[index[p] for p in pairs.paths1]]
    e2 = emb[[index[p] for p in pairs.paths2]]
    res = verification_accuracy(e1, e2, pairs.issame)
    acc, std = CFP_REFERENCE[(split, folds)]
    assert round(res["accuracy"], 4) == acc and round(res["accuracy_std"], 4) == std
