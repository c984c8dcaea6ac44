"""The demo's comparison: a distilled student (EKD, or another method the demo trains) vs the
no-KD student over seeds, against the teacher.

Per metric: the mean over seeds of each student, the seed spread (the larger of the two
students' ranges, max - min over seeds), the share of the teacher - no-KD gap the method closes,
``(method - no KD) / (teacher - no KD)``, and a verdict: the difference of the means counts only
when it is larger than the seed spread, otherwise the table says "within noise".
Pure functions on numbers, so that the logic is tested on known values.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean
from typing import Sequence

from ekd.errors import EkdError

#: The demo's two evaluation sets (``ekd.commands.demo.eval_sets``).
PAIRS, ALL_PAIRS = "synthetic pairs", "synthetic all-pairs"

#: (label, evaluation set, metric key) of the comparison, in table order.
DEMO_METRICS: tuple[tuple[str, str, str], ...] = (
    ("pairs accuracy", PAIRS, "accuracy"),
    ("pairs TPR@FPR=1e-3", PAIRS, "tpr@1e-3"),
    ("all-pairs TPR@FPR=1e-3", ALL_PAIRS, "tpr@1e-3"),
    ("all-pairs TPR@FPR=1e-4", ALL_PAIRS, "tpr@1e-4"),
    ("all-pairs TPR@FPR=1e-5", ALL_PAIRS, "tpr@1e-5"),
)

BETTER, WORSE, NOISE = "EKD better", "EKD worse", "within noise"


@dataclass(frozen=True)
class MetricComparison:
    """One metric: the teacher's value and each student's value per seed; ``distilled`` holds the
    distilled student's values, whose method ``method`` names (EKD by default)."""

    metric: str
    teacher: float
    nokd: tuple[float, ...]
    distilled: tuple[float, ...]
    method: str = "EKD"

    @property
    def nokd_mean(self) -> float:
        return fmean(self.nokd)

    @property
    def distilled_mean(self) -> float:
        return fmean(self.distilled)

    @property
    def difference(self) -> float:
        """Mean of the distilled students minus mean no-KD."""
        return self.distilled_mean - self.nokd_mean

    @property
    def spread(self) -> float | None:
        """The larger seed range (max - min) of the two students; None with a single seed."""
        if len(self.nokd) < 2 or len(self.distilled) < 2:
            return None
        return max(max(self.nokd) - min(self.nokd), max(self.distilled) - min(self.distilled))

    @property
    def gap_closed(self) -> float | None:
        """``(method - no KD) / (teacher - no KD)``; None when the teacher is not above no-KD."""
        gap = self.teacher - self.nokd_mean
        return None if gap <= 0 else self.difference / gap

    @property
    def verdict(self) -> str:
        """``<method> better`` / ``<method> worse`` when the difference exceeds the seed spread, else
        ``within noise`` (also with one seed, where the noise is unknown)."""
        spread = self.spread
        if spread is None or abs(self.difference) <= spread:
            return NOISE
        return f"{self.method} {'better' if self.difference > 0 else 'worse'}"


def compare(metric: str, teacher: float, nokd: Sequence[float], distilled: Sequence[float],
            method: str = "EKD") -> MetricComparison:
    """Build one :class:`MetricComparison`; every value must be a number and each student
    needs at least one seed."""
    if not nokd or not distilled:
        raise EkdError(f"demo comparison of {metric}: each student needs at least one seed")
    values = [teacher, *nokd, *distilled]
    if any(v is None for v in values):
        raise EkdError(f"demo comparison of {metric}: a value is missing (n/a) in {values}")
    return MetricComparison(metric, float(teacher), tuple(map(float, nokd)), tuple(map(float, distilled)), method)


def comparisons_from_results(teacher: dict, nokd: Sequence[dict], distilled: Sequence[dict],
                             metrics: Sequence[tuple[str, str, str]] = DEMO_METRICS, method: str = "EKD"
                             ) -> tuple[list[MetricComparison], list[str]]:
    """Comparisons from :func:`ekd.commands.eval_report.evaluate_checkpoint` results (one per
    seed), and the labels of the metrics left out because some model has no value for them
    (a set with too few negative pairs for that FPR)."""
    rows, skipped = [], []
    for label, set_name, key in metrics:
        values = [r["sets"][set_name].get(key) for r in (teacher, *nokd, *distilled)]
        if any(v is None for v in values):
            skipped.append(label)
            continue
        rows.append(compare(label, values[0], values[1:1 + len(nokd)], values[1 + len(nokd):], method))
    return rows, skipped


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.0f}%"


def comparison_table(rows: Sequence[MetricComparison]) -> str:
    """Markdown: teacher, mean of each student, seed spread, gap closed and the verdict."""
    seeds = min(min(len(r.nokd), len(r.distilled)) for r in rows)
    method = rows[0].method if rows else "EKD"
    lines = [f"| metric | teacher | no KD (mean of {seeds}) | {method} (mean of {seeds}) | {method} − no KD | "
             "seed spread | gap closed | verdict |", "|" + "---|" * 8]
    for r in rows:
        spread = "n/a" if r.spread is None else f"{r.spread:.4f}"
        lines.append(f"| {r.metric} | {r.teacher:.4f} | {r.nokd_mean:.4f} | {r.distilled_mean:.4f} | "
                     f"{r.difference:+.4f} | {spread} | {_pct(r.gap_closed)} | {r.verdict} |")
    return "\n".join(lines)


def summary(rows: Sequence[MetricComparison]) -> str:
    """One plain sentence on what the comparison shows."""
    method = rows[0].method if rows else "EKD"
    better = [r.metric for r in rows if r.verdict == f"{method} better"]
    worse = [r.metric for r in rows if r.verdict == f"{method} worse"]
    parts = []
    if better:
        parts.append(f"{method} beats no KD by more than the seed spread on " + ", ".join(better))
    if worse:
        parts.append(f"{method} is worse than no KD by more than the seed spread on " + ", ".join(worse))
    noise = [r.metric for r in rows if r.verdict == NOISE]
    if noise:
        parts.append(("the difference is within seed noise on " if parts else
                      f"The difference between {method} and no KD is within seed noise on every metric: ")
                     + ", ".join(noise))
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]
