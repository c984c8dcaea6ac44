"""Convergence sweep of the no-KD MobileFaceNet, which fixes the ``cpu2`` schedule.

Cells: no-KD student (the cpu2 settings otherwise) at input size S in ``--sizes`` (default 32,
40, 48), ``E`` and ``2E`` epochs for every E in ``--epochs`` (default :data:`EPOCHS`; ``--epochs
12 24`` checks 12 -> 24 and 24 -> 48 with the 24-epoch cells shared), ``--seeds`` seeds
(default 2). Each is an ordinary KD-table cell (``kd_cells.py``): resumable, committed as JSON
under ``bench/results/kd_table/convergence/``; at the size and epochs finally chosen its hash is
that of the cpu2 no-KD cell.

Criterion (the issue's): the student is converged at ``E`` epochs when doubling them changes
the seed-mean LFW accuracy by < 0.01 **and** the seed-mean LFW all-pairs TPR@1e-3 by < 5%
relative or by less than the seed-to-seed spread (largest |seed a − seed b| at either length).
The evidence table (every run, the deltas, the verdict, minutes per cell) goes to
``docs/results/kd_convergence.md``, built from the committed files only.

Usage::

    python bench/kd_convergence.py                       # the sweep (hours on 2 cores)
    python bench/kd_convergence.py --sizes 32 --epochs 12 24   # the 32 px evidence, 12 / 24 / 48
    python bench/kd_convergence.py --smoke               # 1 cell, 32 px, 2 steps: the path
    python bench/kd_convergence.py --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kd_cells import RESULTS, common_arguments, run_and_report  # noqa: E402
from kd_profiles import CPU2, Cell  # noqa: E402
from kd_table import REPO, Table, smoke  # noqa: E402

EPOCHS = 12  # E of the sweep (E and 2E are run)
SIZES = (32, 40, 48)
ACC_TOL = 0.01
TPR_REL_TOL = 0.05


class Sweep:
    """The sweep's cells as one table for :func:`kd_cells.run_all`: ``(size, epochs, seed)``."""

    def __init__(self, faces: Path, cache: Path, results: Path, sizes: tuple[int, ...],
                 epochs: tuple[int, ...], seeds: int, base=CPU2) -> None:  # noqa: ANN001
        self.profile = dataclasses.replace(base, name="convergence", teachers=())
        self.doublings = sorted(set(epochs))  # each E is compared with 2E
        lengths = sorted({n for e in self.doublings for n in (e, 2 * e)})
        self.tables = {(s, e): Table(dataclasses.replace(self.profile, input_size=s, epochs=e),
                                     faces, cache, results)
                       for s in sizes for e in lengths}
        self.store = next(iter(self.tables.values())).store
        self.seeds = seeds

    def plan(self) -> list[tuple[int, int, int]]:
        return [(s, e, seed) for (s, e) in self.tables for seed in range(self.seeds)]

    def _cell(self, key: tuple[int, int, int]) -> tuple[Table, Cell]:
        s, e, seed = key
        return self.tables[(s, e)], Cell("T2", "no KD", seed)  # T2's 128-d embedding, no teacher

    def name(self, key: tuple[int, int, int]) -> str:
        table, cell = self._cell(key)
        return f"{key[0]}px-{key[1]}ep-{table.cell_name(cell)}"

    def result(self, key: tuple[int, int, int]) -> dict | None:
        return self.store.load(self.name(key))

    def pending(self) -> list[tuple[str, Path, dict]]:
        jobs = []
        for key in self.plan():
            if self.result(key) is None:
                table, cell = self._cell(key)
                meta = {"teacher": "none", "method": "no KD", "seed": cell.seed, "width": 1.0,
                        "input_size": key[0], "epochs": key[1]}
                name = self.name(key)
                jobs.append((name, table.cell_dir(cell).with_name(name),
                             table.spec(name, table.config_tree(cell), meta)))
        return jobs

    def write_cell(self, cell_dir: Path, spec: dict) -> None:
        next(iter(self.tables.values())).write_cell(cell_dir, spec)

    def prepare(self) -> None:
        for table in self.tables.values():
            table.prepare()


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


def report(sweep: Sweep, out: Path) -> Path:
    """``kd_convergence.md`` / ``.json`` from the committed cells."""
    runs = {k: r for k in sweep.plan() if (r := sweep.result(k)) is not None}
    evidence, verdicts = evidence_lines(runs, sweep.doublings, sweep.seeds, sorted({s for s, _ in sweep.tables}))
    lines = ["# Convergence of the no-KD MobileFaceNet (cpu2 schedule)", "", *evidence]
    compute = sum(r["train_seconds"] + r["eval_seconds"] for r in runs.values())
    lines += ["", f"{len(runs)} of {len(sweep.plan())} cells committed; {compute / 3600:.2f} h of cell time.", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_convergence.md").write_text("\n".join(lines))
    (out / "kd_convergence.json").write_text(json.dumps(
        {"verdicts": {str(k): v for k, v in verdicts.items()},
         "runs": [{"size": k[0], "epochs": k[1], "seed": k[2], "metrics": {m: v for m, v in r["metrics"].items()
                                                                             if not m.startswith("roc")},
                   "seconds": r["train_seconds"] + r["eval_seconds"]} for k, r in sorted(runs.items())]},
        indent=1))
    return out / "kd_convergence.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(ap, RESULTS)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--epochs", type=int, nargs="+", default=[EPOCHS],
                    help="E values (E and 2E are run for each)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="one 32 px cell of 2 steps, results in the cache")
    args = ap.parse_args(argv)
    base = CPU2
    if args.smoke:
        base, args.sizes, args.epochs, args.seeds = smoke(CPU2), [32], [1], 1
        args.results, args.out = args.cache / "smoke-results", args.cache / "smoke-report"
    sweep = Sweep(args.faces, args.cache, args.results, tuple(args.sizes), tuple(args.epochs),
                  args.seeds, base)
    if args.smoke:  # only E (not 2E): one cell proves the path
        sweep.tables = {k: v for k, v in sweep.tables.items() if k[1] == 1}
    return run_and_report(sweep, args.faces, args.jobs, args.budget, args.report_only,
                          lambda: report(sweep, args.out))

if __name__ == "__main__":
    sys.exit(main())
