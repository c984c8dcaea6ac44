"""Report of the KD table, built only from the committed per-cell files (``kd_cells.py``): CSV
(one row per run), Markdown per student (mean ± std over seeds, the share of the teacher-student
gap closed, identity-bootstrap intervals and paired differences, ``kd_significance.py``), LFW
all-pairs ROC plots, a capacity plot (gap closed at TPR@1e-4 vs student parameters), how the
numbers were made, and the README's summary block (``kd_summary.py``).

Gap closed for metric m = (student_m - noKD_m) / (teacher_m - noKD_m), on seed means, with the
no-KD row of the same student.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from bench.kd_cells import CHANCE_ACC, adopted_clause, cell_seconds, environment, git, layout_summary
from bench.kd_convergence_criterion import committed_runs, evidence_lines
from bench.kd_profiles import TEACHER_EMBEDDINGS, gate_statement, plan_stage
from bench.kd_protocols import METRICS
from bench.kd_significance import REFERENCES, significance
from bench.kd_summary import at_chance, summary_block

LABELS = {"lfw_acc": "LFW acc", "lfw_tpr@1e-3": "TPR@1e-3", "lfw_tpr@1e-4": "TPR@1e-4",
          "lfw_tpr@1e-5": "TPR@1e-5", "cfp_ff_acc": "CFP-FF", "cfp_fp_acc": "CFP-FP"}
SMALL_GAP = 0.05  # teacher - no-KD differences below this make the "gap closed" share noise
TEACHER_NAMES = {"T1": "T1: IResNet-50 trained here (ArcFace)",
                 "T2": "T2: dlib ResNet-29 (pretrained, 128-d, embeddings only)",
                 "T3": "T3: the same dlib ResNet-29 on the crop as a 32-px student sees it (embeddings only)"}


def collect(table) -> tuple[list[dict], dict[str, dict], list[str]]:  # noqa: ANN001
    """Finished runs, committed teacher metrics per teacher, and the cells still missing."""
    runs, missing = [], []
    for cell in table.plan():
        r = table.result(cell)
        if r is None:
            missing.append(cell.slug)
        else:
            runs.append({"width": 1.0, "name": table.cell_name(cell), **r})
    teachers = {t: r["metrics"] for t, r in table.teachers().items()}
    return runs, teachers, missing


def student_parameters(width: float, embedding_size: int, input_size: int) -> int:
    """Parameters of the MobileFaceNet student at ``width``."""
    from ekd.models import build_backbone, count_parameters

    return count_parameters(build_backbone("mobilefacenet", embedding_size, input_size, width=width))


def summarise(runs: list[dict], teacher: str, width: float = 1.0) -> dict[str, dict]:
    """Per method: seeds, mean and std (ddof 1 when >= 2 seeds) of each metric, mean ROC."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        if r["teacher"] == teacher and r.get("width", 1.0) == width:
            by_method.setdefault(r["method"], []).append(r)
    out = {}
    for method, rs in by_method.items():
        values = {m: np.array([np.nan if r["metrics"][m] is None else r["metrics"][m] for r in rs])
                  for m in METRICS}
        roc = np.array([[np.nan if v is None else v for v in r["metrics"]["roc_tpr"]] for r in rs])
        out[method] = {"seeds": sorted(r["seed"] for r in rs),
                       "mean": {m: float(np.mean(v)) for m, v in values.items()},
                       "std": {m: float(np.std(v, ddof=1)) if len(v) > 1 else None for m, v in values.items()},
                       "roc_fpr": rs[0]["metrics"]["roc_fpr"], "roc_tpr": np.nanmean(roc, axis=0).tolist(),
                       "train_seconds": float(np.mean([r["train_seconds"] for r in rs]))}
    return out


def gap_closed(summary: dict[str, dict], teacher: dict) -> dict[str, dict[str, float | None]]:
    base = summary.get("no KD")
    if base is None:
        return {}
    out = {}
    for method, s in summary.items():
        row = {}
        for m in METRICS:
            gap = teacher[m] - base["mean"][m]
            row[m] = None if abs(gap) < 1e-9 else (s["mean"][m] - base["mean"][m]) / gap
        out[method] = row
    return out


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine paths in reports)."""
    repo = Path(__file__).resolve().parents[1]
    path = Path(path).resolve()
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else f"<results>/{path.name}"


def shown_command(command: list[str]) -> str:
    """``command`` as a report prints it: without ``--report-only``, a path inside the
    repository relative to it, one outside shown as its flag's name (``--cache CACHE``)."""
    repo = Path(__file__).resolve().parents[1]
    out: list[str] = []
    for word in command:
        if word == "--report-only":
            continue
        if out and out[-1].startswith("--") and Path(word).is_absolute():
            path = Path(word).resolve()
            word = (str(path.relative_to(repo)) if path.is_relative_to(repo)
                    else out[-1].lstrip("-").upper())
        out.append(word)
    return " ".join(out)


def _student_label(width: float, params: int) -> str:
    name = "MobileFaceNet" if width == 1.0 else f"MobileFaceNet ×{width:g} width"
    return f"{name} ({params / 1e6:.2f} M parameters)"


def _interval(iv: list[float]) -> str:
    return f"[{iv[0]:.4f}, {iv[1]:.4f}]"


def significance_lines(sig: dict, order: list[str]) -> list[str]:
    """Markdown: per method the per-seed 95% intervals of TPR@1e-3/1e-4/1e-5 and of the paired
    differences to the references; ✓ marks a real difference (every seed, same side)."""
    labels = ("1e-3", "1e-4", "1e-5")
    lines = ["95% identity-bootstrap intervals (1,000 resamples of LFW identities), per seed; "
             "paired difference = method − reference on the same seed and resamples. "
             "**✓+ / ✓−**: the difference is real (every seed's interval excludes 0 on that side).", "",
             "| method | seed | " + " | ".join(f"TPR@{x}" for x in labels) + " | "
             + " | ".join(f"− {ref} @{x}" for ref in REFERENCES for x in labels) + " |",
             "|---|---|" + "---|" * (3 + 3 * len(REFERENCES))]
    for method in order:
        row = sig.get(method)
        if row is None:
            continue
        for seed, tpr in sorted(row["tpr"].items()):
            diffs = []
            for ref in REFERENCES:
                d = row["diff"][ref].get(seed)
                diffs += ["–"] * 3 if d is None else [_interval(v) for v in d]
            lines.append(f"| {method} | {seed} | " + " | ".join(_interval(v) for v in tpr) + " | "
                         + " | ".join(diffs) + " |")
        marks = [f"{ref}: " + ", ".join(f"@{x} ✓{v}" for x, v in zip(labels, row["real"][ref]) if v)
                 for ref in REFERENCES if any(row["real"][ref])]
        if marks:
            lines.append(f"| {method} | real | " + "; ".join(marks) + " |" + " |" * (2 + 3 * len(REFERENCES)))
    return lines


def capacity(summaries: dict, teachers: dict, params: dict) -> dict[str, list[tuple[int, float]]]:
    """Per method: (student parameters, gap closed at TPR@1e-4) for every student it ran on."""
    out: dict[str, list[tuple[int, float]]] = {}
    for (t, width), summary in summaries.items():
        if t not in teachers:
            continue
        for method, g in gap_closed(summary, teachers[t]).items():
            if method != "no KD" and g["lfw_tpr@1e-4"] is not None:
                out.setdefault(f"{method} ({t})", []).append((params[width], g["lfw_tpr@1e-4"]))
    return {m: sorted(v) for m, v in out.items()}


def plot_capacity(points: dict[str, list[tuple[int, float]]], title: str, out_png: Path,
                  single_points: bool = False, dashed: str | None = None) -> Path | None:
    """Gap closed at TPR@1e-4 vs student parameters, one line per method on >= 2 students; with
    ``single_points`` a method run on one student only is drawn as a lone marker; series whose
    name ends with ``dashed`` are drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    lines = {m: v for m, v in points.items() if len(v) >= 2 or (single_points and v)}
    if not lines:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for i, (m, v) in enumerate(lines.items()):
        ax.plot([p for p, _ in v], [100 * g for _, g in v], marker="osD^vP*X"[i % 8], label=m,
                linestyle="--" if dashed and m.endswith(dashed) else "-")
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("student parameters")
    ax.set_ylabel("gap closed at TPR@1e-4 (%)")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle="--", linewidth=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return out_png


def markdown(table, runs: list[dict], teachers: dict, missing: list[str], wall: float,  # noqa: ANN001
             command: list[str], boots: dict | None = None, stage: list[str] | None = None) -> tuple[str, dict]:
    p = table.profile
    boots = boots or {}
    lines = [f"# KD table on real faces — {p.name.upper()} profile", ""]
    if missing:
        lines += [f"**Incomplete: {len(missing)} cell(s) not run yet** ({', '.join(missing)}).", ""]
    if stage:
        lines += ["**Later cells not planned yet** (`plan_v3`):", ""] + [f"- {s}" for s in stage] + [""]
    if p.drop:
        lines += [f"Left out to hold the compute budget (profile `drop`): {', '.join(p.drop)}.", ""]
    if gate := gate_statement(p, table.result):
        lines += [gate, ""]
    lines += [f"Students MobileFaceNet (width {', '.join(f'{w:g}' for w in p.students)}) at "
              f"{p.input_size}×{p.input_size}, {p.epochs} epochs of "
              f"{p.random_size} random + {p.identities_per_batch}×{p.samples_per_identity} balanced "
              f"images per step, {p.head['kind']} s={p.head['scale']:g} m={p.head['margin']:g} on the whole "
              f"batch, SGD lr {p.optim['lr']:g} (cosine, warm-up {p.optim['warmup_epochs']:g} epoch).",
              "Mean ± std (ddof 1) over seeds; LFW all-pairs TPR at FPR; CFP fold 10.", ""]
    summaries, params = {}, {}
    for t in p.teachers:
        emb = 128 if t in TEACHER_EMBEDDINGS else p.t1.get("embedding_size", 512)
        for width in p.students:
            params[width] = student_parameters(width, emb, p.input_size)
            summary = summarise(runs, t, width)
            summaries[(t, width)] = summary
            if t not in teachers or not summary:
                continue
            lines += student_section(table, t, width, params[width], summary, teachers[t],
                                     [r for r in runs if r["teacher"] == t and r.get("width", 1.0) == width],
                                     boots)
    points = capacity(summaries, teachers, params)
    if any(len(v) >= 2 for v in points.values()):
        lines += ["## Capacity", "", "Gap closed at TPR@1e-4 per student:", "",
                  "| method | " + " | ".join(f"{params[w] / 1e6:.2f} M" for w in p.students) + " |",
                  "|---|" + "---|" * len(p.students)]
        for m, v in points.items():
            by = dict(v)
            lines.append(f"| {m} | " + " | ".join(
                f"{100 * by[params[w]]:+.1f}%" if params[w] in by else "–" for w in p.students) + " |")
        lines += ["", f"![capacity](kd_table_{p.name}_capacity.png)", ""]
    lines += convergence_section(table)
    trained = [r for r in runs if "adopted_from" not in r]
    compute = sum(cell_seconds(r) for r in trained)
    dirty = git("status", "--porcelain", "--", "src", "bench", "configs")
    lines += ["## How these numbers were made", "",
              f"- Command: `{shown_command(command)}`"
              + (" (this report rewritten with `--report-only`)" if "--report-only" in command else ""),
              f"- Built from the committed cell files in `{_shown(table.store.root)}/`.",
              f"- Git commit: `{git('rev-parse', 'HEAD')}`"
              + (" (with uncommitted changes)" if dirty else ""),
              f"- Environment: `{json.dumps(environment())}`",
              f"- Compute: {compute / 3600:.2f} h of cell time (training + evaluation + bootstrap, summed "
              f"over the {len(trained)} runs trained for this table, {p.jobs} at a time × {p.threads} "
              f"thread(s){adopted_clause(runs)}); this invocation's wall time {wall / 3600:.2f} h "
              f"(committed cells are not rerun).", layout_summary(runs), ""]
    return "\n".join(lines), summaries


def convergence_section(table) -> list[str]:  # noqa: ANN001
    """The convergence evidence behind a v2 profile's schedule, from the committed sweep cells
    (``bench/kd_convergence.py``) at the profile's input size; [] when there are none."""
    p = table.profile
    runs = {k: r for k, r in committed_runs(table.store.root.parent / "convergence").items()
            if k[0] == p.input_size} if p.plan == "v2" else {}
    if not runs:
        return []
    lengths = {e for _, e, _ in runs}
    seeds = min(sum(1 for k in runs if k[1] == e) for e in lengths)
    evidence, verdicts = evidence_lines(runs, sorted(e for e in lengths if 2 * e in lengths), seeds)
    v = verdicts.get(f"{p.input_size}px {p.epochs}->{2 * p.epochs}")
    said = ("not measured" if v is None else "converged by the criterion" if v["converged"]
            else "**not** converged by the criterion")
    return ["## Convergence of the no-KD student", "",
            f"The schedule ({p.epochs} epochs at {p.input_size} px) is {said}: the no-KD MobileFaceNet "
            f"trained for E and 2E epochs, {seeds} seeds each (`python -m bench.kd_convergence`, "
            f"committed cells in `bench/results/kd_table/convergence/`; the {p.epochs}-epoch runs are "
            "this table's full-width no-KD cells).", "", *evidence, ""]


def student_section(table, t: str, width: float, params: int, summary: dict, tm: dict,  # noqa: ANN001
                    runs: list[dict], boots: dict) -> list[str]:
    """Tables of one (teacher, student): metrics, gap closed, bootstrap intervals, ROC plot."""
    lines = [f"## {TEACHER_NAMES[t]} → {_student_label(width, params)}", "",
             "| method | seeds | " + " | ".join(LABELS[m] for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS),
             "| teacher | – | " + " | ".join(f"{tm[m]:.4f}" for m in METRICS) + " |"]
    order = sorted(summary, key=lambda k: (k != "no KD", -summary[k]["mean"]["lfw_tpr@1e-4"]))
    for method in order:
        s = summary[method]
        lines.append(f"| {method} | {len(s['seeds'])} | "
                     + " | ".join(_cell(s["mean"][m], s["std"][m]) for m in METRICS) + " |")
    failed = at_chance(runs)
    lines += ["", failed or f"No run trained to chance (LFW accuracy below {CHANCE_ACC:g}): none diverged."]
    gaps = gap_closed(summary, tm)
    lines += ["", "Share of the teacher − no-KD gap closed ((student − no KD) / (teacher − no KD)):", ""]
    if not gaps:
        lines.append("(needs the no-KD row)")
    else:
        lines += ["| method | " + " | ".join(LABELS[m] for m in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
    for method in order if gaps else ():
        if method != "no KD":
            lines.append(f"| {method} | " + " | ".join(
                "n/a" if gaps[method][m] is None else f"{100 * gaps[method][m]:+.1f}%" for m in METRICS) + " |")
    small = [f"{LABELS[m]} ({tm[m] - summary['no KD']['mean'][m]:+.4f})" for m in METRICS
             if gaps and abs(tm[m] - summary["no KD"]["mean"][m]) < SMALL_GAP]
    if small:
        lines += ["", f"Gap below {SMALL_GAP}: {', '.join(small)}; there the share is dominated by "
                  "seed noise and means little."]
    sig = significance(runs, boots)
    if sig:
        lines += [""] + significance_lines(sig, order)
    lines += ["", f"![LFW all-pairs ROC]({roc_name(table.profile.name, t, width)})", ""]
    return lines


def roc_name(profile: str, teacher: str, width: float) -> str:
    """File name of one student's ROC plot (teacher and seed-mean curves) in the results folder."""
    w = "" if width == 1.0 else f"_w{width:g}"
    return f"kd_table_{profile}_{teacher.lower()}{w}_roc.png"


def write_report(table, out: Path, wall: float, command: list[str]) -> Path:  # noqa: ANN001
    from ekd.eval.plots import plot_roc

    out.mkdir(parents=True, exist_ok=True)
    runs, teachers, missing = collect(table)
    boots = {r["name"]: b for r in runs if (b := table.store.load_boot(r["name"])) is not None}
    name = f"kd_table_{table.profile.name}"
    with open(out / f"{name}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["teacher", "width", "method", "seed", *METRICS, "train_seconds"])
        for t, tm in teachers.items():
            w.writerow([t, "", "teacher", "", *(tm[m] for m in METRICS), ""])
        for r in sorted(runs, key=lambda r: (r["teacher"], -r["width"], r["method"], r["seed"])):
            w.writerow([r["teacher"], r["width"], r["method"], r["seed"], *(r["metrics"][m] for m in METRICS),
                        round(r["train_seconds"], 1)])
    stage = plan_stage(table.profile, table.result)
    text, summaries = markdown(table, runs, teachers, missing, wall, command, boots, stage)
    (out / f"{name}.md").write_text(text)
    params = {}
    for (t, width), summary in summaries.items():
        params[width] = student_parameters(width, 128 if t in TEACHER_EMBEDDINGS else table.profile.t1.get("embedding_size", 512),
                                           table.profile.input_size)
        if not summary or t not in teachers:
            continue
        curves = {"teacher": {"fpr": teachers[t]["roc_fpr"], "tpr": teachers[t]["roc_tpr"]}}
        for method, s in sorted(summary.items(), key=lambda kv: -kv[1]["mean"]["lfw_tpr@1e-4"]):
            curves[f"{method} ({len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''})"] = \
                {"fpr": s["roc_fpr"], "tpr": s["roc_tpr"]}
        plot_roc(curves, f"LFW all-pairs, teacher {t}, width {width:g}, {table.profile.name.upper()} profile",
                 out / roc_name(table.profile.name, t, width), xlim=(1e-6, 1.0), ylog=True)
    plot_capacity(capacity(summaries, teachers, params), f"{table.profile.name.upper()}: gap closed vs capacity",
                  out / f"{name}_capacity.png")
    labels = {key: f"{key[0]} → {_student_label(key[1], params[key[1]])}" for key in summaries}
    (out / f"{name}_summary.md").write_text(
        summary_block(table.profile.name, summaries, teachers, runs, boots, labels, missing, stage) + "\n")
    (out / f"{name}.json").write_text(json.dumps(
        {"teachers": teachers, "missing": missing,
         "summaries": {f"{t}/w{w:g}" if w != 1.0 else t: s for (t, w), s in summaries.items()}},
        indent=1, default=float))
    return out / f"{name}.md"
