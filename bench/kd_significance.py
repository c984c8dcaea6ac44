"""Significance of the KD table from the committed bootstrap samples (``<cell>.boot.json``).

Every cell's samples are its LFW all-pairs TPR at 1e-3/1e-4/1e-5 on the same 1,000 identity
resamples (``kd_cells.py``), so the paired difference of two cells is the per-resample
difference of their samples. A method's difference to a reference (no KD, EKD (authors)) of
the same student is **real** only when, for every seed the two share, the 95% interval of the
paired difference excludes 0, on the same side for all seeds.
"""

from __future__ import annotations

import numpy as np

from ekd.eval.bootstrap import interval as bootstrap_interval

LEVEL = 0.95
REFERENCES = ("no KD", "EKD (authors)")


def _valid(samples: np.ndarray) -> np.ndarray:
    """Samples with the unmeasurable (-1) entries as NaN."""
    s = np.asarray(samples, dtype=np.float64).copy()
    s[s < 0] = np.nan
    return s


def interval(values: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """``[F, 2]`` percentile interval of ``[R, F]`` values (NaN ignored; negative values are
    kept, as a paired difference has them: mask TPR samples with :func:`_valid` first); the
    one implementation of ``ekd compare`` (:func:`ekd.eval.bootstrap.interval`)."""
    return bootstrap_interval(np.asarray(values, dtype=np.float64), level)


def paired_interval(a: dict, b: dict, level: float = LEVEL) -> np.ndarray:
    """``[F, 2]`` interval of TPR(a) - TPR(b) over the shared resamples of two boot records."""
    if a["protocol"] != b["protocol"] or a["seed"] != b["seed"] or a["fprs"] != b["fprs"]:
        raise ValueError("paired difference of bootstrap samples drawn on different resamples")
    return interval(_valid(a["samples"]) - _valid(b["samples"]), level)


def verdict(intervals: list[np.ndarray]) -> list[str]:
    """Per FPR: ``"+"`` / ``"-"`` when every seed's interval lies above / below 0, else ``""``."""
    if not intervals:
        return []
    stack = np.stack(intervals)  # [seeds, F, 2]
    above = np.all(stack[:, :, 0] > 0, axis=0)
    below = np.all(stack[:, :, 1] < 0, axis=0)
    return ["+" if a else "-" if b else "" for a, b in zip(above, below)]


def significance(runs: list[dict], boots: dict[str, dict], references: tuple[str, ...] = REFERENCES) -> dict:
    """For one student's runs (records with ``name``, ``method``, ``seed``): per method, the per
    seed TPR intervals and, per reference row (default :data:`REFERENCES`), the per seed paired
    intervals and the verdict."""
    by = {(r["method"], r["seed"]): r["name"] for r in runs if r["name"] in boots}
    out: dict = {}
    for (method, seed), name in sorted(by.items()):
        row = out.setdefault(method, {"tpr": {}, "diff": {ref: {} for ref in references}})
        row["tpr"][seed] = interval(_valid(boots[name]["samples"])).tolist()
        for ref in references:
            ref_name = by.get((ref, seed))
            if ref_name is not None and ref != method:
                row["diff"][ref][seed] = paired_interval(boots[name], boots[ref_name]).tolist()
    for row in out.values():
        row["real"] = {ref: verdict([np.array(v) for v in row["diff"][ref].values()])
                       for ref in references}
    return out
