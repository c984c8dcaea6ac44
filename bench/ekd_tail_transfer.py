"""Does a student take its teacher's *tail*? Similarity agreement on the ablation's validation split.

TPR at FPR 1e-4 is decided by the few hundredths of a percent of impostor pairs a model scores
highest. For each finished ablation cell (``<cache>/cells/<name>``, as ``bench/ekd_ablation.py``
leaves them: ``run/model.pt``) the student embeds every validation image and all pairs are
scored, as the ablation scores them. The reference is the teacher (its stored embeddings) or,
with ``--against CELL``, another cell's student. Per cell:

- ``spearman_all``, ``spearman_genuine``, ``spearman_impostor``: rank correlation of the student's
  and the reference's similarities over all pairs / the genuine pairs / the impostor pairs (how
  much of the reference's *ordering* the student shares);
- ``tail_overlap@F``: of the impostor pairs above the student's threshold at FPR F, the share that
  are also among the reference's top 1% of impostors (1% by chance: does the student fail on the
  pairs the reference finds hard, or on its own?);
- ``reference_tail_percentile@F``: the median percentile, in the student's impostor order, of the
  impostors above the reference's threshold at F (100 = the student also scores them highest);
- ``tpr@F`` and ``auc``: the student's own numbers (as in the ablation's cells).

    python -m bench.ekd_tail_transfer CACHE/cells/T2-w0.5-no_kd-s0-... [...] [--faces FACES]
    python -m bench.ekd_tail_transfer CELL... --against CACHE/cells/T2-w0.5-no_kd-s1-...

Writes ``bench/results/ekd_tail_transfer.json`` and ``.md`` (``--out``); rows of cells measured
by an earlier invocation stay (a cell measured again replaces its row).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.ekd_ablation import teacher_val_embeddings, val_images
from bench.kd_table import REPO

OUT = REPO / "bench" / "results" / "ekd_tail_transfer"
TAIL_FPRS = (1e-3, 1e-4)
REFERENCE_HARD = 0.01  # "hard for the reference": its top 1% of impostor pairs


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(x.size, dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(x.size)
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by position; the scores are continuous)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def tail_agreement(student: np.ndarray, teacher: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """The measures of the module docstring from two models' scores of the same pairs."""
    from ekd.eval.metrics import roc_auc, tpr_at_fpr

    imp_s, imp_t = student[~same], teacher[~same]
    out = {"spearman_all": spearman(student, teacher), "spearman_genuine": spearman(student[same], teacher[same]),
           "spearman_impostor": spearman(imp_s, imp_t), "auc": float(roc_auc(student, same))}
    out.update({f"tpr@{_f(f)}": v for f, v in tpr_at_fpr(student, same, TAIL_FPRS).items()})
    order_s = np.argsort(-imp_s, kind="stable")
    order_t = np.argsort(-imp_t, kind="stable")
    hard_t = np.zeros(imp_t.size, dtype=bool)
    hard_t[order_t[: max(1, int(REFERENCE_HARD * imp_t.size))]] = True
    percentile = _ranks(imp_s) / max(imp_s.size - 1, 1) * 100
    for f in TAIL_FPRS:
        k = max(1, int(round(f * imp_s.size)))
        out[f"tail_overlap@{_f(f)}"] = float(hard_t[order_s[:k]].mean())
        out[f"reference_tail_percentile@{_f(f)}"] = float(np.median(percentile[order_t[:k]]))
    return out


def _f(f: float) -> str:
    return f"{f:.0e}".replace("e-0", "e-")


def student_scores(cell: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """All-pairs scores of ``cell``'s student on the validation split, genuine flags, its spec."""
    from ekd.data import ListDataset
    from ekd.eval.flip_embed import embed_dataset
    from ekd.eval.protocols import all_pairs_scores
    from ekd.models.loading import load_model

    spec = json.loads((cell / "cell.json").read_text())
    val_root = Path(spec["cache"]) / "ablation" / "val"
    rels, labels = val_images(val_root)
    model = load_model(cell / "run" / "model.pt").model.eval()
    emb = embed_dataset(model, ListDataset([str(val_root / r) for r in rels], spec["input_size"]), 256, "cpu")
    scores, same = all_pairs_scores(emb, labels)
    return scores, same, spec


def teacher_scores(cell: Path, faces: Path) -> np.ndarray:
    """The teacher's all-pairs scores on the validation split ``cell`` was scored on."""
    from ekd.eval.protocols import all_pairs_scores

    val_root = Path(json.loads((cell / "cell.json").read_text())["cache"]) / "ablation" / "val"
    return all_pairs_scores(teacher_val_embeddings(faces, val_root), val_images(val_root)[1])[0]


def measure(cell: Path, reference: np.ndarray) -> dict[str, float]:
    """``cell``'s student against the ``reference`` model's scores of the same pairs."""
    student, same, spec = student_scores(cell)
    return {"method": spec["meta"]["method"], "seed": spec["meta"]["seed"], **tail_agreement(student, reference, same)}


def report(rows: list[dict], out: Path) -> None:
    keys = [k for k in rows[0] if k not in ("cell", "reference", "method", "seed")]
    lines = ["# Does the student take the teacher's tail? (validation split of `bench/ekd_ablation.py`)", "",
             "Written by `python -m bench.ekd_tail_transfer CELL...`; measures in its docstring.", "",
             "| row | seed | against | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r.get('reference', 'teacher')} | "
                     + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", nargs="+", type=Path)
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    ap.add_argument("--out", type=Path, default=OUT, help="path without suffix (.json and .md written)")
    ap.add_argument("--against", type=Path, default=None,
                    help="a cell whose student replaces the teacher as the reference (e.g. another seed: "
                         "how much of an ordering two students share)")
    args = ap.parse_args(argv)
    reference, label = None, "teacher"
    if args.against:
        reference, _, spec = student_scores(args.against)
        label = f"{spec['meta']['method']} s{spec['meta']['seed']}"
    done = args.out.with_suffix(".json")  # rows of cells measured before are kept (by cell name)
    kept = {(r["cell"], r.get("reference", "teacher")): r for r in json.loads(done.read_text())} if done.is_file() else {}
    rows = []
    for cell in args.cells:
        if reference is None:
            reference = teacher_scores(cell, args.faces)
        rows.append({"cell": cell.name, "reference": label, **measure(cell, reference)})
        print(json.dumps(rows[-1]))
    kept.update({(r["cell"], r["reference"]): r for r in rows})
    report(sorted(kept.values(), key=lambda r: (r.get("reference", "teacher") != "teacher", r["seed"], r["cell"])), args.out)
    print(f"written {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
