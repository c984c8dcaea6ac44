"""IJB-B/C 1:1 and 1:N on a small synthetic IJB-format set generated here, checked against an
independent, loop-by-loop computation of InsightFace's procedure (ijb_11.py / ijb_1n.py) with
scikit-learn's ROC; plus the nearest-point TPR rule, Umeyama alignment and the PIL warp."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ekd.errors import DataError
from ekd.eval.align import ARCFACE_TEMPLATE, align_face, embed_aligned, umeyama, warp_affine
from ekd.eval.evaluate import evaluate_ijb
from ekd.eval.ijb import (
    IJB_FPRS,
    evaluate_ijb_features,
    identification,
    read_ijb_1n,
    read_ijb_meta,
    tpr_at_fpr_nearest,
)

sk_metrics = pytest.importorskip("sklearn.metrics")
sk_pre = pytest.importorskip("sklearn.preprocessing")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest single-threaded on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_ijb(root, target: str = "IJBC", subjects: int = 8, per_subject: int = 4, seed: int = 0):
    """Loose crops (a subject's face pattern under a random similarity), meta files, 1:N lists."""
    rng = np.random.default_rng(seed)
    t = target.lower()
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    tid_rows, lmk_rows, subject_of, images_of = [], [], {}, {}
    img_no, media, tid = 1, 1000, 1
    for s in range(subjects):
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((112, 112), Image.BICUBIC), dtype=np.float64)
        for _ in range(per_subject):
            subject_of[tid], images_of[tid] = s, []
            for _ in range(int(rng.integers(1, 3))):
                media += 1
                for _ in range(int(rng.integers(1, 3))):
                    face = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                    ang, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.2)
                    a = scale * np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
                    shift = rng.uniform(5, 25, 2)
                    m = np.hstack([a, shift[:, None]])  # face -> loose crop
                    crop = warp_affine(Image.fromarray(face), m, (150, 160))
                    name = f"{img_no}.jpg"
                    crop.save(root / "loose_crop" / name, quality=95)
                    lmk = ARCFACE_TEMPLATE @ a.T + shift + rng.normal(0, 0.5, (5, 2))
                    tid_rows.append(f"{name} {tid} {media}")
                    lmk_rows.append(" ".join([name] + [f"{v:.4f}" for v in lmk.ravel()] +
                                             [f"{rng.uniform(0.5, 1.0):.4f}"]))
                    images_of[tid].append(name)
                    img_no += 1
            tid += 1
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(tid_rows) + "\n")
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(lmk_rows) + "\n")
    tids = sorted(subject_of)
    pairs = [f"{a} {b} {int(subject_of[a] == subject_of[b])}" for i, a in enumerate(tids)
             for b in tids[i + 1:]]
    (root / "meta" / f"{t}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    g = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
    first = {s: min(k for k in tids if subject_of[k] == s) for s in range(subjects)}
    lists = {g[0]: [first[s] for s in range(subjects // 2)],
             g[1]: [first[s] for s in range(subjects // 2, subjects)],
             "probe_mixed": [k for k in tids if k not in first.values()]}
    for key, chosen in lists.items():
        name = f"{t}_1N_{key}.csv" if key == "probe_mixed" else f"{t}_1N_gallery_{key}.csv"
        rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"] + [f"{k},{subject_of[k] + 100},img/{n}"
                                                      for k in chosen for n in images_of[k]]
        (root / "meta" / name).write_text("\n".join(rows) + "\n")
    return root


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(128, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ---- independent reference: InsightFace's steps written out loop by loop -------------------

def reference_features(model, root, t):
    """Per image: align, embed [img, fliplr(img)] as one batch, keep the concatenation."""
    feats, scores = [], []
    for line in (root / "meta" / f"{t}_name_5pts_score.txt").read_text().splitlines():
        fields = line.strip().split(" ")
        lmk = np.array([float(v) for v in fields[1:-1]], dtype=np.float32).reshape(5, 2)
        img = np.asarray(align_face(Image.open(root / "loose_crop" / fields[0]).convert("RGB"), lmk))
        blob = np.stack([img, np.fliplr(img)]).transpose(0, 3, 1, 2).astype(np.float32)
        x = torch.from_numpy(blob).div(255).sub(0.5).div(0.5)
        with torch.no_grad():
            feats.append(model(x).numpy().reshape(-1))
        scores.append(fields[-1])
    return np.array(feats, dtype=np.float32), np.array(scores).astype(np.float32)


def reference_templates(img_feats, faceness, templates, medias, norm=True, det=True, flip=True):
    half = img_feats.shape[1] // 2
    x = img_feats[:, :half] + img_feats[:, half:] if flip else img_feats[:, :half]
    if not norm:
        x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
    if det:
        x = x * faceness[:, np.newaxis]
    unique = np.unique(templates)
    out = np.zeros((len(unique), x.shape[1]))
    for c, u in enumerate(unique):
        (ind_t,) = np.where(templates == u)
        ff, fm = x[ind_t], medias[ind_t]
        media_feats = []
        for m, ct in zip(*np.unique(fm, return_counts=True)):
            (ind_m,) = np.where(fm == m)
            media_feats.append(ff[ind_m] if ct == 1 else np.mean(ff[ind_m], axis=0, keepdims=True))
        out[c] = np.sum(np.array(media_feats), axis=0)
    return dict(zip(unique.tolist(), sk_pre.normalize(out)))


def reference_nearest(label, score, targets=IJB_FPRS):
    fpr, tpr, _ = sk_metrics.roc_curve(label, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {x: tpr[min(zip(abs(fpr - x), range(len(fpr))))[1]] for x in targets}


def reference_1n(query, gallery, mask, fars=(0.01, 0.1)):
    q = query.shape[0]
    sim = np.dot(query, gallery.T)
    top = np.argsort(-sim)
    out = {f"top{k}": sum(mask[i] in top[i, :k] for i in range(q)) / q for k in (1, 5, 10)}
    pos = np.array([sim[i, mask[i]] for i in range(q)])
    for i in range(q):
        sim[i, mask[i]] = -2.0
    neg = heapq.nlargest(max(math.ceil(q * f) for f in fars), sim[np.where(sim > -2.0)])
    for f in fars:
        out[f"tpir@{f:.0e}".replace("e-0", "e-")] = np.sum(pos > neg[math.ceil(q * f) - 1]) / q
    return out


def reference_1n_sets(tfeat, root, target, galleries):
    def load(name):
        rows = [r.split(",") for r in (root / "meta" / name).read_text().splitlines()[1:]]
        tids, sids = np.array([int(r[0]) for r in rows]), np.array([int(r[1]) for r in rows])
        u, idx = np.unique(tids, return_index=True)
        return np.array([tfeat[k] for k in u.tolist()]), sids[idx]
    t = target.lower()
    pf, pid = load(f"{t}_1N_probe_mixed.csv")
    gals = [load(f"{t}_1N_gallery_{g}.csv") for g in galleries]
    return pf, pid, gals


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    root = make_ijb(tmp_path_factory.mktemp("IJBC"))
    model = Tiny().eval()
    feats, faceness = reference_features(model, root, "ijbc")
    return root, model, feats, faceness


def test_end_to_end_matches_independent_computation(ijbc):
    root, model, ref_feats, faceness = ijbc
    meta = read_ijb_meta(root, "IJBC")
    np.testing.assert_array_equal(meta.faceness, faceness)
    res = evaluate_ijb(model, root, "IJBC", batch_size=5, one_to_n=True)
    assert "_scores" not in res and len(res["_roc"]["fpr"]) == len(res["_roc"]["tpr"]) > 10
    tfeat = reference_templates(ref_feats, faceness, meta.templates, meta.medias)
    ref_scores = np.array([tfeat[a] @ tfeat[b] for a, b in zip(meta.p1, meta.p2)])
    feats, flips = embed_aligned(model, [root / "loose_crop" / n for n in meta.names],
                                 meta.landmarks, batch_size=5)
    np.testing.assert_allclose(evaluate_ijb_features(feats, flips, meta)["_scores"], ref_scores,
                               atol=1e-5)
    ref = reference_nearest(meta.label, ref_scores)
    for f in IJB_FPRS:
        assert res[f"tpr@{f:.0e}".replace("e-0", "e-")] == pytest.approx(ref[f], abs=1e-12)
    assert res["auc"] == pytest.approx(sk_metrics.roc_auc_score(meta.label, ref_scores), abs=1e-9)
    assert 0.6 < res["auc"] <= 1.0 and "TestMode N1D1F1" in res["protocol"]
    # 1:N, gallery G1+G2 (InsightFace) and per gallery, averaged
    pf, pid, gals = reference_1n_sets(tfeat, root, "IJBC", ("G1", "G2"))
    gf = np.concatenate([g[0] for g in gals])
    gid = np.concatenate([g[1] for g in gals])
    ref1n = reference_1n(pf, gf, [int(np.flatnonzero(gid == s)[0]) for s in pid])
    one_n = res["1:N"]
    for key, value in ref1n.items():
        assert one_n[key] == pytest.approx(value, abs=1e-12), key
    per = []
    for g_feat, g_id in gals:
        mated = np.isin(pid, g_id)
        per.append(reference_1n(pf[mated], g_feat,
                                [int(np.flatnonzero(g_id == s)[0]) for s in pid[mated]]))
    for key in ref1n:
        assert one_n["mean_over_galleries"][key] == pytest.approx((per[0][key] + per[1][key]) / 2)


@pytest.mark.parametrize("norm,det,flip", [(False, True, True), (True, False, False),
                                           (False, False, True)])
def test_switches_match_reference(ijbc, norm, det, flip):
    root, model, ref_feats, faceness = ijbc
    meta = read_ijb_meta(root, "IJBC")
    half = ref_feats.shape[1] // 2
    res = evaluate_ijb_features(ref_feats[:, :half], ref_feats[:, half:], meta, norm, det, flip)
    tfeat = reference_templates(ref_feats, faceness, meta.templates, meta.medias, norm, det, flip)
    ref_scores = np.array([tfeat[a] @ tfeat[b] for a, b in zip(meta.p1, meta.p2)])
    np.testing.assert_allclose(res["_scores"], ref_scores, atol=1e-9)
    ref = reference_nearest(meta.label, ref_scores)
    assert [res[f"tpr@{f:.0e}".replace("e-0", "e-")] for f in IJB_FPRS] == [ref[f] for f in IJB_FPRS]


def test_batched_embedding_equals_per_image(ijbc):
    root, model, ref_feats, _ = ijbc
    meta = read_ijb_meta(root, "IJBC")
    feats, flips = embed_aligned(model, [root / "loose_crop" / n for n in meta.names],
                                 meta.landmarks, batch_size=7)
    np.testing.assert_allclose(np.hstack([feats, flips]), ref_feats, atol=1e-5)


def test_ijbb_names_and_errors(tmp_path):
    root = make_ijb(tmp_path / "IJBB", "IJBB", subjects=4, per_subject=2, seed=3)
    assert set(read_ijb_1n(root, "IJBB")) == {"S1", "S2", "probe"}
    meta = read_ijb_meta(tmp_path, "ijb-b")  # finds IJBB/meta
    assert meta.target == "IJBB" and meta.landmarks.shape[1:] == (5, 2)
    with pytest.raises(DataError, match="IJBB or IJBC"):
        read_ijb_meta(root, "IJBX")
    pairs = root / "meta" / "ijbb_template_pair_label.txt"
    pairs.write_text("1 2 1\n1 999 0\n")
    feats = np.ones((len(meta.names), 4), np.float32)
    with pytest.raises(DataError, match=r"template id\(s\) \[999\]"):
        evaluate_ijb_features(feats, feats, read_ijb_meta(root, "IJBB"))
    pairs.write_text("1 2 1\n1 x 0\n")
    with pytest.raises(DataError, match=r"pair_label.txt:2: expected 'integer integer integer'"):
        read_ijb_meta(root, "IJBB")
    lmk = root / "meta" / "ijbb_name_5pts_score.txt"
    lines = lmk.read_text().splitlines()
    lmk.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match="list different images"):
        read_ijb_meta(root, "IJBB")
    lmk.write_text("1.jpg 1 2 3\n")
    with pytest.raises(DataError, match=r"5pts_score.txt:1"):
        read_ijb_meta(root, "IJBB")


def test_nearest_rule_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    targets = IJB_FPRS + (0.003, 0.25, 0.5, 0.999, 1.0)
    for case in range(300):
        n = int(rng.integers(2, 400))
        label = rng.random(n) < rng.uniform(0.05, 0.95)
        label[:2] = [True, False]
        score = np.round(rng.normal(label * rng.uniform(0, 3), 1.0), int(rng.integers(0, 3)))
        ours = tpr_at_fpr_nearest(score, label, targets)
        ref = reference_nearest(label, score, targets)
        for f in targets:
            assert ours[f] == ref[f], (case, f)


def test_identification_matches_reference():
    rng = np.random.default_rng(2)
    g = sk_pre.normalize(rng.normal(size=(40, 8)))
    gid = rng.permutation(40) + 7
    pid = rng.choice(gid, 300)
    q = sk_pre.normalize(g[[int(np.flatnonzero(gid == s)[0]) for s in pid]] + rng.normal(0, 0.6, (300, 8)))
    ours = identification(q, pid, g, gid, chunk=64)
    ref = reference_1n(q, g, [int(np.flatnonzero(gid == s)[0]) for s in pid])
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    with pytest.raises(DataError, match="exactly once"):
        identification(q, pid, g, np.r_[gid[:-1], gid[0]])


def test_umeyama_is_the_least_squares_similarity():
    rng = np.random.default_rng(4)
    for _ in range(20):
        src = rng.uniform(0, 200, (5, 2))
        ang, s, t = rng.uniform(-3, 3), rng.uniform(0.2, 3), rng.uniform(-50, 50, 2)
        rot = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        dst = src @ rot.T + t + rng.normal(0, 2, (5, 2))
        # independent: linear least squares in (a, b, tx, ty) of x' = a x - b y + tx, y' = b x + a y + ty
        rows = [[x, -y, 1, 0] for x, y in src] + [[y, x, 0, 1] for x, y in src]
        a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.r_[dst[:, 0], dst[:, 1]], rcond=None)[0]
        np.testing.assert_allclose(umeyama(src, dst), [[a, -b, tx], [b, a, ty], [0, 0, 1]], atol=1e-8)
    mirrored = src * [-1, 1]
    assert np.linalg.det(umeyama(src, mirrored)[:2, :2]) > 0  # never a reflection
    with pytest.raises(DataError, match="degenerate"):
        umeyama(np.ones((5, 2)), dst)


def test_pil_warp_matches_opencv_convention():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (60, 70, 3)).astype(np.uint8)
    m = np.array([[0.9, -0.2, 6.3], [0.25, 1.1, -4.7]])
    out = np.asarray(warp_affine(Image.fromarray(img), m, (50, 40))).astype(float)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    ys, xs = np.mgrid[0:40, 0:50]
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]  # dst(x, y) = src(M^-1 (x, y)), centres
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    inside = (sx >= 1) & (sy >= 1) & (sx <= 68) & (sy <= 58)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = np.clip(x0, 0, 68), np.clip(y0, 0, 58)
    f = img.astype(float)
    ref = ((1 - fy) * ((1 - fx) * f[y0, x0] + fx * f[y0, x0 + 1])
           + fy * ((1 - fx) * f[y0 + 1, x0] + fx * f[y0 + 1, x0 + 1]))
    assert inside.sum() > 1000
    assert np.abs(out - ref)[inside].max() <= 1.5
    assert (out[~inside & ((sx < -1) | (sy < -1))] == 0).all()  # black border
