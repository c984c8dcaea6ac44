"""Report of the KD table: CSV (one row per run), Markdown (mean ± std over seeds and the share
of the teacher-student gap closed), LFW all-pairs ROC plots and how the numbers were made.

Gap closed for metric m = (student_m - noKD_m) / (teacher_m - noKD_m), on seed means.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from kd_table_eval import METRICS, evaluate_teacher_npz, load_protocols

LABELS = {"lfw_acc": "LFW acc", "lfw_tpr@1e-3": "TPR@1e-3", "lfw_tpr@1e-4": "TPR@1e-4",
          "lfw_tpr@1e-5": "TPR@1e-5", "cfp_ff_acc": "CFP-FF", "cfp_fp_acc": "CFP-FP"}
SMALL_GAP = 0.05  # teacher - no-KD differences below this make the "gap closed" share noise
TEACHER_NAMES = {"T1": "T1: IResNet-50 trained here (ArcFace)",
                 "T2": "T2: dlib ResNet-29 (pretrained, 128-d, embeddings only)"}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def collect(table) -> tuple[list[dict], dict[str, dict], list[str]]:  # noqa: ANN001
    """Finished runs, teacher metrics per teacher, and the names of cells still missing."""
    runs, missing = [], []
    for cell in table.plan():
        r = table.result(cell)
        if r is None:
            missing.append(cell.slug)
        else:
            runs.append(r)
    teachers = {}
    for t in table.profile.teachers:
        if t == "T2":
            teachers[t] = evaluate_teacher_npz(load_protocols(table.faces), table.faces)
        else:
            f = table.t1_dir() / "result.json"
            if f.is_file():
                teachers[t] = json.loads(f.read_text())["metrics"]
    return runs, teachers, missing


def summarise(runs: list[dict], teacher: str) -> dict[str, dict]:
    """Per method: seeds, mean and std (ddof 1 when >= 2 seeds) of each metric, mean ROC."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        if r["teacher"] == teacher:
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


def markdown(table, runs: list[dict], teachers: dict, missing: list[str], wall: float,  # noqa: ANN001
             command: list[str]) -> tuple[str, dict]:
    p = table.profile
    lines = [f"# KD table on real faces — {p.name.upper()} profile", ""]
    if missing:
        lines += [f"**Incomplete: {len(missing)} cell(s) not run yet** ({', '.join(missing)}).", ""]
    lines += [f"Student MobileFaceNet at {p.input_size}×{p.input_size}, {p.epochs} epochs of "
              f"{p.random_size} random + {p.identities_per_batch}×{p.samples_per_identity} balanced "
              f"images per step, {p.head['kind']} s={p.head['scale']:g} m={p.head['margin']:g} on the whole "
              f"batch, SGD lr {p.optim['lr']:g} (cosine, warm-up {p.optim['warmup_epochs']:g} epoch).",
              "Mean ± std (ddof 1) over seeds; LFW all-pairs TPR at FPR; CFP fold 10.", ""]
    summaries = {}
    for t in p.teachers:
        summary = summarise(runs, t)
        summaries[t] = summary
        if t not in teachers:
            continue
        tm = teachers[t]
        lines += [f"## {TEACHER_NAMES[t]}", "",
                  "| method | seeds | " + " | ".join(LABELS[m] for m in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS),
                  "| teacher | – | " + " | ".join(f"{tm[m]:.4f}" for m in METRICS) + " |"]
        order = sorted(summary, key=lambda k: (k != "no KD", -summary[k]["mean"]["lfw_tpr@1e-4"]))
        for method in order:
            s = summary[method]
            lines.append(f"| {method} | {len(s['seeds'])} | "
                         + " | ".join(_cell(s["mean"][m], s["std"][m]) for m in METRICS) + " |")
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
        lines += ["", f"![LFW all-pairs ROC](kd_table_{p.name}_{t.lower()}_roc.png)", ""]
    compute = sum(r["train_seconds"] + r["eval_seconds"] for r in runs)
    lines += ["## How these numbers were made", "",
              f"- Command: `{' '.join(c for c in command if c != '--report-only')}`"
              + (" (this report rewritten with `--report-only`)" if "--report-only" in command else ""),
              f"- Git commit: `{_git('rev-parse', 'HEAD')}`"
              + (" (with uncommitted changes)" if _git("status", "--porcelain", "--", "src", "bench", "configs") else ""),
              f"- Environment: `{json.dumps(environment())}`",
              f"- Compute: {compute / 3600:.2f} h of cell time (training + evaluation, summed over "
              f"{len(runs)} runs, {p.jobs} at a time × {p.threads} thread(s)); this invocation's wall "
              f"time {wall / 3600:.2f} h (cells already cached are not rerun).", ""]
    return "\n".join(lines), summaries


def write_report(table, out: Path, wall: float, command: list[str]) -> Path:  # noqa: ANN001
    from ekd.eval.plots import plot_roc

    out.mkdir(parents=True, exist_ok=True)
    runs, teachers, missing = collect(table)
    name = f"kd_table_{table.profile.name}"
    with open(out / f"{name}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["teacher", "method", "seed", *METRICS, "train_seconds"])
        for t, tm in teachers.items():
            w.writerow([t, "teacher", "", *(tm[m] for m in METRICS), ""])
        for r in sorted(runs, key=lambda r: (r["teacher"], r["method"], r["seed"])):
            w.writerow([r["teacher"], r["method"], r["seed"], *(r["metrics"][m] for m in METRICS),
                        round(r["train_seconds"], 1)])
    text, summaries = markdown(table, runs, teachers, missing, wall, command)
    (out / f"{name}.md").write_text(text)
    for t, summary in summaries.items():
        if not summary or t not in teachers:
            continue
        curves = {"teacher": {"fpr": teachers[t]["roc_fpr"], "tpr": teachers[t]["roc_tpr"]}}
        for method, s in sorted(summary.items(), key=lambda kv: -kv[1]["mean"]["lfw_tpr@1e-4"]):
            curves[f"{method} ({len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''})"] = \
                {"fpr": s["roc_fpr"], "tpr": s["roc_tpr"]}
        plot_roc(curves, f"LFW all-pairs, teacher {t}, {table.profile.name.upper()} profile",
                 out / f"{name}_{t.lower()}_roc.png", xlim=(1e-6, 1.0), ylog=True)
    (out / f"{name}.json").write_text(json.dumps({"teachers": teachers, "summaries": summaries,
                                                  "missing": missing}, indent=1, default=float))
    return out / f"{name}.md"
