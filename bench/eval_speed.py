"""TPR at FPR over 20M+ scores: time of the evaluation rules on 2 cores, without a full sort.

Scores mimic LFW all-pairs (20,604,990 pairs, 14,508 genuine, float32 cosines). Timed:

* ``ekd.eval.metrics.tpr_at_fpr`` -- largest FPR <= target (LFW all-pairs, reports), six targets;
* ``ekd.eval.ijb.tpr_at_fpr_nearest`` -- InsightFace's IJB nearest-point rule, six targets;
* ``ekd.eval.plots.roc_points`` -- the ~300 ROC points kept for plots;
* for scale, a full ``np.sort`` of the same scores and scikit-learn's ``roc_curve`` (if installed).

Usage: ``python -m bench.eval_speed [--pairs 20604990] [--repeats 3]``; writes
``bench/results/eval_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from ekd.eval.ijb import tpr_at_fpr_nearest
from ekd.eval.metrics import DEFAULT_FPRS, tpr_at_fpr
from ekd.eval.plots import roc_points

REPO = Path(__file__).resolve().parents[1]


def best_time(fn, repeats: int) -> tuple[float, object]:  # noqa: ANN001
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20_604_990)
    ap.add_argument("--genuine", type=int, default=14_508)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    labels = np.zeros(args.pairs, dtype=bool)
    labels[rng.choice(args.pairs, args.genuine, replace=False)] = True
    scores = (rng.normal(0.0, 0.12, args.pairs) + 0.55 * labels).astype(np.float32)
    rows = []
    t, res = best_time(lambda: tpr_at_fpr(scores, labels, DEFAULT_FPRS), args.repeats)
    rows.append(("tpr_at_fpr, 6 targets (largest FPR <= f)", t, res))
    t, res = best_time(lambda: tpr_at_fpr_nearest(scores, labels), args.repeats)
    rows.append(("tpr_at_fpr_nearest, 6 targets (IJB nearest point)", t, res))
    t, _ = best_time(lambda: roc_points(scores, labels), args.repeats)
    rows.append(("roc_points (~300 plot points)", t, None))
    t, _ = best_time(lambda: np.sort(scores), 1)
    rows.append(("reference: one full np.sort", t, None))
    try:
        from sklearn.metrics import roc_curve

        t, _ = best_time(lambda: roc_curve(labels, scores), 1)
        rows.append(("reference: sklearn roc_curve (full sort)", t, None))
    except ImportError:
        pass
    result = {"pairs": args.pairs, "genuine": args.genuine, "cpus": os.cpu_count(),
              "repeats": args.repeats, "python": platform.python_version(),
              "numpy": np.__version__,
              "timings_s": {name: round(t, 3) for name, t, _ in rows},
              "tpr": {name: {f"{k:g}": v for k, v in r.items()} for name, _, r in rows if r}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# TPR at FPR over 20M+ scores", "",
             f"{args.pairs:,} float32 scores ({args.genuine:,} genuine), {os.cpu_count()} CPUs, "
             f"best of {args.repeats}; the requirement is <= 10 s without a full sort.", "",
             "| computation | seconds |", "|---|---|"]
    lines += [f"| {name} | {t:.2f} |" for name, t, _ in rows]
    lines += ["", "Run: `python -m bench.eval_speed`."]
    (out / "eval_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
