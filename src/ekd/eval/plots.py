"""ROC curves for reports: compact curve points and one PNG per evaluation set.

:func:`roc_points` reduces a score list (up to tens of millions of pairs) to a few hundred ROC
points at log-spaced FPRs without a full sort: for each target it takes the point with the
largest FPR not above it (the :func:`ekd.eval.metrics.tpr_at_fpr` rule) from one multi-pivot
``np.partition`` of the negatives. :func:`plot_roc` draws one curve per model on a log-FPR axis,
as InsightFace's IJB figures. matplotlib is optional (``pip install ekd[plot]``) and imported
only when a plot is drawn; the Agg canvas is used directly, so no GUI backend is touched.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ekd.errors import ConfigError, DataError

__all__ = ["roc_points", "plot_roc", "write_roc_plots"]


def roc_points(scores: np.ndarray, labels: np.ndarray, num: int = 300) -> dict[str, list[float]]:
    """About ``num`` ROC points ``{"fpr": [...], "tpr": [...]}`` with FPRs from ``1/n_neg`` to 1.

    Ties between negative scores may make a point's FPR slightly too high; this is for plots.
    """
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise DataError(f"scores and labels differ in shape: {s.shape} vs {y.shape}")
    neg, pos = s[~y], np.sort(s[y])
    n, n_pos = neg.size, pos.size
    if n == 0 or n_pos == 0:
        raise DataError(f"an ROC needs both classes ({n_pos} positives, {n} negatives)")
    ks = np.unique(np.clip(np.round(np.geomspace(1, n, num)).astype(np.int64), 1, n))
    ks = ks[ks < n]
    fpr, tpr = [0.0], [float(np.count_nonzero(pos > neg.max())) / n_pos]
    if ks.size:
        part = np.partition(neg, n - ks - 1)
        v = part[n - ks - 1]  # (k+1)-th largest negative: accept scores above it
        above = n_pos - np.searchsorted(pos, v, side="right")
        fpr += (ks / n).tolist()
        tpr += (above / n_pos).tolist()
    fpr.append(1.0)
    tpr.append(1.0)
    return {"fpr": fpr, "tpr": tpr}


def _pyplot_free_figure():  # noqa: ANN202 - matplotlib types are optional
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("ROC plots need matplotlib: pip install 'ekd[plot]'") from None
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_roc(curves: dict[str, dict[str, list[float]]], title: str, out_png: str | Path,
             xlim: tuple[float, float] | None = None, ylog: bool = False) -> Path:
    """One PNG: a curve per model (``{label: {"fpr": [...], "tpr": [...]}}``), log FPR axis
    (and log TPR axis with ``ylog``, for curves far apart). Past 10 curves the colours repeat
    with another line style; past 6 the legend goes beside the plot."""
    if not curves:
        raise DataError(f"no ROC curves to plot for {title!r}")
    fig = _pyplot_free_figure()
    ax = fig.add_subplot(1, 1, 1)
    low = 1.0
    for i, (label, c) in enumerate(curves.items()):
        f, t = np.asarray(c["fpr"], dtype=float), np.asarray(c["tpr"], dtype=float)
        keep = f > 0
        if keep.any():
            low = min(low, float(f[keep].min()))
        ax.plot(f[keep], t[keep], lw=1.5, label=label, linestyle=("-", "--", ":", "-.")[i // 10 % 4])
    ax.set_xscale("log")
    ax.set_xlim(*(xlim or (max(low, 1e-7), 1.0)))
    if ylog:
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 1.0)
    else:
        ax.set_ylim(0.0, 1.0)
    ax.grid(True, which="both", linestyle="--", linewidth=0.5)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(f"ROC: {title}")
    if len(curves) > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        ax.legend(loc="lower right", fontsize="small")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def write_roc_plots(results: dict[str, dict], out_dir: str | Path, key: str = "_roc") -> list[Path]:
    """``roc_<set>.png`` per evaluation set, one curve per model holding ``sets[set][key]``."""
    by_set: dict[str, dict[str, dict]] = {}
    for model, res in results.items():
        for set_name, metrics in res.get("sets", {}).items():
            if isinstance(metrics, dict) and metrics.get(key):
                by_set.setdefault(set_name, {})[model] = metrics[key]
    return [plot_roc(curves, name, Path(out_dir) / f"roc_{_slug(name)}.png")
            for name, curves in by_set.items()]
