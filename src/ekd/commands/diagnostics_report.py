"""``ekd diagnose RUN_DIR``: what the distillation terms of a run did, in words and plots.

Reads the diagnostics rows of ``RUN_DIR/metrics.jsonl`` (:mod:`ekd.engine.diagnostics`) and
checks, over the last half of the logged steps (the first half is warm-up):

- every term's gradient share of the margin softmax's: a term that sends **no** gradient (weight
  0, or a loss that does not depend on the student) and one below :data:`WEAK_SHARE` ("its
  weight is too small for this batch") are named, with the weight that would give it a tenth
  of the CE gradient;
- EKD's anchors: not warmed up (without ``bias_correction`` the thresholds' EMA, which starts at 0,
  holds ``1 - (1 - momentum)^n`` of its target after ``n`` steps; below :data:`WARM_FRACTION` the
  anchors say nothing yet about the thresholds, and their distance to them is not reported),
  still at their initial 0 (the EMA has not moved), collapsed onto one value
  (the batch holds fewer than ``1/FPR`` negatives, so the deeper anchors are all its hardest
  negative), or away from the threshold the evaluation uses at that FPR on the validation set
  (by more than :data:`ANCHOR_TOL`);
- EKD's active bands: the share of distilled pairs within ``5T`` of an anchor, where the
  sigmoid step has a slope; below :data:`FLAT_SHARE` that term is nearly flat.

Plots (with ``matplotlib``): ``anchors.png`` (anchor tracks per FPR, student and teacher, with
the validation thresholds) and ``gradients.png`` (gradient shares over steps).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ekd.errors import DataError

WEAK_SHARE = 0.01  # a term below 1% of the CE gradient hardly moves the student
TARGET_SHARE = 0.10  # the share the suggested weight aims at
ANCHOR_TOL = 0.10  # cosine units between an anchor and the evaluation threshold
FLAT_SHARE = 0.05  # share of pairs in an active band below which a term is nearly flat
SCALE_RATIO = 2.0  # student and teacher anchor spans further apart than this factor
CONE = 0.8  # a student anchor at the highest FPR above this: its negatives are nearly parallel
AGAINST_SHARE = 0.3  # share of a term's squared rank error that pulls pairs the wrong way
WARM_FRACTION = 0.95  # share of its target an EMA anchor must hold before it is judged
_ANCHOR = re.compile(r"^(?P<d>[a-z_0-9]+)/anchor_(?P<who>student|teacher)@(?P<fpr>[0-9e.\-]+)$")


@dataclass
class Diagnosis:
    """What :func:`diagnose` found: the summary lines, the warnings, the plots written."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    def text(self) -> str:
        out = list(self.lines)
        out += ["", "What looks wrong:" if self.warnings else "Nothing looks wrong."]
        out += [f"- {w}" for w in self.warnings]
        out += [f"plot: {p}" for p in self.plots]
        return "\n".join(out)


def read_rows(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """Step rows with diagnostics, validation rows, and the run's config (``config.yaml``)."""
    file = run_dir / "metrics.jsonl"
    if not file.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (not an ekd run directory)")
    steps, vals = [], []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{file}: line {n} is not JSON") from None
        if row.get("val"):
            vals.append(row)
        elif "epoch_end" not in row and any(k.startswith("grad/") for k in row):
            steps.append(row)
    cfg: dict = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return steps, vals, cfg


def _late(rows: list[dict], key: str) -> list[float]:
    values = [r[key] for r in rows[len(rows) // 2:] if isinstance(r.get(key), (int, float))]
    return [v for v in values if math.isfinite(v)]


def _fmt_share(v: float) -> str:
    return "0" if v == 0 else f"{v:.2%}" if v >= 1e-4 else f"{v:.1e}"


def _term_weights(cfg: dict) -> dict[str, float]:
    """Configured weight of each distiller's terms by term-name prefix (``ekd`` -> ``ekd_pos``)."""
    out = {}
    for d in cfg.get("distill") or []:
        if isinstance(d, dict) and "name" in d:
            out[d["name"]] = float(d.get("weight", 1.0))
    return out


def _distill_params(cfg: dict) -> dict[str, dict]:
    """Each configured distiller's ``params`` by name."""
    return {d["name"]: d.get("params") or {} for d in cfg.get("distill") or []
            if isinstance(d, dict) and "name" in d}


def cold_anchors(steps: list[dict], cfg: dict) -> dict[str, tuple[float, int, float]]:
    """``{distiller: (warm share, steps, momentum)}`` for EKD-style distillers whose threshold EMA
    (no ``bias_correction``, starting at 0) holds less than :data:`WARM_FRACTION` of its target
    at the last logged step: ``1 - (1 - momentum)^steps``."""
    params, n = _distill_params(cfg), int(steps[-1].get("step") or len(steps))
    out = {}
    for name in _anchor_keys(steps):
        own = params.get(name, {})
        if own.get("bias_correction"):
            continue
        m = float(own.get("momentum", 0.01))
        warm = 1.0 - (1.0 - m) ** n
        if warm < WARM_FRACTION:
            out[name] = (warm, n, m)
    return out


def _cold_note(name: str, cold: tuple[float, int, float]) -> str:
    warm, n, m = cold
    needed = math.ceil(math.log(1 - WARM_FRACTION) / math.log(1 - m)) if m < 1 else 1
    return (f"{name}: the anchors are not warmed up: after {n} step(s) the thresholds' EMA "
            f"(momentum {m:g}, starting at 0) holds 1 - (1 - {m:g})^{n} = {warm:.1%} of its target, "
            f"so every anchor is about {warm:.0%} of the threshold it tracks and says nothing yet "
            f"about the evaluation thresholds or the weights: train at least {needed} steps (to "
            f"{WARM_FRACTION:.0%}), use a larger momentum, or set bias_correction: true")


def check_gradients(steps: list[dict], cfg: dict, dx: Diagnosis) -> None:
    terms = sorted({k[len("grad/"):] for r in steps for k in r if k.startswith("grad/")})
    weights = _term_weights(cfg)
    cold = cold_anchors(steps, cfg)
    dx.lines += ["", "Gradient into the student embedding, median over the last half of the logged steps:",
                 "| term | gradient norm | share of the CE's |", "|---|---|---|"]
    for term in terms:
        norms = _late(steps, f"grad/{term}")
        if not norms:
            continue
        norm = statistics.median(norms)
        shares = _late(steps, f"grad_share/{term}")
        share = statistics.median(shares) if shares else None
        dx.lines.append(f"| {term} | {norm:.4g} | {'—' if share is None else _fmt_share(share)} |")
        if term == "ce":
            continue
        if max(norms) == 0.0:
            dx.warnings.append(f"{term} sends no gradient to the student (its weight is 0, or the term "
                               "does not depend on the student's embedding): it has no effect on training")
        elif share is not None and share < WEAK_SHARE:
            owner = next((n for n in weights if term == n or term.startswith(n + "_")), None)
            hint = ""
            if owner in cold:
                hint = (f"; its anchors are not warmed up yet ({cold[owner][0]:.0%} of their "
                        "targets), so judge its weight on a longer run")
            elif owner is not None and share > 0:
                hint = (f"; a distill weight of ~{weights[owner] * TARGET_SHARE / share:.3g} (now "
                        f"{weights[owner]:g}) would give it {TARGET_SHARE:.0%}")
            dx.warnings.append(f"{term} sends {_fmt_share(share)} of the CE gradient: its weight is too "
                               f"small for this batch{hint}")


def _anchor_keys(steps: list[dict]) -> dict[str, dict[str, list[str]]]:
    """``{distiller: {"student"/"teacher": [fpr, ...]}}`` found in the rows."""
    found: dict[str, dict[str, list[str]]] = {}
    for k in steps[-1]:
        m = _ANCHOR.match(k)
        if m:
            found.setdefault(m["d"], {}).setdefault(m["who"], []).append(m["fpr"])
    for d in found.values():
        for who in d:
            d[who].sort(key=float, reverse=True)
    return found


def _val_threshold(vals: list[dict], label: str, fpr: str) -> tuple[str, float] | None:
    """The last validation row's ``<set>/<label>@fpr`` (first set that has it)."""
    for row in reversed(vals):
        for k, v in row.items():
            if k.endswith(f"/{label}@{fpr}") and isinstance(v, (int, float)):
                return k.split("/")[0], float(v)
    return None


def check_anchors(steps: list[dict], vals: list[dict], dx: Diagnosis, cfg: dict | None = None) -> None:
    last = steps[-1]
    cold = cold_anchors(steps, cfg or {})
    for name, sides in _anchor_keys(steps).items():
        if name in cold:
            dx.warnings.append(_cold_note(name, cold[name]))
        fprs = sides.get("student", [])
        negatives = last.get(f"{name}/threshold_negatives")
        dx.lines += ["", f"{name}: anchors at the last logged step (step {last.get('step')}) and the "
                     "thresholds the evaluation uses on the validation set:",
                     "| FPR | student anchor | student val threshold | teacher anchor | teacher val threshold |",
                     "|---|---|---|---|---|"]
        for fpr in fprs:
            cells = []
            for who, label in (("student", "thr"), ("teacher", "teacher_thr")):
                a = last.get(f"{name}/anchor_{who}@{fpr}")
                v = _val_threshold(vals, label, fpr)
                cells += [f"{a:.4f}" if a is not None else "—", f"{v[1]:.4f} ({v[0]})" if v else "n/a"]
                if a is None:
                    continue
                if abs(a) < 1e-3 and len(steps) > 1:
                    dx.warnings.append(f"{name}: the {who} anchor at FPR {fpr} is still {a:.4f}, its initial "
                                       "value: the threshold EMA has not moved (momentum too small?)")
                elif v and abs(a - v[1]) > ANCHOR_TOL and name not in cold:
                    dx.warnings.append(f"{name}: the {who} anchor at FPR {fpr} is {a:.3f} but the {who}'s "
                                       f"evaluation threshold on {v[0]} is {v[1]:.3f}: the soft rank steps "
                                       "where the evaluation does not")
            dx.lines.append(f"| {fpr} | " + " | ".join(cells) + " |")
        too_deep = [f for f in fprs if negatives and 1 / float(f) > negatives]
        if too_deep:
            dx.warnings.append(f"{name}: the anchors at FPR {', '.join(too_deep)} need at least "
                               f"{1 / float(too_deep[0]):.0f} negatives but the thresholds come from "
                               f"{negatives:.0f}: they sit at the batch's hardest negatives, not at those "
                               "FPRs (memory_size, or a larger one, adds negatives from earlier batches)")
        for who in ("student", "teacher"):
            values = [last.get(f"{name}/anchor_{who}@{f}") for f in fprs]
            same = [f for f, a, b in zip(fprs[1:], values[1:], values[:-1])
                    if a is not None and b is not None and abs(a - b) < 1e-6 and f not in too_deep]
            if same:
                dx.warnings.append(f"{name}: the {who} anchors at FPR {', '.join(same)} equal the one above "
                                   "them: those anchors are not distinct thresholds")
        for side in ("pos", "neg"):
            share = _late(steps, f"{name}/active_{side}")
            if share:
                s = statistics.median(share)
                dx.lines.append(f"{name}: {s:.1%} of the {'positive' if side == 'pos' else 'top-k negative'} "
                                "pairs lie in a sigmoid's active band (|sim - anchor| < 5T)")
                if s < FLAT_SHARE:
                    dx.warnings.append(f"{name}: only {s:.1%} of the {side} pairs are within 5T of an anchor: "
                                       f"the {name}_{side} term is nearly flat there (a larger temperature "
                                       "widens the band)")


def check_direction(steps: list[dict], cfg: dict, dx: Diagnosis) -> None:
    """Share of EKD's squared soft-rank error that pulls a positive pair down or a negative pair
    up (the student already ranks it better than the teacher does): that part of the MSE works
    against the student's evaluation."""
    params = {d["name"]: d.get("params") or {} for d in cfg.get("distill") or []
              if isinstance(d, dict) and "name" in d}
    for name in _anchor_keys(steps):
        for side, pairs, way in (("pos", "positive", "down"), ("neg", "top-k negative", "up")):
            share = _late(steps, f"{name}/against_{side}")
            if not share:
                continue
            s = statistics.median(share)
            one_sided = bool(params.get(name, {}).get("one_sided"))
            verb = "would pull them" if one_sided else "pulls them"
            dx.lines.append(f"{name}: {s:.1%} of the {pairs} pairs' squared rank error {verb} {way}, "
                            "towards a teacher that ranks them worse than the student does"
                            + (" (left out: one_sided)" if one_sided else ""))
            if s > AGAINST_SHARE and not one_sided:
                dx.warnings.append(f"{name}: {s:.0%} of {name}_{side}'s error pulls {pairs} pairs {way}, "
                                   "where the student already beats the teacher (one_sided: true keeps only "
                                   "the errors that cost the student at evaluation)")


def plot(steps: list[dict], vals: list[dict], out: Path) -> list[Path]:
    """``anchors.png`` and ``gradients.png`` in ``out`` (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    x = [r["step"] for r in steps]
    anchors = _anchor_keys(steps)
    if anchors:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, sides in anchors.items():
            for i, fpr in enumerate(sides.get("student", [])):
                color = f"C{i % 10}"
                for who, style in (("student", "-"), ("teacher", "--")):
                    ys = [r.get(f"{name}/anchor_{who}@{fpr}") for r in steps]
                    ax.plot(x, ys, style, color=color, label=f"{who} {fpr}")
                for label, marker in (("thr", "o"), ("teacher_thr", "x")):
                    pts = [(r["step"], v) for r in vals for k, v in r.items()
                           if k.endswith(f"/{label}@{fpr}") and isinstance(v, (int, float))]
                    if pts:
                        ax.plot(*zip(*pts), marker, color=color, linestyle="none")
        ax.set_xlabel("step")
        ax.set_ylabel("cosine similarity")
        ax.set_title("EKD anchors (lines; - student, -- teacher) and validation thresholds (o student, x teacher)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "anchors.png", dpi=110)
        plt.close(fig)
        written.append(out / "anchors.png")
    shares = sorted({k for r in steps for k in r if k.startswith("grad_share/")})
    if shares:
        fig, ax = plt.subplots(figsize=(8, 4))
        for k in shares:
            ax.plot(x, [max(r.get(k, float("nan")), 1e-8) for r in steps], label=k[len("grad_share/"):])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient norm / CE gradient norm")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "gradients.png", dpi=110)
        plt.close(fig)
        written.append(out / "gradients.png")
    return written


def check_scales(steps: list[dict], cfg: dict, dx: Diagnosis) -> None:
    """Compare the spread of the student's and the teacher's anchors (highest FPR to the deepest
    one the negatives can support): EKD's soft rank (Eq. 5) uses one temperature for both, so
    when the spans differ the student can only match the teacher's soft ranks by taking on its
    spread of similarities; and flag a student whose negatives crowd near cosine 1."""
    last = steps[-1]
    params = {d["name"]: d.get("params") or {} for d in cfg.get("distill") or []
              if isinstance(d, dict) and "name" in d}
    for name, sides in _anchor_keys(steps).items():
        negatives = last.get(f"{name}/threshold_negatives")
        fprs = [f for f in sides.get("student", []) if f in sides.get("teacher", [])
                and not (negatives and 1 / float(f) > negatives)]
        if len(fprs) < 2:
            continue
        hi, lo = fprs[0], fprs[-1]
        anchors = {who: (last.get(f"{name}/anchor_{who}@{hi}"), last.get(f"{name}/anchor_{who}@{lo}"))
                   for who in ("student", "teacher")}
        if any(a is None for pair in anchors.values() for a in pair):
            continue
        span = {who: b - a for who, (a, b) in anchors.items()}
        dx.lines.append(f"{name}: anchor span from FPR {hi} to {lo}: student {span['student']:.3f}, "
                        f"teacher {span['teacher']:.3f}")
        own = params.get(name, {})
        small, large = sorted((span["student"], span["teacher"]))
        if own.get("temperature_mode", "fixed") == "fixed" and small > 0 and large > SCALE_RATIO * small:
            dx.warnings.append(
                f"{name}: the teacher's anchors span {span['teacher']:.3f} (FPR {hi} to {lo}), the "
                f"student's {span['student']:.3f}: with one temperature (T = "
                f"{float(own.get('temperature', 0.01)):g}) the two soft ranks are on different scales, "
                "and matching them pulls the student's similarities towards the teacher's spread "
                "(temperature_mode: spread gives each model a T from its own spread)")
        student_hi, teacher_hi = anchors["student"][0], anchors["teacher"][0]
        if student_hi > CONE:
            like = f", as the teacher's are ({teacher_hi:.3f})" if teacher_hi > CONE else ""
            dx.warnings.append(
                f"{name}: the student's anchor at FPR {hi} is {student_hi:.3f}: its negative pairs "
                f"are nearly parallel{like}, a similarity space squeezed into a narrow cone that the "
                "margin softmax pays for (a smaller distill weight, or temperature_mode: spread)")


def diagnose(run_dir: str | Path, out: str | Path | None = None, plots: bool = True) -> Diagnosis:
    """The summary and warnings of ``run_dir``; plots go to ``out`` (default ``run_dir/diagnose``)."""
    run_dir = Path(run_dir)
    steps, vals, cfg = read_rows(run_dir)
    if not steps:
        raise DataError(f"{run_dir}/metrics.jsonl has no diagnostics rows (train.diagnostics was off, "
                        "or the run logged no step)")
    dx = Diagnosis([f"ekd diagnose {run_dir}: {len(steps)} logged steps (up to step {steps[-1]['step']}), "
                    f"{len(vals)} validation rows"])
    check_gradients(steps, cfg, dx)
    check_anchors(steps, vals, dx, cfg)
    check_scales(steps, cfg, dx)
    check_direction(steps, cfg, dx)
    if plots:
        dx.plots = plot(steps, vals, Path(out) if out else run_dir / "diagnose")
    return dx
