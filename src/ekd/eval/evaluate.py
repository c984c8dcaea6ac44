"""Evaluate a face model on verification protocols (pair lists and all-pairs over a folder).

- Pair protocols (LFW View-2 ``pairs.txt``, CFP ``Split/{FF,FP}`` folds, a generic
  ``path1 path2 label`` list, or an InsightFace ``.bin``): 10-fold accuracy as InsightFace's
  ``eval/verification.py``, ROC AUC and TPR at FPR 1e-1 ... 1e-6 of the cosine score.
- All-pairs over an identity folder: every identity with >= 2 images, its first
  ``max_per_identity`` images in file-name order, every pair among them; AUC and TPR@FPR.
- IJB-B/C 1:1 and 1:N: :mod:`ekd.eval.ijb`.

Every result holds a ``"protocol"`` line naming the variant and a private ``"_roc"`` entry
(a few hundred ROC points, :func:`ekd.eval.plots.roc_points`) for plots; reports drop keys
starting with ``_`` from ``metrics.json``.

Embeddings follow InsightFace: ``f(x) + f(flip(x))``, L2-normalised. ``progress`` is ``True`` or
the label of the embedding bar (``ekd eval`` names the model and the set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ekd.data import ImageFolderDataset, ListDataset
from ekd.data.verification_bin import BinDataset
from ekd.errors import DataError
from ekd.eval.bootstrap import PairScores, PairTail
from ekd.eval.flip_embed import embed_dataset
from ekd.eval.metrics import roc_auc, threshold_at_fpr, tpr_at_fpr, verification_accuracy
from ekd.eval.plots import roc_points
from ekd.eval.protocols import PairList, all_pairs_scores, cap_per_identity

REPORT_FPRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
THRESHOLD_FPRS = (1e-3, 1e-4, 1e-5)


def fpr_key(f: float) -> str:
    return f"tpr@{f:.0e}".replace("e-0", "e-")


def score_metrics(scores: np.ndarray, issame: np.ndarray,
                  threshold_fprs: tuple[float, ...] = THRESHOLD_FPRS) -> dict:
    """AUC, TPR at each report FPR (``None`` = too few negatives) and the score thresholds at
    ``threshold_fprs`` (deployment; validation adds the FPRs of EKD's anchors)."""
    out: dict = {"pairs": int(scores.size), "genuine": int(issame.sum()), "auc": roc_auc(scores, issame)}
    for f, tpr in tpr_at_fpr(scores, issame, REPORT_FPRS).items():
        out[fpr_key(f)] = tpr
    out["thresholds"] = {f"{f:.0e}".replace("e-0", "e-"): threshold_at_fpr(scores, issame, f)
                         for f in threshold_fprs}
    out["_roc"] = roc_points(scores, issame)
    return out


def pair_metrics(e1: np.ndarray, e2: np.ndarray, issame: np.ndarray, nfolds: int = 10,
                 protocol: str = "", threshold_fprs: tuple[float, ...] = THRESHOLD_FPRS) -> dict:
    """Accuracy (InsightFace's 10-fold protocol) and score metrics of embedded pairs."""
    acc = verification_accuracy(e1, e2, issame, nfolds=nfolds)
    out = {"protocol": protocol or f"{nfolds}-fold accuracy (InsightFace verification.py), "
           "cosine AUC and TPR at FPR (largest FPR <= target)",
           "accuracy": acc["accuracy"], "accuracy_std": acc["accuracy_std"]}
    out.update(score_metrics(np.sum(e1 * e2, axis=1), issame, threshold_fprs))
    return out


def embed_paths(model: nn.Module, paths: list[str], input_size: int, batch_size: int = 128,
                device: torch.device | str = "cpu", progress: bool | str = False) -> np.ndarray:
    """Flip-summed, L2-normalised embeddings of image files, in order."""
    return embed_dataset(model, ListDataset(paths, input_size), batch_size, device, progress=progress)


@dataclass
class VerificationSet:
    """The images of one verification protocol, listed (or read) once, and how their embeddings
    are scored: :meth:`evaluate` embeds ``dataset`` in order (sharded over ranks under
    ``torchrun``, :func:`embed_dataset`) and returns ``score(embeddings)``. ``genuine`` and
    ``impostors`` count the pairs (TPR at FPR ``f`` needs at least ``1 / f`` impostor pairs).
    ``tail(embeddings, max_fpr, tail_factor)`` is what the identity bootstrap needs
    (:class:`ekd.eval.bootstrap.PairTail`); None when the set names no identities (``.bin``)."""

    dataset: Dataset
    score: Callable[..., dict]  # (embeddings, threshold_fprs) -> metrics
    genuine: int
    impostors: int
    source: str
    tail: Callable[[np.ndarray, float, float], PairTail] | None = None
    #: Every pair's scores with identity codes (a pair list naming identities): what the
    #: identity bootstrap of accuracy and AUC needs (:func:`ekd.eval.bootstrap.bootstrap_pair_metrics`).
    pair_scores: Callable[[np.ndarray], PairScores] | None = None

    def evaluate(self, model: nn.Module, batch_size: int = 128, device: torch.device | str = "cpu",
                 progress: bool | str = False, threshold_fprs: tuple[float, ...] = THRESHOLD_FPRS) -> dict:
        emb = embed_dataset(model, self.dataset, batch_size, device, progress=progress)
        return self.score(emb, threshold_fprs)


def pairs_set(pairs: PairList, input_size: int, nfolds: int = 10, source: str = "") -> VerificationSet:
    """A pair list: each image embedded once, 10-fold accuracy and score metrics of the pairs."""
    unique = pairs.unique_paths()
    index = {p: i for i, p in enumerate(unique)}
    i1 = np.asarray([index[p] for p in pairs.paths1], dtype=np.int64)
    i2 = np.asarray([index[p] for p in pairs.paths2], dtype=np.int64)
    ids = pair_identities(pairs)
    tail = None if ids is None else (lambda emb, max_fpr, factor: PairTail.from_pairs(
        np.sum(emb[i1] * emb[i2], axis=1), pairs.issame, ids[0], ids[1], max_fpr, factor))
    scores = None if ids is None else (lambda emb: PairScores(
        np.sum(emb[i1] * emb[i2], axis=1), np.sum(np.square(np.subtract(emb[i1], emb[i2])), axis=1),
        pairs.issame, ids[0], ids[1], nfolds))
    return VerificationSet(ListDataset(unique, input_size),
                           lambda emb, thr=THRESHOLD_FPRS: pair_metrics(emb[i1], emb[i2], pairs.issame,
                                                                       nfolds, threshold_fprs=thr),
                           int(pairs.issame.sum()), int((~pairs.issame).sum()), source, tail, scores)


def pair_identities(pairs: PairList) -> tuple[np.ndarray, np.ndarray] | None:
    """Identity codes of both sides of every pair from the images' folder names (LFW's
    ``<Name>/<Name>_NNNN.jpg``, identity folders), or None when the folders do not name
    identities (a genuine pair across two folders or an impostor pair within one)."""
    names = [Path(p).parent.name for p in pairs.paths1 + pairs.paths2]
    codes = np.unique(names, return_inverse=True)[1].reshape(-1)
    id1, id2 = codes[:len(pairs.paths1)], codes[len(pairs.paths1):]
    same = id1 == id2
    if np.any(same != pairs.issame):
        return None
    return id1, id2


def bin_set(path: str | Path, input_size: int, nfolds: int = 10, color: str = "rgb") -> VerificationSet:
    """An InsightFace ``.bin`` (pair ``i`` = images ``2i``, ``2i+1``), decoded in ``color`` order."""
    ds = BinDataset(path, input_size=input_size, color=color)
    protocol = (f"InsightFace .bin ({color.upper()}), {nfolds}-fold accuracy as verification.py, "
                "cosine AUC and TPR at FPR")
    return VerificationSet(ds, lambda emb, thr=THRESHOLD_FPRS: pair_metrics(emb[0::2], emb[1::2], ds.issame,
                                                                         nfolds, protocol, thr),
                           int(ds.issame.sum()), int((~ds.issame).sum()), str(path))


def folder_set(root: str | Path, input_size: int, max_per_identity: int | None = 10) -> VerificationSet:
    """All pairs over an identity folder: the first ``max_per_identity`` images (by name) of every
    identity with >= 2 images; AUC and TPR@FPR (no accuracy: there are no folds)."""
    ds = ImageFolderDataset(root, input_size=input_size, train=False)
    paths = [p for p, _ in ds.samples]
    keep = cap_per_identity(paths, ds.labels, max_per_identity)
    if keep.size < 2:
        raise DataError(f"{root}: no identity has 2 or more images, so there is no pair to verify")
    labels = np.asarray(ds.labels)[keep]
    counts = np.unique(labels, return_counts=True)[1]
    genuine = int((counts * (counts - 1) // 2).sum())

    def score(emb: np.ndarray, threshold_fprs: tuple[float, ...] = THRESHOLD_FPRS) -> dict:
        scores, issame = all_pairs_scores(emb, labels)
        out = {"protocol": f"all pairs, first {max_per_identity} images per identity (>= 2), "
               "cosine AUC and TPR at FPR (largest FPR <= target)"}
        out.update(score_metrics(scores, issame, threshold_fprs))
        out["images"] = int(keep.size)
        return out

    def tail(emb: np.ndarray, max_fpr: float, factor: float) -> PairTail:
        return PairTail.from_all_pairs(*all_pairs_scores(emb, labels), labels, max_fpr, factor)

    return VerificationSet(ListDataset([paths[i] for i in keep], input_size), score, genuine,
                           keep.size * (keep.size - 1) // 2 - genuine, str(root), tail)


def evaluate_pairs(model: nn.Module, pairs: PairList, input_size: int, batch_size: int = 128,
                   device: torch.device | str = "cpu", progress: bool | str = False,
                   nfolds: int = 10) -> dict:
    """10-fold accuracy (InsightFace protocol), AUC and TPR@FPR of a pair list."""
    return pairs_set(pairs, input_size, nfolds).evaluate(model, batch_size, device, progress)


def evaluate_bin(model: nn.Module, path: str | Path, input_size: int, batch_size: int = 128,
                 device: torch.device | str = "cpu", progress: bool | str = False, nfolds: int = 10,
                 color: str = "rgb") -> dict:
    """An InsightFace ``.bin`` (pair ``i`` = images ``2i``, ``2i+1``), decoded in ``color`` order."""
    return bin_set(path, input_size, nfolds, color).evaluate(model, batch_size, device, progress)


def evaluate_folder(model: nn.Module, root: str | Path, input_size: int,
                    max_per_identity: int | None = 10, batch_size: int = 128,
                    device: torch.device | str = "cpu", progress: bool | str = False) -> dict:
    """All-pairs verification over an identity folder with a per-identity cap."""
    return folder_set(root, input_size, max_per_identity).evaluate(model, batch_size, device, progress)


def evaluate_ijb(model: nn.Module, root: str | Path, target: str = "IJBC", input_size: int = 112,
                 batch_size: int = 128, device: torch.device | str = "cpu", progress: bool | str = False,
                 use_norm_score: bool = True, use_detector_score: bool = True,
                 use_flip_test: bool = True, one_to_n: bool = False) -> dict:
    """IJB-B/C: align and embed ``root/loose_crop`` (raw features of each crop and of its mirror,
    :func:`ekd.eval.align.embed_aligned`), then :func:`ekd.eval.ijb.evaluate_ijb_features` with
    InsightFace's switches (defaults N1 D1 F1). ``_scores``/``_labels`` become ``_roc`` points."""
    from ekd.eval.align import embed_aligned
    from ekd.eval.ijb import evaluate_ijb_features, read_ijb_meta

    meta = read_ijb_meta(root, target)
    crops = meta.root / "loose_crop"
    if not crops.is_dir():
        raise DataError(f"IJB image folder not found: {crops}")
    feats, flips = embed_aligned(model, [crops / n for n in meta.names], meta.landmarks,
                                 input_size, batch_size, device, flip=use_flip_test,
                                 progress=progress)
    res = evaluate_ijb_features(feats, flips, meta, use_norm_score, use_detector_score,
                                use_flip_test, one_to_n)
    res["_roc"] = roc_points(res.pop("_scores"), res.pop("_labels"))
    return res


def format_value(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
