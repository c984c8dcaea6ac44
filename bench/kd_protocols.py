"""Real-face protocols of the KD table (``../shared/data/faces/README.md``, "Protocols used by
the benchmark"), for a trained student and for the embedding-only teacher.

- LFW View-2 (``lfw/pairs.txt``): 10-fold accuracy (InsightFace ``verification.py``).
- LFW all-pairs: every identity with >= 2 images, its first 10 images by file name, all pairs;
  TPR at FPR 1e-3 / 1e-4 / 1e-5 (largest ROC point with FPR <= target), plus the TPR on a
  log-spaced FPR grid for the ROC plot (averaged over seeds by the report).
- CFP fold 10 (identities 451-500, not in ``train/``): FF and FP 10-fold accuracy.

Embedding = ``model(x) + model(flip(x))``, L2-normalised. The teacher's embedding is
``emb + emb_flip`` of ``teacher_dlib_r29/{lfw,cfp}.npz``. The all-pairs image list is the
teacher file's LFW list, so students and teacher are scored on the same 20.6M pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ekd.data.folder import ListDataset
from ekd.eval.cfp import read_cfp_pairs
from ekd.eval.flip_embed import extract_embeddings
from ekd.eval.metrics import l2_normalize, tpr_at_fpr, verification_accuracy
from ekd.eval.protocols import PairList, all_pairs_scores, cap_per_identity, read_lfw_pairs

REPORT_FPRS = (1e-3, 1e-4, 1e-5)
ROC_GRID = tuple(float(f) for f in np.logspace(-6, 0, 49))
METRICS = ("lfw_acc", "lfw_tpr@1e-3", "lfw_tpr@1e-4", "lfw_tpr@1e-5", "cfp_ff_acc", "cfp_fp_acc")


@dataclass
class Protocols:
    """Pair lists and image lists of the three protocols, with absolute image paths."""

    lfw_pairs: PairList
    all_pairs_paths: list[str]
    all_pairs_labels: np.ndarray
    cfp: dict[str, PairList]

    def image_paths(self) -> list[str]:
        """Every image any protocol needs, once, in a fixed order."""
        seen: dict[str, None] = {}
        for p in (*self.lfw_pairs.paths1, *self.lfw_pairs.paths2, *self.all_pairs_paths):
            seen.setdefault(os.path.normpath(p), None)
        for pairs in self.cfp.values():
            for p in (*pairs.paths1, *pairs.paths2):
                seen.setdefault(os.path.normpath(p), None)
        return list(seen)


def teacher_npz(faces: Path, name: str, folder: str = "teacher_dlib_r29") -> tuple[np.ndarray, list[str]]:
    """A stored teacher's unit embeddings (``emb + emb_flip``) in ``<folder>/{name}.npz`` (T2's
    folder by default) and their image paths (relative to ``faces/name``)."""
    data = np.load(faces / folder / f"{name}.npz")
    emb = l2_normalize(data["emb"] + data["emb_flip"]).astype(np.float32)
    return emb, [str(p) for p in data["paths"]]


def lfw_all_pairs_selection(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the LFW image list ``paths`` (``images/<identity>/<file>``) of the all-pairs
    protocol (identities with >= 2 images, first 10 by file name) and their identity labels."""
    labels = np.array([p.split("/")[1] for p in paths])
    keep = cap_per_identity(paths, labels, 10)
    return keep, labels[keep]


def load_protocols(faces: Path) -> Protocols:
    paths = [str(p) for p in np.load(faces / "teacher_dlib_r29" / "lfw.npz")["paths"]]
    keep, labels = lfw_all_pairs_selection(paths)
    return Protocols(
        lfw_pairs=read_lfw_pairs(faces / "lfw" / "pairs.txt", faces / "lfw" / "images"),
        all_pairs_paths=[os.path.normpath(faces / "lfw" / paths[i]) for i in keep],
        all_pairs_labels=labels,
        cfp={s: read_cfp_pairs(faces / "cfp", s, folds=(10,)) for s in ("FF", "FP")},
    )


def metrics_from_embeddings(protocols: Protocols, lookup: dict[str, np.ndarray]) -> dict:
    """All table metrics from unit embeddings looked up by normalised path."""

    def get(paths: list[str]) -> np.ndarray:
        return np.stack([lookup[os.path.normpath(p)] for p in paths])

    def accuracy(pairs: PairList) -> tuple[float, float]:
        res = verification_accuracy(get(pairs.paths1), get(pairs.paths2), pairs.issame)
        return float(res["accuracy"]), float(res["accuracy_std"])

    out: dict = {}
    out["lfw_acc"], out["lfw_acc_std"] = accuracy(protocols.lfw_pairs)
    scores, same = all_pairs_scores(get(protocols.all_pairs_paths), protocols.all_pairs_labels)
    grid = tpr_at_fpr(scores, same, REPORT_FPRS + ROC_GRID)
    for f in REPORT_FPRS:
        out[f"lfw_tpr@{f:.0e}".replace("e-0", "e-")] = grid[f]
    out["roc_fpr"] = list(ROC_GRID)
    out["roc_tpr"] = [grid[f] for f in ROC_GRID]
    out["all_pairs"] = int(scores.size)
    for split, pairs in protocols.cfp.items():
        out[f"cfp_{split.lower()}_acc"], out[f"cfp_{split.lower()}_acc_std"] = accuracy(pairs)
    return out


def load_eval_images(protocols: Protocols, input_size: int, cache: Path) -> tuple[list[str], torch.Tensor]:
    """Every protocol image decoded at ``input_size`` (float16, cached on disk once)."""
    file = cache / f"eval_images_{input_size}.pt"
    paths = protocols.image_paths()
    if file.is_file():
        stored = torch.load(file, weights_only=True)
        if stored["paths"] == paths:
            return paths, stored["images"]
    loader = DataLoader(ListDataset(paths, input_size), batch_size=256, num_workers=0)
    images = torch.cat([b.half() for b in loader])
    tmp = file.with_suffix(".tmp")
    torch.save({"paths": paths, "images": images}, tmp)
    os.replace(tmp, file)
    return paths, images


def embed_student(model: torch.nn.Module, paths: list[str], images: torch.Tensor,
                  device: str = "cpu") -> dict[str, np.ndarray]:
    """Unit embedding (with the mirror image) of every protocol image, by path."""
    batches = (images[i:i + 256].float() for i in range(0, len(images), 256))
    emb = extract_embeddings(model, batches, device=device, flip=True)
    return dict(zip(paths, emb))


def evaluate_student(model: torch.nn.Module, protocols: Protocols, paths: list[str],
                     images: torch.Tensor) -> dict:
    """Embed every protocol image with ``model`` (with its mirror image) and score."""
    return metrics_from_embeddings(protocols, embed_student(model, paths, images))


def teacher_lookup(faces: Path, folder: str = "teacher_dlib_r29") -> dict[str, np.ndarray]:
    """A stored teacher's unit embeddings (``emb + emb_flip`` of ``<folder>/{lfw,cfp}.npz``) by
    normalised image path."""
    lookup: dict[str, np.ndarray] = {}
    for name in ("lfw", "cfp"):
        emb, paths = teacher_npz(faces, name, folder)
        for p, e in zip(paths, emb):
            lookup[os.path.normpath(faces / name / p)] = e
    return lookup


def evaluate_teacher_npz(protocols: Protocols, faces: Path) -> dict:
    """The shared teacher's metrics from its stored embeddings (``emb + emb_flip``)."""
    return metrics_from_embeddings(protocols, teacher_lookup(faces))
