"""The cpu3 table's settings, chosen on the validation split of the training identities under T3.

The teacher T3 (``teacher_dlib_r29_view32``) sees each crop as the 32-px student does, so what it
knows is carried by the student's input. Before the table spends its budget, each setting a
method could lose for is chosen here, on the split of ``bench/ekd_ablation.py`` (10% of the
training identities held out; never LFW or CFP), with the half-width student and the cpu2
schedule:

1. **Feature baselines** (cosine, FitNet): one seed at each weight of
   :data:`kd_choices.WEIGHT_GRID` (1 / 10 / 100), extended x10 while the best weight is the largest
   tried; :func:`kd_choices.choose_weight` picks the weight.
2. **EKD (ours)**: EKD (authors), EKD (ours) and the variants that helped under T2, plus the
   preset's weight on the same grid, 2 seeds each; :func:`kd_choices.choose_preset` (the rule of
   the T2 ablation) picks the preset.

No-KD cells are the T2 ablation's (a no-KD cell has no teacher: same config, same hash; adopted
with ``adopted_from``). Committed cells: ``bench/results/kd_tuning/cpu3/``; report:
``docs/results/kd_tuning_cpu3.md``. The cpu3 table (``bench/kd_table.py --profile cpu3``) reads
the choices from the committed cells.

    python -m bench.kd_tuning [--phase grid|preset|all] [--budget S] [--jobs 2] [--profile cpu3]
    python -m bench.kd_tuning --smoke          # 2 steps per cell: the path
    python -m bench.kd_tuning --report-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.ekd_ablation import ROWS as ABLATION_ROWS
from bench.ekd_ablation import WIDTH, Ablation, collect_rows, compute_lines, rows_section
from bench.kd_cells import CellStore, common_arguments, run_and_report
from bench.kd_choices import (FEATURE_BASELINES, PRESET_BASE, PRESET_ROWS, PRESET_SEEDS,
                              PRESET_VARIANTS, WEIGHT_GRID, choose_preset, choose_weight, grid_records,
                              preset_weight_row, tuned_settings, tuning_records, weight_row)
from bench.kd_profiles import CPU3, PROFILES, Cell, auto_weighted
from bench.kd_table import REPO, smoke

RESULTS = REPO / "bench" / "results" / "kd_tuning"
TEACHER = "T3"


def auto_row(method: str) -> str:
    return f"{method} auto"


def feature_row(method: str, weight: float) -> list[dict]:
    return [{"name": method, "weight": float(weight), "params": {}}]


def row_configs(extra_weights: dict[str, list[float]] | None = None,
                auto_share: float | None = None) -> dict[str, list[dict] | None]:
    """Every tuning row: name -> ``distill`` section (None = no KD). ``extra_weights``: weights
    past the grid that :func:`kd_choices.choose_weight` asked for, by method; ``auto_share``: the
    weight-auto rows' target share (None: the library default)."""
    rows: dict[str, list[dict] | None] = {"no KD": None}
    for method in FEATURE_BASELINES:
        for w in (*WEIGHT_GRID, *(extra_weights or {}).get(method, [])):
            rows[weight_row(method, w)] = feature_row(method, w)
    for method in FEATURE_BASELINES:  # does weight auto land where the grid's choice does?
        rows[auto_row(method)] = auto_weighted(feature_row(method, 1.0), auto_share)
    for name in PRESET_VARIANTS:
        rows[name] = ABLATION_ROWS[name]
    for w in WEIGHT_GRID[1:]:
        rows[preset_weight_row(w)] = [{**ABLATION_ROWS[PRESET_BASE][0], "weight": w}]
    return rows


class Tuning(Ablation):
    """The tuning cells under T3 as a table for :func:`kd_cells.run_all`; planned by phase."""

    def __init__(self, faces: Path, cache: Path, results: Path, phases: tuple[str, ...], profile=CPU3) -> None:  # noqa: ANN001
        super().__init__(profile, faces, cache, results, [], PRESET_SEEDS, teacher=TEACHER,
                         row_configs=row_configs(auto_share=profile.auto_target_share))
        self.store = CellStore(results / profile.name)
        self.phases = phases

    def extra_weights(self) -> dict[str, list[float]]:
        """Weights past the grid that the weight rule asks for (grown one x10 step at a time)."""
        records = self.store_records()
        out: dict[str, list[float]] = {}
        for method in FEATURE_BASELINES:
            by_weight = grid_records(records, method)
            tried = [w for w in by_weight if w not in WEIGHT_GRID]
            _, nxt, _ = choose_weight(by_weight)
            out[method] = sorted(set(tried) | ({nxt} if nxt else set()))
        return out

    def store_records(self) -> list[dict]:
        return tuning_records(self.store.root)

    def plan(self) -> list[Cell]:  # type: ignore[override]
        self.row_configs = row_configs(self.extra_weights(), self.profile.auto_target_share)
        grid = [r for r in self.row_configs if r.split(" x")[0] in FEATURE_BASELINES]
        grid += [auto_row(m) for m in FEATURE_BASELINES]  # after the fixed weights
        cells = [Cell(TEACHER, "no KD", s, WIDTH) for s in range(PRESET_SEEDS)]
        if "grid" in self.phases:
            cells += [Cell(TEACHER, r, 0, WIDTH) for r in grid]
        if "preset" in self.phases:
            cells += [Cell(TEACHER, r, s, WIDTH) for s in range(PRESET_SEEDS) for r in PRESET_ROWS]
        self.rows = list(dict.fromkeys(c.method for c in cells))
        return cells

    def prepare(self) -> None:
        super().prepare()
        self.adopt_no_kd()

    def adopt_no_kd(self, source_profile: str = "ablation-cpu2") -> list[str]:
        """Commit the T2 ablation's no-KD cells as this table's (same config and hash: a no-KD
        cell has no teacher); returns the names written."""
        return self._adopt_no_kd(self.store.root.parent.parent, f"ekd_ablation/{source_profile}",
                                 lambda name: name.replace(f"{TEACHER}-", "T2-", 1))


def report(table: Tuning, out: Path) -> Path:
    """``kd_tuning_cpu3.md``: every row (validation split), then each rule's choice and why."""
    table.plan()
    rows = collect_rows(table)
    view = ("centred, `teacher.center: train_mean`" if table.profile.teacher_center != "none"
            else "as stored")
    lines = rows_section(table, rows, f"{table.profile.name.removeprefix('ablation-')} settings chosen on the "
                         f"validation split (teacher T3, {view})", "bench/kd_tuning.py")
    settings, reasons = tuned_settings(table.store_records(), PRESET_ROWS, PRESET_SEEDS)
    lines += ["", "## What the rules chose (`bench/kd_choices.py`, fixed before the cells finished)", ""]
    for method in (*FEATURE_BASELINES, "EKD (ours)"):
        chosen = settings.get(method)
        lines.append(f"- **{method}**: " + (f"`{json.dumps(chosen)}`" if chosen else "not chosen yet"))
    lines += [""] + [f"- {r}" for r in reasons]
    lines += ["", "## Does `weight: auto` land where the grid's choice does?", ""]
    for method in FEATURE_BASELINES:
        auto = rows.get(auto_row(method)) or []
        fixed = [e["weight"] for r in auto for e in r.get("auto_weights", [])]
        chosen = settings.get(method)
        if not auto:
            lines.append(f"- {method}: the auto cell is not in yet")
            continue
        m = auto[0]["metrics"]
        lines.append(f"- {method}: auto fixed weight {', '.join(f'{w:.3g}' for w in fixed) or 'n/a'} "
                     f"(target share {auto[0]['config']['distill'][0]['target_share']:g}), validation "
                     f"TPR@1e-3 {m['val_tpr@1e-3']:.4f}, TPR@1e-4 {m['val_tpr@1e-4']:.4f}; the grid chose "
                     + (f"x{chosen[0]['weight']:g}" if chosen else "nothing yet"))
    preset_rows = {r: rows.get(r, []) for r in PRESET_ROWS}
    if all(len(v) >= PRESET_SEEDS for v in preset_rows.values()):
        lines.append(f"- EKD preset row: {choose_preset(preset_rows, PRESET_SEEDS)[0]}")
    lines += [""] + compute_lines(table, rows) + [""]
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"kd_tuning_{table.profile.name.removeprefix('ablation-')}.md"
    file.write_text("\n".join(lines))
    return file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(ap, RESULTS)
    ap.add_argument("--phase", choices=("grid", "preset", "all"), default="all",
                    help="grid: the feature baselines' weights; preset: the EKD rows; all: both")
    ap.add_argument("--smoke", action="store_true", help="2 steps per cell, results in the cache")
    ap.add_argument("--profile", choices=[p for p in PROFILES if p.startswith("cpu3")], default="cpu3",
                    help="cpu3: T3 centred (the table's teacher); cpu3-uncentred: the first grid, T3 as stored")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.smoke:
        profile = smoke(profile)
        args.results, args.out = args.cache / "smoke-results", args.cache / "smoke-report"
    phases = ("grid", "preset") if args.phase == "all" else (args.phase,)
    table = Tuning(args.faces, args.cache, args.results, phases, profile)
    return run_and_report(table, args.faces, args.jobs, args.budget, args.report_only,
                          lambda: report(table, args.out))


if __name__ == "__main__":
    sys.exit(main())
