"""Does the validation split rank the cpu3 weight grid as LFW would? The grid's models and T3
scored on the validation identities twice: every image (the tuning rule's protocol) and frontal
images only (the domain of LFW: CFP identities' profile images left out).

The training identities hold CFP's profile images and the dlib teacher is weak on profiles
(faces README), so the all-images protocol may reward ignoring the teacher where LFW rewards
following it. Usage::

    python -m bench.kd_tuning_views --cells CACHE/cells --faces FACES --out bench/results/kd_tuning/cpu3_views.json

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
    models = {"T3 (teacher)": teacher_val_embeddings(args.faces, val_root, "teacher_dlib_r29_view32")}
    cells = sorted((args.cache / "cells").glob("T3-w0.5-*/run/model.pt"))
    for path in tqdm(cells, desc="embedding the grid", unit="model"):
        loaded = load_model(path)
        models[path.parts[-3]] = embed_dataset(loaded.model.eval(), ListDataset(
            [str(val_root / r) for r in rels], loaded.input_size), 256, "cpu")
    result = {"images": {name: int(keep.sum()) for name, keep in views.items()},
              "rows": {name: {view: scores(emb, labels, keep) for view, keep in views.items()}
                       for name, emb in models.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in result["rows"].items():
        print(f"{name:45s} " + "  ".join(f"{view}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
                                       for view, m in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
