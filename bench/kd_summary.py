"""The README's summary of a KD table, written from the same committed cells as the report.

``summary_block`` states per student, in numbers and in words, which method is best at LFW
all-pairs TPR@1e-4 and by how much, the share of the teacher - no-KD gap that EKD (authors),
EKD (ours) and the best method close, and which differences to no KD are real (every seed's 95%
paired identity-bootstrap interval on one side of 0, ``kd_significance.py``).
``update_readme`` puts it between the profile's markers in README.md, so the README's results
section is regenerated with the report and never quoted by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.kd_cells import CHANCE_ACC
from bench.kd_significance import significance

KEY = "lfw_tpr@1e-4"
NAMED = ("EKD (authors)", "EKD (ours)")


def at_chance(runs: list[dict]) -> str:
    """A sentence naming the runs whose LFW accuracy is at chance (a training that diverged; kept
    in the means, since dropping them would hide a method's instability), or ""."""
    bad = sorted((r["method"], r["seed"], r["metrics"]["lfw_acc"]) for r in runs
                 if r["metrics"]["lfw_acc"] < CHANCE_ACC)
    if not bad:
        return ""
    named = ", ".join(f"{m} seed {s} (LFW accuracy {a:.4f})" for m, s, a in bad)
    return (f"Trained to chance: {named} - the training diverged; the run stays in the means and "
            "intervals, a seed that fails is part of a method's result.")


def markers(profile: str) -> tuple[str, str]:
    return (f"<!-- kd_table:{profile} begin: written by bench/kd_table.py from its committed cells -->",
            f"<!-- kd_table:{profile} end -->")


def _gap(summary: dict, teacher: dict, method: str) -> float | None:
    base, t = summary["no KD"]["mean"][KEY], teacher[KEY]
    return None if t - base == 0 else (summary[method]["mean"][KEY] - base) / (t - base)


def _pct(g: float | None) -> str:
    return "n/a" if g is None else f"{100 * g:+.1f}%"


def _mean(s: dict, m: str = KEY) -> str:
    sd = s["std"][m]
    return f"{s['mean'][m]:.4f}" + ("" if sd is None else f" ± {sd:.4f}")


WITHIN_NOISE = "within noise"  # a difference not on one side for every seed


def _real(sig: dict, method: str, ref: str = "no KD") -> str:
    """``"better"`` / ``"worse"`` / ``"within noise"`` at TPR@1e-4 against ``ref`` (index 1 = 1e-4): the
    verdict words of ``ekd compare``."""
    marks = sig.get(method, {}).get("real", {}).get(ref, [])
    mark = marks[1] if len(marks) > 1 else ""
    return {"+": "better", "-": "worse"}.get(mark, WITHIN_NOISE)


def student_summary(label: str, summary: dict, teacher: dict, sig: dict) -> list[str]:
    """Table rows and sentences for one student (needs its no-KD row)."""
    base = summary["no KD"]
    others = sorted((m for m in summary if m != "no KD"), key=lambda m: -summary[m]["mean"][KEY])
    rows = [f"| {label} | {m} | {len(summary[m]['seeds'])} | {summary[m]['mean']['lfw_acc']:.4f} | "
            f"{_mean(summary[m])} | {'–' if m == 'no KD' else _pct(_gap(summary, teacher, m))} | "
            f"{'–' if m == 'no KD' else _real(sig, m)} |" for m in ["no KD", *others]]
    words = [f"**{label}** (teacher TPR@1e-4 {teacher[KEY]:.4f}, no KD {_mean(base)}, "
             f"{len(base['seeds'])} seed(s)):"]
    if others:
        best = others[0]
        if summary[best]["mean"][KEY] > base["mean"][KEY]:
            words.append(f"best at TPR@1e-4 is **{best}** ({_mean(summary[best])}, "
                         f"{_pct(_gap(summary, teacher, best))} of the gap; difference to no KD "
                         f"{_real(sig, best)}).")
        else:
            words.append(f"**no distiller beats no KD at TPR@1e-4**; the closest is {best} "
                         f"({_mean(summary[best])}, {_pct(_gap(summary, teacher, best))} of the gap).")
    named = [f"{m} closes {_pct(_gap(summary, teacher, m))}" for m in NAMED if m in summary]
    if named:
        words.append("; ".join(named) + ".")
    for kind in ("better", "worse"):
        ms = [m for m in others if _real(sig, m) == kind]
        if ms:
            words.append(f"Really {kind} than no KD at TPR@1e-4 (every seed's interval): {', '.join(ms)}.")
    if others and not any(_real(sig, m) != WITHIN_NOISE for m in others):
        words.append("No difference to no KD at TPR@1e-4 is real (every seed's interval contains 0).")
    acc = max(summary, key=lambda m: summary[m]["mean"]["lfw_acc"])
    if not others:
        words.append("no distilled row yet.")
        return rows, " ".join(words)
    words.append(f"Best LFW accuracy: {acc} ({summary[acc]['mean']['lfw_acc']:.4f}; no KD "
                 f"{base['mean']['lfw_acc']:.4f}).")
    return rows, " ".join(words)


def summary_block(profile: str, summaries: dict, teachers: dict, runs: list[dict], boots: dict,
                  labels: dict, missing: list[str], stage: list[str] | None = None) -> str:
    """The README block: one table over the students, then one paragraph per student.
    ``summaries``/``labels`` are keyed by (teacher, width); ``stage``: what a plan still waits
    for before its later cells are known (the table is then not complete)."""
    begin, end = markers(profile)
    head = (f"{len(runs)} cells committed" + (f", **{len(missing)} still to run** — the numbers below "
                                              f"are partial" if missing else ", table complete") + ".")
    if stage:
        head = (f"{len(runs)} cells committed, **{len(missing)} planned cells still to run and later cells "
                "not planned yet** — the numbers below are partial.")
    rows, paragraphs = [], []
    for key, summary in summaries.items():
        t, width = key
        if t not in teachers or "no KD" not in summary:
            continue
        own = [run for run in runs if run["teacher"] == t and run.get("width", 1.0) == width]
        r, w = student_summary(labels[key], summary, teachers[t], significance(own, boots))
        failed = at_chance(own)
        w = f"{w} {failed}" if failed else w
        rows += r
        paragraphs.append(w)
    lines = [begin, head, ""]
    if rows:
        lines += ["| student | method | seeds | LFW acc | TPR@1e-4 | gap closed @1e-4 | vs no KD @1e-4 |",
                  "|---|---|---|---|---|---|---|", *rows, ""]
        lines += [p + "\n" for p in paragraphs]
    lines.append(end)
    return "\n".join(lines)


def replace_block(readme: Path, begin: str, end: str, block: str) -> bool:
    """Replace the text from ``begin`` to ``end`` (markers included) in ``readme`` by ``block``;
    False (file untouched) when the file or its markers are missing."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: block, text, count=1))
    return True


def update_readme(readme: Path, profile: str, block: str) -> bool:
    """Replace the profile's block in ``readme``; False (file untouched) when it has no markers."""
    return replace_block(readme, *markers(profile), block)
