"""The README's decision guide, rebuilt from the committed cells of the two teacher regimes.

- **cpu2 (T2)**: the teacher sees more than the student. T2 embeds a 150-px chip of the photo,
  the student a 32-px crop.
- **cpu3 (T3)**: the teacher sees what the student sees, the same network on the 32-px crop.

Per student capacity, this tells a user which method to pick. It gives, for EKD (authors), EKD
(ours), cosine, FitNet and the row with the best seed-mean TPR@1e-4:
- the share of the teacher-student gap each closes at LFW all-pairs TPR@1e-3, 1e-4 and 1e-5;
- its paired-interval verdict against no KD and against the better plain baseline (cosine or
  FitNet, whichever has the higher seed-mean TPR@1e-4).

A verdict is "better" or "worse" only when every shared seed's 95% interval (1,000 LFW identity
resamples) excludes 0 on that side (:mod:`bench.kd_significance`). It also draws one capacity
plot with both teachers.

    python -m bench.kd_guide [--readme README.md] [--out docs/results]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

from bench.kd_profiles import PROFILES, TEACHER_EMBEDDINGS, plan_stage
from bench.kd_report import (capacity, collect, gap_closed, plot_capacity, roc_name, student_parameters,
                             summarise)
from bench.kd_significance import significance
from bench.kd_summary import replace_block
from bench.kd_table import REPO, Table

#: (profile, teacher, what the regime means for a user)
REGIMES = (("cpu2", "T2", "the teacher sees more than the student (a 150-px chip of the photo against the "
                          "student's 32-px crop)"),
           ("cpu3", "T3", "the teacher sees what the student sees (the same 32-px crop)"))
FPRS = ("lfw_tpr@1e-3", "lfw_tpr@1e-4", "lfw_tpr@1e-5")
PLAIN = ("cosine", "fitnet")
EKD_ROWS = ("EKD (authors)", "EKD (ours)")
NAMED = (*EKD_ROWS, *PLAIN)
BEGIN = "<!-- kd_guide begin: written by bench/kd_guide.py from the committed cells of cpu2 and cpu3 -->"
END = "<!-- kd_guide end -->"
WORDS = {"+": "better", "-": "worse", "": "within noise"}


def _pct(g: float | None) -> str:
    return "n/a" if g is None else f"{100 * g:+.1f}%"


def _verdicts(sig: dict, method: str, ref: str) -> list[str]:
    marks = sig.get(method, {}).get("real", {}).get(ref, [])
    return [WORDS[m] for m in marks] if marks else ["n/a"] * len(FPRS)


def ranked(summary: dict) -> list[str]:
    """A student's distilled rows, best seed-mean TPR@1e-4 first."""
    return sorted((m for m in summary if m != "no KD"), key=lambda m: -summary[m]["mean"]["lfw_tpr@1e-4"])


def student_guide(label: str, summary: dict, teacher: dict, sig: dict, plain: str | None) -> tuple[list[str], str]:
    """The guide's rows and its advice for one (regime, student); ``summary`` has no KD."""
    gaps = gap_closed(summary, teacher)
    order = ranked(summary)
    shown = [m for m in NAMED if m in summary] + [m for m in order[:1] if m not in NAMED]
    rows = []
    for m in shown:
        vs_plain = "–" if plain is None or m == plain else _verdicts(sig, m, plain)[1]
        rows.append(f"| {label} | {m}{' (best)' if m == order[0] else ''} | {len(summary[m]['seeds'])} | "
                    + " | ".join(_pct(gaps[m][k]) for k in FPRS) + " | "
                    + " / ".join(_verdicts(sig, m, "no KD")) + f" | {vs_plain} |")
    ahead = [m for m in order if _verdicts(sig, m, "no KD")[1] == "better"]
    if ahead:
        pick = ahead[0]
        advice = (f"**{label}: pick {pick}**; it closes {_pct(gaps[pick]['lfw_tpr@1e-4'])} of the gap at "
                  f"TPR@1e-4, better than no KD on every seed.")
    elif order:
        advice = (f"**{label}: no distiller is really ahead of no KD at TPR@1e-4.** The best row, "
                  f"{order[0]}, closes {_pct(gaps[order[0]]['lfw_tpr@1e-4'])} "
                  f"({_verdicts(sig, order[0], 'no KD')[1]}).")
    else:
        advice = f"**{label}**: no distilled row yet."
    ekd = [m for m in EKD_ROWS if m in summary]
    if ekd and plain is not None:
        advice += " Against the better plain baseline (" + plain + ") at TPR@1e-4: " + "; ".join(
            f"{m} {_verdicts(sig, m, plain)[1]} ({_pct(gaps[m]['lfw_tpr@1e-4'])} vs "
            f"{_pct(gaps[plain]['lfw_tpr@1e-4'])})" for m in ekd) + "."
    return rows, advice


class Regime(NamedTuple):
    """One regime's part of the guide: table rows, advice per student, seed summaries per
    (teacher, width), the teachers' metrics, planned cells still missing, and per student the EKD
    rows' standing (:func:`ekd_standing`)."""
    rows: list[str]
    advice: list[str]
    summaries: dict
    teachers: dict
    missing: int
    ekd: list[dict]
    best: set[str]


def ekd_standing(sig: dict, label: str, summary: dict, plain: str | None) -> dict:
    """The EKD rows' TPR@1e-4 verdicts for one student: against no KD and the better plain baseline."""
    return {"student": label, "plain": plain,
            "verdicts": {m: (_verdicts(sig, m, "no KD")[1], _verdicts(sig, m, plain)[1] if plain else None)
                         for m in EKD_ROWS if m in summary}}


def standing_paragraph(standings: list[dict]) -> list[str]:
    """Where EKD stands, in plain words: per EKD row, in how many students (of both regimes) it is
    better / within noise / worse than no KD and than the better plain baseline at TPR@1e-4."""
    lines = ["**Where EKD stands against no KD and the plain baselines** (TPR@1e-4; better / worse: "
             "every seed's 95% paired interval on that side of 0):", ""]
    for method in EKD_ROWS:
        had = [s for s in standings if method in s["verdicts"]]
        if not had:
            continue
        parts = []
        for ref, index in (("no KD", 0), ("the better plain baseline", 1)):
            groups: dict[str, list[str]] = {}
            for s in had:
                verdict = s["verdicts"][method][index]
                if verdict is not None:
                    name = s["student"].split(" (")[0] + (f", vs {s['plain']}" if index else "")
                    groups.setdefault(verdict, []).append(name)
            counted = sum(len(v) for v in groups.values())
            said = ", ".join(f"{w} in {len(groups[w])} ({'; '.join(groups[w])})"
                             for w in ("better", "within noise", "worse", "n/a") if w in groups)
            students = f"{counted} student{'s' if counted != 1 else ''}"
            parts.append(f"against {ref} ({students}): {said}" if counted
                         else f"no {ref.removeprefix('the better ')} to compare with")
        lines.append(f"- {method}: " + "; ".join(parts) + ".")
    return lines + [""]


def plotted(points: dict[str, list[tuple[int, float]]], best: set[str]) -> dict[str, list[tuple[int, float]]]:
    """The capacity plot's series (``"method (teacher)"``): EKD, the plain baselines, and each
    student's best row (``best``, same naming), so that a user sees the pick beside EKD."""
    return {m: v for m, v in points.items() if m.rsplit(" (", 1)[0] in NAMED or m in best}


def roc_links(profile: str, teacher: str, widths: tuple[float, ...], out: Path) -> str:
    """Links to a regime's per-student ROC plots (written by ``bench.kd_table --report-only``)."""
    links = []
    for width in widths:
        png = out / roc_name(profile, teacher, width)
        if png.exists():
            links.append(f"[{'full' if width == 1.0 else f'×{width:g}'} width]({os.path.relpath(png, REPO)})")
    return f"ROC curves, LFW all-pairs, {teacher}: " + " · ".join(links) if links else ""


def regime_guide(table: Table, teacher: str) -> Regime:
    """Rows and advice of one regime per student, its summaries, teacher metrics and missing cells."""
    runs, teachers, missing = collect(table)
    boots = {r["name"]: b for r in runs if (b := table.store.load_boot(r["name"])) is not None}
    rows, advice, summaries, ekd, best = [], [], {}, [], set()
    if teacher not in teachers:
        return Regime(rows, advice, summaries, teachers, len(missing), ekd, best)
    for width in table.profile.students:
        summary = summarise(runs, teacher, width)
        if "no KD" not in summary:
            continue
        summaries[(teacher, width)] = summary
        own = [r for r in runs if r["teacher"] == teacher and r.get("width", 1.0) == width]
        present = [m for m in PLAIN if m in summary]
        plain = max(present, key=lambda m: summary[m]["mean"]["lfw_tpr@1e-4"]) if present else None
        sig = significance(own, boots, references=("no KD", plain) if plain else ("no KD",))
        params = student_parameters(width, 128 if teacher in TEACHER_EMBEDDINGS else 512, table.profile.input_size)
        label = f"{teacher}, {'full' if width == 1.0 else f'×{width:g}'} width ({params / 1e6:.2f} M)"
        r, a = student_guide(label, summary, teachers[teacher], sig, plain)
        rows += r
        advice.append(a)
        ekd.append(ekd_standing(sig, label, summary, plain))
        best |= {f"{m} ({teacher})" for m in ranked(summary)[:1]}
    return Regime(rows, advice, summaries, teachers, len(missing), ekd, best)


def guide(faces: Path, cache: Path, results: Path | None, out: Path) -> str:
    """The README block (markdown) and the capacity plot of both teachers in ``out``."""
    lines, points, params, standings, best = [BEGIN], {}, {}, [], set()
    for profile, teacher, meaning in REGIMES:
        table = Table(PROFILES[profile], faces, cache, results)
        rows, advice, summaries, teachers, missing, ekd, regime_best = regime_guide(table, teacher)
        standings += ekd
        best |= regime_best
        stage = plan_stage(table.profile, table.result)
        state = ("complete" if not missing and not stage else
                 f"**partial: {missing} planned cells still to run"
                 + (", later cells not planned yet" if stage else "") + "**")
        lines += ["", f"**{teacher}: {meaning}** (`--profile {profile}`, {state}).", ""]
        if rows:
            lines += ["| student | method | seeds | gap closed @1e-3 | @1e-4 | @1e-5 | vs no KD (1e-3 / 1e-4 / 1e-5) "
                      "| vs better plain baseline @1e-4 |", "|---|---|---|---|---|---|---|---|", *rows, ""]
        lines += [a + "\n" for a in advice]
        if roc := roc_links(profile, teacher, table.profile.students, out):
            lines += [roc, ""]
        for width in table.profile.students:
            params[width] = student_parameters(width, 128, table.profile.input_size)
        points.update(capacity(summaries, teachers, params))
    lines += standing_paragraph(standings) if standings else []
    out.mkdir(parents=True, exist_ok=True)
    png = plot_capacity(plotted(points, best), "gap closed at TPR@1e-4 vs capacity, both teachers",
                        out / "kd_guide_capacity.png", single_points=True, dashed=f"({REGIMES[0][1]})")
    if png is not None:
        lines.append(f"![gap closed vs capacity, both teachers]({os.path.relpath(png, REPO)})")
    lines.append(END)
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the guide's block in ``readme``; False (untouched) when it or its markers are missing."""
    return replace_block(readme, BEGIN, END, block)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "EKD_KD_TABLE_CACHE", Path.home() / ".cache" / "ekd" / "kd_table")))
    ap.add_argument("--results", type=Path, default=None, help="committed per-cell results")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = ap.parse_args(argv)
    block = guide(args.faces, args.cache, args.results, args.out)
    beside = os.path.relpath(args.out, REPO) + "/"  # the plots' links from the README; kd_guide.md is beside them
    (args.out / "kd_guide.md").write_text(block.replace(f"]({beside}", "](") + "\n")
    print(block)
    if not update_readme(args.readme, block):
        print(f"{args.readme}: no kd_guide markers, README left as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
