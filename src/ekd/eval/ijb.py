"""IJB-B / IJB-C template verification (1:1) and identification (1:N), as InsightFace's
``recognition/_evaluation_/ijb/ijb_11.py`` and ``ijb_1n.py`` (also ``arcface_torch/eval_ijbc.py``).

Inputs (``<root>/meta``, images in ``<root>/loose_crop``; ``t`` = ``ijbb`` or ``ijbc``):
``t_face_tid_mid.txt`` (``image template_id media_id``), ``t_name_5pts_score.txt`` (``image x1 y1 ...
x5 y5 detector_score``, same image order), ``t_template_pair_label.txt`` (``tid1 tid2 label``) and
for 1:N ``t_1N_probe_mixed.csv`` and two galleries (IJB-C ``t_1N_gallery_G1/G2.csv``, IJB-B
``..._S1/S2.csv``; CSV with a header row, template id and subject id in the first two columns).

Pipeline, with InsightFace's defaults (its ``TestMode(N1 D1 F1)``, flip combined by addition):

1. each loose crop is aligned from its 5 points (:mod:`ekd.eval.align`) and embedded together
   with its mirror image; ``use_flip_test=True`` adds the two raw embeddings (else the first);
2. ``use_norm_score=True`` keeps the feature norm (``False`` L2-normalises each image first);
3. ``use_detector_score=True`` multiplies each image feature by its detector score;
4. media aggregation: the mean over a template's images of one media (video frames), then
   template = sum over its media, L2-normalised;
5. 1:1: cosine of the two template features, scored in chunks of 100,000 pairs; TPR at FPR
   1e-6 ... 1e-1 by InsightFace's nearest-point rule (:func:`tpr_at_fpr_nearest`).
6. 1:N: the gallery is G1 and G2 together (``ijb_1n.py``); CMC top-1/5/10 = share of probes whose
   mate scores among the k best; TPIR at FPIR f = share of probes whose mate score exceeds the
   ``ceil(f * n_probes)``-th largest non-mate score. ``per_gallery`` repeats this per gallery
   (probes whose subject is in it) and averages the two (the variant the issue asks for).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekd.errors import DataError
from ekd.eval.metrics import max_false_positives

__all__ = ["IJB_FPRS", "IJBMeta", "read_ijb_meta", "read_ijb_1n", "combine_features",
           "template_features", "template_scores", "tpr_at_fpr_nearest", "identification",
           "evaluate_ijb_features"]

IJB_FPRS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS: tuple[float, ...] = (1e-2, 1e-1)
RANKS: tuple[int, ...] = (1, 5, 10)


@dataclass
class IJBMeta:
    """The image list (names, template and media ids, 5 landmarks, detector scores) and pairs."""

    root: Path
    target: str
    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    p1: np.ndarray
    p2: np.ndarray
    label: np.ndarray


def _target(target: str) -> str:
    t = str(target).upper().replace("-", "")
    if t not in ("IJBB", "IJBC"):
        raise DataError(f"IJB target must be IJBB or IJBC, got {target!r}")
    return t


def _meta_dir(root: Path, target: str) -> Path:
    for cand in (root / "meta", root / target / "meta"):
        if cand.is_dir():
            return cand
    raise DataError(f"no IJB meta folder under {root} (expected meta/ or {target}/meta/)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"IJB meta file not found: {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None


def _parse(path: Path, nfields: int, expect: str, conv) -> list:  # noqa: ANN001
    """``conv(fields)`` of every non-blank line with ``nfields`` fields; errors name the line."""
    out = []
    for no, line in enumerate(_read_text(path).splitlines(), start=1):
        f = line.split()
        if not f:
            continue
        try:
            if len(f) != nfields:
                raise ValueError
            out.append(conv(f))
        except ValueError:
            raise DataError(f"{path}:{no}: expected '{expect}', got {line.strip()!r}") from None
    return out


def _int_table(path: Path, cols: int) -> np.ndarray:
    """Whitespace-separated integer table (15M IJB-C pairs), parsed in C; errors name the line."""
    text = _read_text(path)
    try:
        vals = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:  # numpy >= 2 refuses unparsable text
        vals = np.empty(0, np.int64)
    if vals.size == 0 or vals.size != cols * sum(1 for ln in text.splitlines() if ln.strip()):
        _parse(path, cols, " ".join(["integer"] * cols), lambda f: [int(v) for v in f])
        raise DataError(f"{path}: no rows")
    return vals.reshape(-1, cols)


def read_ijb_meta(root: str | os.PathLike[str], target: str = "IJBC") -> IJBMeta:
    """Read the 1:1 meta files of ``target`` under ``root`` (checks that they agree)."""
    t = _target(target)
    root = Path(root)
    meta = _meta_dir(root, t)
    tid_path, lmk_path = meta / f"{t.lower()}_face_tid_mid.txt", meta / f"{t.lower()}_name_5pts_score.txt"
    tid = _parse(tid_path, 3, "image template_id media_id", lambda f: (f[0], int(f[1]), int(f[2])))
    lmk = _parse(lmk_path, 12, "image x1 y1 ... x5 y5 score",
                 lambda f: (f[0], [float(v) for v in f[1:]]))
    names = [r[0] for r in tid]
    if [r[0] for r in lmk] != names:
        bad = next((i for i, (a, b) in enumerate(zip(tid, lmk)) if a[0] != b[0]),
                   min(len(tid), len(lmk)))
        raise DataError(f"{lmk_path} and {tid_path} list different images (first difference at "
                        f"line {bad + 1}; {len(lmk)} vs {len(tid)} lines)")
    arr = np.asarray([r[1] for r in lmk], dtype=np.float32).reshape(-1, 11)
    pairs_path = meta / f"{t.lower()}_template_pair_label.txt"
    pairs = _int_table(pairs_path, 3)
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise DataError(f"{pairs_path}: labels must be 0 or 1")
    ids = np.asarray([r[1:] for r in tid], dtype=np.int64).reshape(-1, 2)
    return IJBMeta(root, t, names, ids[:, 0], ids[:, 1], arr[:, :10].reshape(-1, 5, 2),
                   arr[:, 10].copy(), pairs[:, 0], pairs[:, 1], pairs[:, 2].astype(bool))


def _read_template_subjects(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(csv.reader(_read_text(path).splitlines()))[1:]
    try:
        data = np.asarray([(int(r[0]), int(r[1])) for r in rows if r], dtype=np.int64)
    except (ValueError, IndexError):
        raise DataError(f"{path}: expected TEMPLATE_ID,SUBJECT_ID,... rows after a header") from None
    if data.size == 0:
        raise DataError(f"{path}: no rows")
    return data[:, 0], data[:, 1]


def read_ijb_1n(root: str | os.PathLike[str], target: str = "IJBC") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"G1"/"S1": ..., "G2"/"S2": ..., "probe": ...}`` -> ``(template ids, subject ids)``."""
    t = _target(target)
    meta = _meta_dir(Path(root), t)
    g = ("G1", "G2") if t == "IJBC" else ("S1", "S2")
    out = {k: _read_template_subjects(meta / f"{t.lower()}_1N_gallery_{k}.csv") for k in g}
    out["probe"] = _read_template_subjects(meta / f"{t.lower()}_1N_probe_mixed.csv")
    return out


def combine_features(feats: np.ndarray, flip_feats: np.ndarray | None, faceness: np.ndarray,
                     use_norm_score: bool = True, use_detector_score: bool = True,
                     use_flip_test: bool = True) -> np.ndarray:
    """Steps 1-3: flip by addition, optional per-image L2 norm, detector-score weighting."""
    x = np.asarray(feats, dtype=np.float32)
    if use_flip_test:
        if flip_feats is None:
            raise DataError("use_flip_test needs the mirror images' features")
        x = x + np.asarray(flip_feats, dtype=np.float32)
    if not use_norm_score:
        x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
    if use_detector_score:
        x = x * np.asarray(faceness, dtype=np.float32)[:, None]
    return x


def template_features(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      block: int = 1 << 15) -> tuple[np.ndarray, np.ndarray]:
    """Step 4: ``(L2-normalised template features [T, D] float64, sorted template ids [T])``."""
    templates, medias = np.asarray(templates), np.asarray(medias)
    if len(img_feats) != len(templates) or len(templates) != len(medias):
        raise DataError(f"{len(img_feats)} image features for {len(templates)} template and "
                        f"{len(medias)} media ids")
    order = np.lexsort((medias, templates))
    ts, ms = templates[order], medias[order]
    starts = np.flatnonzero(np.r_[True, (ts[1:] != ts[:-1]) | (ms[1:] != ms[:-1])])
    counts = np.diff(np.r_[starts, len(order)])
    media = np.empty((starts.size, img_feats.shape[1]), dtype=np.float64)
    g = 0
    while g < starts.size:  # blocks of whole media groups keep the float64 copy small
        g_end = max(int(np.searchsorted(starts, starts[g] + block, side="right")), g + 1)
        a, b = starts[g], (starts[g_end] if g_end < starts.size else len(order))
        chunk = np.asarray(img_feats[order[a:b]], dtype=np.float64)
        media[g:g_end] = np.add.reduceat(chunk, starts[g:g_end] - a, axis=0)
        g = g_end
    media /= counts[:, None]
    mt = ts[starts]
    tstarts = np.flatnonzero(np.r_[True, mt[1:] != mt[:-1]])
    tf = np.add.reduceat(media, tstarts, axis=0)
    norm = np.linalg.norm(tf, axis=1, keepdims=True)
    return tf / np.where(norm > 0, norm, 1), mt[tstarts]


def _lookup(unique: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    pos = np.clip(np.searchsorted(unique, wanted), 0, len(unique) - 1)
    bad = unique[pos] != wanted
    if bad.any():
        missing = np.unique(wanted[bad])[:5].tolist()
        raise DataError(f"{what}: template id(s) {missing} have no images in the face list")
    return pos


def template_scores(tfeats: np.ndarray, unique: np.ndarray, p1: np.ndarray, p2: np.ndarray,
                    chunk: int = 100_000) -> np.ndarray:
    """Step 5: cosine of each template pair, computed ``chunk`` pairs at a time (float64)."""
    i1 = _lookup(unique, np.asarray(p1), "template pairs")
    i2 = _lookup(unique, np.asarray(p2), "template pairs")
    score = np.empty(len(i1), dtype=np.float64)
    for s in range(0, len(i1), chunk):
        score[s:s + chunk] = np.einsum("ij,ij->i", tfeats[i1[s:s + chunk]], tfeats[i2[s:s + chunk]])
    return score


def _window(n: int, m: int, w: int) -> tuple[int, int]:
    """Descending ranks ``(r1, r2)`` of the negatives bounding the window around rank ``m+1``."""
    return max(m + 1 - w, 1), min(m + 1 + w, n)


def _nearest_in_window(part: np.ndarray, pos: np.ndarray, f: float, m: int, w: int) -> float | None:
    """TPR of the nearest kept ROC point, built from the thresholds between the ``r1``-th and
    ``r2``-th largest negatives (``part`` is partitioned there); ``None`` if undecidable."""
    n, n_pos = part.size, pos.size
    r1, r2 = _window(n, m, w)
    bottom = r2 == n
    hi = np.inf if r1 == 1 else part[n - r1]
    lo = -np.inf if bottom else part[n - r2]
    fpa = 0 if r1 == 1 else int(np.count_nonzero(part[n - r1 + 1:] > hi))
    tpa = int(np.count_nonzero(pos > hi))
    wneg = part if bottom else part[n - r2 + 1:]  # every negative above lo lies here
    wneg = wneg[(wneg > lo) & (wneg <= hi)]
    wpos = pos[(pos > lo) & (pos <= hi)]
    u, inv = np.unique(np.r_[wneg, wpos], return_inverse=True)
    neg_c = np.bincount(inv[:wneg.size], minlength=u.size)[::-1]
    pos_c = np.bincount(inv[wneg.size:], minlength=u.size)[::-1]
    fps, tps = fpa + np.cumsum(neg_c), tpa + np.cumsum(pos_c)
    if fps.size == 0:
        return None
    at_top = fpa + tpa == 0  # no score above the window: its first point is the curve's first
    sf, st = (fps, tps) if at_top else (np.r_[fpa, fps], np.r_[tpa, tps])
    keep = np.ones(sf.size, dtype=bool)  # sklearn's rule: drop collinear equally spaced points
    keep[1:-1] = (np.diff(sf, 2) != 0) | (np.diff(st, 2) != 0)
    keep = keep[0 if at_top else 1:]
    if not bottom:  # the last point's successor is unknown: it is not a candidate
        keep[-1] = False
    cf, ct, order = fps[keep] / n, tps[keep] / n_pos, np.flatnonzero(keep)
    ok_above = at_top or bool(np.any(cf <= f))
    ok_below = bottom or bool(np.any((cf >= f) & (cf < fps[-1] / n)))
    if not (ok_above and ok_below):
        return None
    if at_top:  # the (0, 0) point scikit-learn prepends; it loses every tie
        cf, ct, order = np.r_[0.0, cf], np.r_[0.0, ct], np.r_[-1, order]
    return float(ct[np.lexsort((-order, np.abs(cf - f)))[0]])


def tpr_at_fpr_nearest(scores: np.ndarray, labels: np.ndarray,
                       fprs: Sequence[float] = IJB_FPRS) -> dict[float, float]:
    """InsightFace's IJB rule: the TPR of the ROC point whose FPR is nearest each target.

    The points are scikit-learn's ``roc_curve`` (default ``drop_intermediate=True``: collinear,
    equally spaced points dropped, ``(0, 0)`` prepended); ``argmin |fpr - f|`` with ties going
    to the later point (InsightFace flips the curve before ``min``). Computed without a full
    sort: one multi-pivot ``np.partition`` locates the negatives near rank ``m`` (``m / n_neg ~
    f``) and only the points with thresholds there are built, the window widening until the
    nearest kept point is provably inside it.
    """
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if s.shape != y.shape or np.isnan(s).any():
        raise DataError(f"scores and labels must be equal-length 1-D arrays without NaN "
                        f"({s.shape} vs {y.shape})")
    neg, pos = s[~y], s[y]
    n = neg.size
    if n == 0 or pos.size == 0:
        raise DataError(f"TPR at FPR needs both classes ({pos.size} positives, {n} negatives)")
    ms = {float(f): max_false_positives(float(f), n) for f in fprs}
    part = np.partition(neg, sorted({n - r for m in ms.values() for r in _window(n, m, 64)}))
    out: dict[float, float] = {}
    for f, m in ms.items():
        w, res = 64, _nearest_in_window(part, pos, f, m, 64)
        while res is None:
            w *= 8
            res = _nearest_in_window(np.partition(neg, sorted({n - r for r in _window(n, m, w)})),
                                     pos, f, m, w)
        out[f] = res
    return out


def identification(probe_feats: np.ndarray, probe_ids: np.ndarray, gallery_feats: np.ndarray,
                   gallery_ids: np.ndarray, fpirs: Sequence[float] = FPIRS,
                   ranks: Sequence[int] = RANKS, chunk: int = 2048) -> dict:
    """Step 6 for one gallery (``ijb_1n.py`` ``evaluation``): CMC and TPIR at FPIR.

    Every probe's subject must occur exactly once in the gallery. The mate's rank is the number
    of gallery templates scoring strictly higher (ties count in the probe's favour).
    """
    gallery_ids = np.asarray(gallery_ids)
    uniq, first, counts = np.unique(gallery_ids, return_index=True, return_counts=True)
    pos_in = np.clip(np.searchsorted(uniq, probe_ids), 0, len(uniq) - 1)
    found = uniq[pos_in] == probe_ids
    if not found.all() or (counts[pos_in] != 1).any():
        bad = np.asarray(probe_ids)[~found | (counts[pos_in] != 1)][:5].tolist()
        raise DataError(f"1:N: probe subject(s) {bad} do not occur exactly once in the gallery")
    mask = first[pos_in]
    q, g = len(probe_feats), len(gallery_feats)
    if q == 0:
        raise DataError("1:N: no probes to search")
    need = [math.ceil(q * f) for f in fpirs]
    keep = min(max(need), q * g - q)
    pos_sims, rank = np.empty(q), np.empty(q, dtype=np.int64)
    top = np.empty(0)
    for a in range(0, q, chunk):
        sim = np.asarray(probe_feats[a:a + chunk], np.float64) @ np.asarray(gallery_feats, np.float64).T
        rows = np.arange(sim.shape[0])
        mate = sim[rows, mask[a:a + chunk]]
        pos_sims[a:a + chunk] = mate
        rank[a:a + chunk] = np.count_nonzero(sim > mate[:, None], axis=1)
        sim[rows, mask[a:a + chunk]] = -np.inf
        if keep > 0:
            cand = np.concatenate([top, sim[np.isfinite(sim)]])
            top = cand if cand.size <= keep else np.partition(cand, cand.size - keep)[-keep:]
    top = np.sort(top)[::-1]
    out: dict = {f"top{r}": float(np.mean(rank < r)) for r in ranks}
    for f, k in zip(fpirs, need):
        out[f"tpir@{f:.0e}".replace("e-0", "e-")] = (float(np.sum(pos_sims > top[k - 1]) / q)
                                                      if 1 <= k <= top.size else None)
    out["probes"], out["gallery"] = int(q), int(g)
    return out


def _select(tfeats: np.ndarray, unique: np.ndarray, tids: np.ndarray, sids: np.ndarray,
            what: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and subject ids of the distinct templates in ``tids`` (first subject each)."""
    u, idx = np.unique(tids, return_index=True)
    return tfeats[_lookup(unique, u, what)], np.asarray(sids)[idx]


def evaluate_ijb_features(feats: np.ndarray, flip_feats: np.ndarray | None, meta: IJBMeta,
                          use_norm_score: bool = True, use_detector_score: bool = True,
                          use_flip_test: bool = True, one_to_n: bool = False,
                          fprs: Sequence[float] = IJB_FPRS) -> dict:
    """Steps 2-6 from image features in ``meta`` order: 1:1 results (+ ``"1:N"`` when asked),
    with the raw 1:1 template-pair scores as ``"_scores"``/``"_labels"`` (for plots)."""
    from ekd.eval.metrics import roc_auc

    x = combine_features(feats, flip_feats, meta.faceness, use_norm_score, use_detector_score,
                         use_flip_test)
    tfeats, unique = template_features(x, meta.templates, meta.medias)
    scores = template_scores(tfeats, unique, meta.p1, meta.p2)
    mode = "".join(f"{k}{1 if v else 0}" for k, v in
                   (("N", use_norm_score), ("D", use_detector_score), ("F", use_flip_test)))
    out: dict = {"protocol": f"{meta.target} 1:1 as InsightFace ijb_11.py (TestMode {mode}, "
                 "flip added, media mean -> template sum -> L2, cosine; TPR at the ROC point "
                 "nearest each FPR)", "pairs": int(scores.size),
                 "genuine": int(meta.label.sum()), "templates": int(unique.size),
                 "auc": roc_auc(scores, meta.label)}
    for f, v in tpr_at_fpr_nearest(scores, meta.label, fprs).items():
        out[f"tpr@{f:.0e}".replace("e-0", "e-")] = v
    if one_to_n:
        lists = read_ijb_1n(meta.root, meta.target)
        g1, g2 = [k for k in lists if k != "probe"]
        pf, pid = _select(tfeats, unique, *lists["probe"], "1:N probes")
        gf, gid = _select(tfeats, unique, *(np.concatenate([lists[g1][i], lists[g2][i]])
                                            for i in (0, 1)), "1:N gallery")
        res = {"protocol": f"{meta.target} 1:N as InsightFace ijb_1n.py (gallery {g1}+{g2})",
               **identification(pf, pid, gf, gid)}
        per = {}
        for gname in (g1, g2):
            gfk, gidk = _select(tfeats, unique, *lists[gname], f"1:N gallery {gname}")
            mated = np.isin(pid, gidk)
            per[gname] = identification(pf[mated], pid[mated], gfk, gidk)
        res["per_gallery"] = per
        res["mean_over_galleries"] = {k: (None if None in (per[g1][k], per[g2][k]) else
                                          (per[g1][k] + per[g2][k]) / 2)
                                      for k in per[g1] if k not in ("probes", "gallery")}
        out["1:N"] = res
    out["_scores"], out["_labels"] = scores, meta.label
    return out
