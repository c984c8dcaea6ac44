"""The README's decision guide (bench/kd_guide.py) from committed cells: gaps closed, verdicts
against no KD and the better plain baseline, the advice, the README block."""

from __future__ import annotations

import numpy as np

import bench.kd_guide as G
import bench.kd_table as K
from bench.kd_protocols import METRICS

RESAMPLES = 50


def _metrics(tpr4: float) -> dict:
    m = {k: 0.8 for k in METRICS}
    m.update({"lfw_tpr@1e-3": 2 * tpr4, "lfw_tpr@1e-4": tpr4, "lfw_tpr@1e-5": tpr4 / 2,
              "roc_fpr": [1e-4, 1e-3], "roc_tpr": [tpr4, 2 * tpr4]})
    return m


def _commit(table, cell, tpr4):
    """A committed cell whose bootstrap samples scatter narrowly around its TPRs (every cell has
    the same noise, so paired differences are exact)."""
    name = table.cell_name(cell)
    noise = np.random.default_rng(7).normal(0, 0.002, (RESAMPLES, 3))
    samples = np.clip(np.array([2 * tpr4, tpr4, tpr4 / 2]) + noise, 0, 1)
    boot = {"protocol": "p", "seed": 0, "resamples": RESAMPLES, "fprs": [1e-3, 1e-4, 1e-5],
            "tpr_millionths": np.round(samples.T * 1e6).astype(int).tolist()}
    table.store.write(name, {"teacher": cell.teacher, "method": cell.method, "seed": cell.seed, "width": cell.width,
                             "name": name, "metrics": _metrics(tpr4), "train_seconds": 60.0}, boot)


def _table(tmp_path, rows: dict[str, float]):
    table = K.Table(K.CPU2, tmp_path / "faces", tmp_path / "cache", tmp_path / "results")
    table.store.write("T2-teacher", {"teacher": "T2", "method": "teacher", "seed": None, "name": "T2-teacher",
                                     "metrics": _metrics(0.5)}, None)
    for method, tpr4 in rows.items():
        seeds = 3 if method in ("no KD", "EKD (authors)", "EKD (ours)") else 1
        for s in range(seeds):
            _commit(table, K.Cell("T2", method, s), tpr4)
    return table


def test_the_guide_picks_the_row_ahead_of_no_kd_on_every_seed(tmp_path):
    table = _table(tmp_path, {"no KD": 0.10, "EKD (authors)": 0.10, "EKD (ours)": 0.14, "cosine": 0.12,
                              "fitnet": 0.09, "darkrank": 0.18})
    rows, advice, summaries, _, missing, ekd, best = G.regime_guide(table, "T2")
    assert missing > 0  # the rest of the cpu2 plan is not committed here
    full = next(a for a in advice if "full width" in a)
    # darkrank: +20% of the gap (0.18 - 0.10) / (0.5 - 0.10), better than no KD at every FPR
    assert "pick darkrank**; it closes +20.0% of the gap at TPR@1e-4" in full
    darkrank = next(r for r in rows if "darkrank (best)" in r)
    assert "| +20.0% | +20.0% | +20.0% | better / better / better |" in darkrank
    # the better plain baseline is cosine (0.12 > 0.09): EKD (ours) is ahead of it, EKD (authors) behind
    assert "(cosine) at TPR@1e-4: EKD (authors) worse (+0.0% vs +5.0%); EKD (ours) better (+10.0% vs +5.0%)" in full
    assert next(r for r in rows if "| fitnet |" in r).endswith("| worse |")
    assert next(r for r in rows if "| cosine |" in r).endswith("| – |")  # the reference itself
    # the capacity plot: EKD, the plain baselines and each student's best row, nothing else
    assert best == {"darkrank (T2)"}
    points = {f"{m} (T2)": [(980_000, 0.1)] for m in ("EKD (ours)", "cosine", "darkrank", "sp")}
    assert set(G.plotted(points, best)) == {"EKD (ours) (T2)", "cosine (T2)", "darkrank (T2)"}


def test_the_guide_says_plainly_when_nothing_is_ahead_and_rewrites_only_its_block(tmp_path):
    table = _table(tmp_path, {"no KD": 0.10, "EKD (authors)": 0.10, "cosine": 0.08})
    _, advice, _, _, _, _, _ = G.regime_guide(table, "T2")
    assert advice[0].startswith("**T2, full width (0.98 M): no distiller is really ahead of no KD at TPR@1e-4.** "
                                "The best row, EKD (authors), closes +0.0% (within noise).")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{G.BEGIN}\nold\n{G.END}\noutro\n")
    assert G.update_readme(readme, f"{G.BEGIN}\nnew\n{G.END}")
    assert readme.read_text() == f"intro\n{G.BEGIN}\nnew\n{G.END}\noutro\n"
    plain = tmp_path / "other.md"
    plain.write_text("no markers\n")
    assert not G.update_readme(plain, "x") and plain.read_text() == "no markers\n"
    assert not G.update_readme(tmp_path / "missing.md", "x")


def test_where_ekd_stands_counts_every_students_verdicts(tmp_path):
    table = _table(tmp_path, {"no KD": 0.10, "EKD (authors)": 0.10, "EKD (ours)": 0.14, "cosine": 0.12})
    regime = G.regime_guide(table, "T2")
    assert regime.ekd == [{"student": "T2, full width (0.98 M)", "plain": "cosine",
                           "verdicts": {"EKD (authors)": ("within noise", "worse"), "EKD (ours)": ("better", "better")}}]
    half = {"student": "T3, ×0.5 width (0.33 M)", "plain": None, "verdicts": {"EKD (authors)": ("worse", None)}}
    lines = G.standing_paragraph(regime.ekd + [half])
    authors = next(line for line in lines if line.startswith("- EKD (authors)"))
    assert authors == ("- EKD (authors): against no KD (2 students): within noise in 1 (T2, full width), worse in 1 "
                       "(T3, ×0.5 width); against the better plain baseline (1 student): worse in 1 "
                       "(T2, full width, vs cosine).")
    ours = next(line for line in lines if line.startswith("- EKD (ours)"))
    assert ours == ("- EKD (ours): against no KD (1 student): better in 1 (T2, full width); against the better "
                    "plain baseline (1 student): better in 1 (T2, full width, vs cosine).")
    assert G.standing_paragraph([half])[2] == ("- EKD (authors): against no KD (1 student): worse in 1 "
                                               "(T3, ×0.5 width); no plain baseline to compare with.")


def test_roc_links_name_only_the_plots_that_exist(tmp_path):
    assert G.roc_links("cpu3", "T3", (1.0, 0.5), tmp_path) == ""
    (tmp_path / "kd_table_cpu3_t3_w0.5_roc.png").write_bytes(b"png")
    link = G.roc_links("cpu3", "T3", (1.0, 0.5), tmp_path)
    assert link.startswith("ROC curves, LFW all-pairs, T3: [×0.5 width](") and "full width" not in link
    assert link.endswith("kd_table_cpu3_t3_w0.5_roc.png)")
