"""Does the validation split rank the cpu3 weight grid as LFW would? The grid's models and T3
scored on the validation identities twice: every image (the tuning rule's protocol) and frontal
images only (the domain of LFW: CFP identities' profile images left out).

With each model: where its embeddings lie (genuine and impostor cosine, the norm of their mean)
and how close they are to T3's (cosine, centred cosine, linear CKA), and whether the cell saw T3
as stored or centred (``teacher.center``).

The training identities hold CFP's profile images and the dlib teacher is weak on profiles
(faces README), so the all-images protocol may reward ignoring the teacher where LFW rewards
following it. Usage::

    python -m bench.kd_tuning_views --cache CACHE --faces FACES --out bench/results/kd_tuning/cpu3_views.json

``CACHE`` is the benchmark cache holding the tuning cells' run folders and the split
(``ablation/val``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.ekd_ablation import teacher_val_embeddings, val_images
from ekd.data import ListDataset
from ekd.eval.flip_embed import embed_dataset
from ekd.eval.metrics import roc_auc, tpr_at_fpr
from ekd.eval.protocols import all_pairs_scores
from ekd.models.loading import load_model

FPRS = (1e-3, 1e-4)


def geometry(emb: np.ndarray, labels: np.ndarray, teacher: np.ndarray) -> dict:
    """Where a model's unit embeddings lie and how they relate to the teacher's, over all pairs
    of the validation images: mean genuine and impostor cosine, the norm of the mean embedding
    (near 1: a narrow cone), the mean cosine to the teacher's embedding of the same image, that
    cosine after both are centred, and the linear CKA to the teacher (invariant to centring)."""
    s, same = all_pairs_scores(emb, labels)
    a, b = emb - emb.mean(0), teacher - teacher.mean(0)
    centred = (a / np.linalg.norm(a, axis=1, keepdims=True) * (b / np.linalg.norm(b, axis=1, keepdims=True))).sum(1)
    cka = np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))
    return {"genuine_cos": float(s[same].mean()), "impostor_cos": float(s[~same].mean()),
            "impostor_cos_sd": float(s[~same].std()), "mean_norm": float(np.linalg.norm(emb.mean(0))),
            "cos_to_teacher": float((emb * teacher).sum(1).mean()), "centred_cos_to_teacher": float(centred.mean()),
            "cka_to_teacher": float(cka)}


def teacher_train_geometry(faces: Path, folder: str = "teacher_dlib_r29_view32") -> dict:
    """The teacher's unit embeddings over every training image (both views): the norm of their
    mean and the mean cosine of impostor pairs before and after centring (1M random pairs)."""
    data = np.load(faces / folder / "train.npz")
    ids = np.array([str(p).split("/")[0] for p in data["paths"]])
    unit = np.concatenate([data["emb"], data["emb_flip"]]).astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    ids = np.concatenate([ids, ids])
    mean = unit.mean(0)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(unit), 1_000_000), rng.integers(0, len(unit), 1_000_000)
    keep = ids[i] != ids[j]
    centred = unit - mean
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    return {"images": int(len(unit) // 2), "mean_norm": float(np.linalg.norm(mean)),
            "impostor_cos": float((unit[i] * unit[j]).sum(1)[keep].mean()),
            "impostor_cos_centred": float((centred[i] * centred[j]).sum(1)[keep].mean())}


def teacher_view(cell_dir: Path) -> str:
    """How a grid cell saw its teacher: ``centred`` (teacher.center train_mean) or ``as stored``."""
    config = json.loads((cell_dir / "cell.json").read_text())["config"]
    return "centred" if config.get("teacher", {}).get("center", "none") != "none" else "as stored"


def scores(emb: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> dict:
    """All-pairs AUC and TPR@FPR over the images ``keep`` selects."""
    s, same = all_pairs_scores(emb[keep], labels[keep])
    out = {f"tpr@{f:.0e}".replace("e-0", "e-"): v for f, v in tpr_at_fpr(s, same, FPRS).items()}
    out["auc"] = float(roc_auc(s, same))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="the benchmark cache (cells/, ablation/val)")
    ap.add_argument("--faces", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    val_root = args.cache / "ablation" / "val"
    rels, labels = val_images(val_root)
    frontal = np.array(["/profile" not in "/" + r.split("/", 1)[1] for r in rels])
    views = {"every image": np.ones(len(rels), dtype=bool), "frontal only": frontal}
    teacher = teacher_val_embeddings(args.faces, val_root, "teacher_dlib_r29_view32")
    models, seen = {"T3 (teacher)": teacher}, {"T3 (teacher)": "itself"}
    cells = sorted((args.cache / "cells").glob("T3-w0.5-*/run/model.pt"))
    for path in tqdm(cells, desc="embedding the grid", unit="model"):
        loaded = load_model(path)
        models[path.parts[-3]] = np.asarray(embed_dataset(loaded.model.eval(), ListDataset(
            [str(val_root / r) for r in rels], loaded.input_size), 256, "cpu"))
        seen[path.parts[-3]] = teacher_view(path.parents[1])
    result = {"images": {name: int(keep.sum()) for name, keep in views.items()},
              "teacher_on_training_images": teacher_train_geometry(args.faces),
              "rows": {name: {"teacher": seen[name],
                              **{view: scores(emb, labels, keep) for view, keep in views.items()},
                              "geometry": geometry(emb, labels, teacher)}
                       for name, emb in models.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("teacher on the training images:", result["teacher_on_training_images"])
    for name, row in result["rows"].items():
        print(f"{name:45s} {row['teacher']:9s} " + "  ".join(
            f"{view}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
            for view, m in row.items() if view != "teacher"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
