"""Whether a schedule has converged: the criterion on the no-KD student trained for E and 2E
epochs, the committed sweep cells it reads, and the evidence table the convergence report
(``python -m bench.kd_convergence``) and the v2 table's report (:mod:`bench.kd_report`) print.

Criterion (the issue's): the student is converged at ``E`` epochs when doubling them changes
the seed-mean LFW accuracy by < 0.01 **and** the seed-mean LFW all-pairs TPR@1e-3 by < 5%
relative or by less than the seed-to-seed spread (largest |seed a − seed b| at either length).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

ACC_TOL = 0.01
TPR_REL_TOL = 0.05


def verdict(short: list[dict], long: list[dict]) -> dict:
    """The criterion on the runs at E (``short``) and 2E (``long``) epochs of one size."""
    def mean(rs: list[dict], m: str) -> float:
        return sum(r["metrics"][m] or 0.0 for r in rs) / len(rs)

    def spread(rs: list[dict], m: str) -> float:
        return max((abs((a["metrics"][m] or 0.0) - (b["metrics"][m] or 0.0)) for a, b in combinations(rs, 2)),
                   default=0.0)

    d_acc = mean(long, "lfw_acc") - mean(short, "lfw_acc")
    t_short, t_long = mean(short, "lfw_tpr@1e-3"), mean(long, "lfw_tpr@1e-3")
    d_tpr = t_long - t_short
    rel = abs(d_tpr) / t_short if t_short > 0 else float("inf")
    sd = max(spread(short, "lfw_tpr@1e-3"), spread(long, "lfw_tpr@1e-3"))
    ok = abs(d_acc) < ACC_TOL and (rel < TPR_REL_TOL or abs(d_tpr) < sd)
    return {"d_acc": d_acc, "d_tpr3": d_tpr, "rel_tpr3": rel, "seed_spread_tpr3": sd, "converged": ok}


def evidence_lines(runs: dict[tuple[int, int, int], dict], doublings: list[int], seeds: int,
                   sizes: list[int] | None = None) -> tuple[list[str], dict]:
    """Markdown of the evidence (every run, then per size and E the deltas E -> 2E and the verdict)
    from ``{(size, epochs, seed): record}``, and the verdicts by ``"<size>px <E>-><2E>"``; ``sizes``
    (default: those of ``runs``) are the rows of the verdict table."""
    sizes = sorted({s for s, _, _ in runs}) if sizes is None else sizes
    lines = [f"Criterion: doubling the epochs changes the seed-mean LFW accuracy by < {ACC_TOL} and the "
             f"seed-mean LFW all-pairs TPR@1e-3 by < {TPR_REL_TOL:.0%} relative or by less than the "
             "seed-to-seed spread.", "",
             "| size | epochs | seed | LFW acc | TPR@1e-3 | TPR@1e-4 | TPR@1e-5 | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for (s, e, seed), r in sorted(runs.items()):
        m = r["metrics"]
        keys = ("lfw_tpr@1e-3", "lfw_tpr@1e-4", "lfw_tpr@1e-5")
        tprs = " | ".join("n/a" if m[k] is None else f"{m[k]:.4f}" for k in keys)
        lines.append(f"| {s} | {e} | {seed} | {m['lfw_acc']:.4f} | {tprs} | "
                     f"{(r['train_seconds'] + r['eval_seconds']) / 60:.1f} |")
    lines += ["", "| size | E → 2E | Δ LFW acc | Δ TPR@1e-3 (relative) | seed spread TPR@1e-3 | converged at E |",
              "|---|---|---|---|---|---|"]
    verdicts = {}
    for s in sizes:
        for e in doublings:
            short = [r for (sz, n, _), r in runs.items() if sz == s and n == e]
            long = [r for (sz, n, _), r in runs.items() if sz == s and n == 2 * e]
            if len(short) == len(long) == seeds:
                v = verdicts[f"{s}px {e}->{2 * e}"] = verdict(short, long)
                lines.append(f"| {s} | {e} → {2 * e} | {v['d_acc']:+.4f} | {v['d_tpr3']:+.4f} "
                             f"({v['rel_tpr3']:.1%}) | {v['seed_spread_tpr3']:.4f} | "
                             f"{'yes' if v['converged'] else 'no'} |")
            else:
                lines.append(f"| {s} | {e} → {2 * e} | (incomplete) | | | |")
    return lines, verdicts


def committed_runs(root: Path) -> dict[tuple[int, int, int], dict]:
    """The committed sweep cells in ``root`` (``<results>/convergence``) by (size, epochs, seed)."""
    runs = {}
    for file in sorted(root.glob("*px-*ep-*.json")):
        if not file.name.endswith(".boot.json"):
            r = json.loads(file.read_text())
            runs[(r["input_size"], r["epochs"], r["seed"])] = r
    return runs
