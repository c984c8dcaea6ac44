"""Convergence sweep of the no-KD MobileFaceNet, which fixes the ``cpu2`` schedule.

Cells: no-KD student (the cpu2 settings otherwise) at input size S in ``--sizes`` (default 32,
40, 48), ``E`` and ``2E`` epochs for every E in ``--epochs`` (default :data:`EPOCHS`; ``--epochs
12 24`` checks 12 -> 24 and 24 -> 48 with the 24-epoch cells shared), ``--seeds`` seeds
(default 2). Each is an ordinary KD-table cell (``kd_cells.py``): resumable, committed as JSON
under ``bench/results/kd_table/convergence/``; at the size and epochs finally chosen its hash is
that of the cpu2 no-KD cell.

Criterion: ``kd_convergence_criterion.py`` (doubling the epochs changes the seed-mean LFW
accuracy by < 0.01 and the seed-mean LFW all-pairs TPR@1e-3 by < 5% relative or by less than the
seed-to-seed spread). The evidence table (every run, the deltas, the verdict, minutes per cell) goes to
``docs/results/kd_convergence.md``, built from the committed files only.

Usage::

    python -m bench.kd_convergence                       # the sweep (hours on 2 cores)
    python -m bench.kd_convergence --sizes 32 --epochs 12 24   # the 32 px evidence, 12 / 24 / 48
    python -m bench.kd_convergence --smoke               # 1 cell, 32 px, 2 steps: the path
    python -m bench.kd_convergence --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from bench.kd_cells import RESULTS, common_arguments, run_and_report
from bench.kd_convergence_criterion import evidence_lines
from bench.kd_profiles import CPU2, Cell
from bench.kd_table import Table, smoke

EPOCHS = 12  # E of the sweep (E and 2E are run)
SIZES = (32, 40, 48)


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
