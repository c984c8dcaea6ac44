"""The pretrained teacher's embeddings on the real-face protocols, against the reference values
of ``../shared/data/faces/README.md``.

Embedding = ``emb + emb_flip`` of ``teacher_dlib_r29/{lfw,cfp}.npz``, L2-normalised. Protocols:
LFW View-2 ``pairs.txt`` (10-fold accuracy, InsightFace ``verification.py``); LFW all-pairs
(every identity with >= 2 images, its first 10 images by file name, all pairs; TPR at FPR
1e-3/1e-4/1e-5, largest FPR <= target); CFP-FF and CFP-FP from the dataset's ``Protocol`` folder,
fold 10 only and all 10 folds (same/diff interleaved, contiguous 10-fold accuracy).

The shared folder lies beside the repository (``../shared/data/faces``); without it the script
prints a message and exits 0. Usage: ``python -m bench.real_faces_eval``; writes
``bench/results/real_faces_eval.{md,json}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ekd.eval.cfp import read_cfp_pairs
from ekd.eval.metrics import tpr_at_fpr, verification_accuracy
from ekd.eval.protocols import all_pairs_scores, read_lfw_pairs
from bench.kd_protocols import lfw_all_pairs_selection, teacher_npz

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "data" / "faces"
REFERENCE = {
    "LFW View-2": "0.989167 ± 0.004099",
    "LFW all-pairs": "0.9289 / 0.7831 / 0.5351",
    "CFP-FF all folds": "0.9877 ± 0.0037",
    "CFP-FP all folds": "0.6684 ± 0.0225",
    "CFP-FF fold 10": "0.9857 ± 0.0111",
    "CFP-FP fold 10": "0.6629 ± 0.0677",
}


def teacher(name: str) -> tuple[np.ndarray, list[str], dict[str, int]]:
    emb, paths = teacher_npz(FACES, name)
    return emb, paths, {os.path.normpath(FACES / name / p): i for i, p in enumerate(paths)}


def accuracy(emb: np.ndarray, index: dict[str, int], pairs) -> tuple[str, int]:  # noqa: ANN001
    res = verification_accuracy(emb[[index[p] for p in pairs.paths1]],
                                emb[[index[p] for p in pairs.paths2]], pairs.issame)
    return f"{res['accuracy']:.6f} ± {res['accuracy_std']:.6f}", len(pairs)


def main() -> int:
    if not (FACES / "teacher_dlib_r29").is_dir():
        print(f"real faces not found at {FACES}: nothing to do")
        return 0
    rows = []

    def run(name: str, fn) -> None:  # noqa: ANN001
        start = time.perf_counter()
        value, pairs = fn()
        rows.append({"protocol": name, "pairs": pairs, "result": value,
                     "reference": REFERENCE[name], "seconds": round(time.perf_counter() - start, 2)})

    emb, paths, index = teacher("lfw")
    run("LFW View-2", lambda: accuracy(emb, index, read_lfw_pairs(FACES / "lfw" / "pairs.txt",
                                                                  FACES / "lfw" / "images")))

    def lfw_all_pairs() -> tuple[str, int]:
        keep, labels = lfw_all_pairs_selection(paths)
        scores, same = all_pairs_scores(emb[keep], labels)
        tpr = tpr_at_fpr(scores, same, (1e-3, 1e-4, 1e-5))
        return " / ".join(f"{v:.4f}" for v in tpr.values()) + f" ({int(same.sum()):,} genuine)", \
            int(scores.size)

    run("LFW all-pairs", lfw_all_pairs)
    emb, paths, index = teacher("cfp")
    for folds, label in ((None, "all folds"), ((10,), "fold 10")):
        for split in ("FF", "FP"):
            run(f"CFP-{split} {label}",
                lambda s=split, f=folds: accuracy(emb, index, read_cfp_pairs(FACES / "cfp", s, f)))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_faces_eval.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Teacher embeddings (dlib ResNet, 128-d) on the real-face protocols", "",
             "Embedding = emb + emb_flip, L2-normalised. Accuracy: InsightFace 10-fold protocol "
             "(mean ± std over folds, ddof 0). All-pairs: TPR at FPR 1e-3 / 1e-4 / 1e-5.", "",
             "| protocol | pairs | ekd result | README reference | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['protocol']} | {r['pairs']:,} | {r['result']} | {r['reference']} | "
              f"{r['seconds']} |" for r in rows]
    lines += ["", "Run: `python -m bench.real_faces_eval` (needs ../shared/data/faces)."]
    (out / "real_faces_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
