"""Training diagnostics (per-term gradient shares, EKD's anchors and active bands, validation
thresholds) and ``ekd diagnose``: values checked against hand computations, a zero-weight term
reported as sending no gradient, a broken anchor flagged."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import synthetic_run_tree
from ekd.commands.cli import main
from ekd.commands.diagnostics_report import diagnose
from ekd.config import Config, from_dict
from ekd.distill import build_distiller
from ekd.distill.ekd import clamped_sigmoid
from ekd.engine.diagnostics import term_gradient_norms
from ekd.utils.distributed import DistInfo
from ekd.engine.trainer import train
from ekd.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradient_norms_and_shares_are_those_of_the_terms():
    emb = torch.randn(6, 4, requires_grad=True)
    rows = emb * 1.0  # a non-leaf, as the trainer's embedding
    terms = {"ce": (rows ** 2).sum(), "mse": 3.0 * rows[:2].sum(), "off": torch.tensor(1.0),
             "zero": 0.0 * rows.sum()}
    got = term_gradient_norms(terms, rows, DistInfo())
    assert got["grad/ce"] == pytest.approx(float(2 * emb.detach().norm()), rel=1e-6)
    assert got["grad/mse"] == pytest.approx(3.0 * 8 ** 0.5, rel=1e-6)  # 2 rows x 4 dims of 3
    assert got["grad/off"] == 0.0 and got["grad/zero"] == 0.0
    assert got["grad_share/mse"] == pytest.approx(got["grad/mse"] / got["grad/ce"])
    assert "grad_share/ce" not in got


def test_ekd_records_anchors_bands_and_per_anchor_mse():
    torch.manual_seed(0)
    s, t = torch.randn(12, 8), torch.randn(12, 8)
    labels = torch.arange(12) // 3
    ekd = build_distiller("ekd", weight=1.0, fprs=[0.1, 0.01], temperature=0.05, top_k=10,
                          bias_correction=True)
    ekd(s, t, labels)
    assert ekd.diagnostics() == {}  # recorded only when the trainer asks
    ekd.record_diagnostics = True
    ekd(s, t, labels)
    d = ekd.diagnostics()
    sa, ta = ekd.anchors()
    assert d["anchor_student@1e-1"] == pytest.approx(float(sa[0]))
    assert d["anchor_teacher@1e-2"] == pytest.approx(float(ta[1]))
    # by hand: unit embeddings, upper-triangle pairs, positives, top-10 student negatives
    su, tu = torch.nn.functional.normalize(s, dim=1), torch.nn.functional.normalize(t, dim=1)
    iu = torch.triu_indices(12, 12, 1)
    ss, ts = (su @ su.t())[iu[0], iu[1]], (tu @ tu.t())[iu[0], iu[1]]
    same = labels[iu[0]] == labels[iu[1]]
    hard = torch.argsort(ss[~same], descending=True)[:10]
    neg_s, neg_t = ss[~same][hard], ts[~same][hard]
    near = ((neg_s[:, None] - sa[None, :]).abs() < 5 * 0.05).any(1).float().mean()
    assert d["active_neg"] == pytest.approx(float(near))
    assert d["pairs_pos"] == int(same.sum()) and d["pairs_neg"] == 10
    step = (clamped_sigmoid(ss[same] - sa[1], 0.05) - clamped_sigmoid(ts[same] - ta[1], 0.05)) ** 2
    assert d["mse_pos@1e-2"] == pytest.approx(float(step.mean()), rel=1e-5)
    assert d["threshold_negatives"] == int((~same).sum())


def test_ekd_diagnostics_use_each_models_temperature_under_spread():
    """With ``temperature_mode: spread`` the loss steps the teacher's pairs at the teacher's own T;
    the recorded per-anchor MSE must do the same (not reuse the student's)."""
    torch.manual_seed(1)
    s, t = torch.randn(12, 8), 0.3 * torch.randn(12, 8) + torch.ones(8)  # a compressed teacher
    labels = torch.arange(12) // 3
    ekd = build_distiller("ekd", weight=1.0, fprs=[0.1, 0.01], top_k=10, temperature_mode="spread",
                          temperature_scale=0.2, momentum=1.0)
    ekd.record_diagnostics = True
    ekd(s, t, labels)
    d, (sa, ta) = ekd.diagnostics(), ekd.anchors()
    su, tu = torch.nn.functional.normalize(s, dim=1), torch.nn.functional.normalize(t, dim=1)
    iu = torch.triu_indices(12, 12, 1)
    ss, ts = (su @ su.t())[iu[0], iu[1]], (tu @ tu.t())[iu[0], iu[1]]
    same = labels[iu[0]] == labels[iu[1]]
    t_s, t_t = 0.2 * float(ss[~same].std()), 0.2 * float(ts[~same].std())
    assert abs(t_s - t_t) > 0.01  # the two temperatures really differ here
    step = (clamped_sigmoid(ss[same] - sa[0], t_s) - clamped_sigmoid(ts[same] - ta[0], t_t)) ** 2
    assert d["mse_pos@1e-1"] == pytest.approx(float(step.mean()), rel=1e-5)


def _config(tmp_path, name, distill, teacher=None, val=True, **train):
    return from_dict(Config, synthetic_run_tree(tmp_path, name, distill, teacher, val, **train))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("diag_teacher")
    return train(_config(out, "teacher", [], val=False, max_steps_per_epoch=8)).model_path


def test_a_zero_weight_term_is_reported_as_sending_no_gradient(tmp_path, teacher):
    run = train(_config(tmp_path, "zero", [{"name": "ekd", "weight": 0.0}], teacher)).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "grad/ce" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert all(r["grad/ekd_pos"] == 0.0 and r["grad/ekd_neg"] == 0.0 and r["grad/ce"] > 0 for r in logged)
    dx = diagnose(run, plots=False)
    assert any(w.startswith("ekd_pos sends no gradient") for w in dx.warnings), dx.warnings
    assert any(w.startswith("ekd_neg sends no gradient") for w in dx.warnings)
    # validation rows hold the student's and the (network) teacher's thresholds at EKD's FPRs
    val = [r for r in rows if r.get("val")]
    assert val and {"syn/thr@1e-1", "syn/thr@1e-2", "syn/teacher_thr@1e-1"} <= set(val[-1])
    assert -1.0 <= val[-1]["syn/thr@1e-1"] <= 1.0


def test_a_broken_anchor_is_flagged_and_a_working_one_is_not(tmp_path, teacher):
    broken = train(_config(tmp_path, "stuck", [{"name": "ekd", "params": {"momentum": 1e-7}}], teacher)).run_dir
    dx = diagnose(broken, plots=False)
    stuck = [w for w in dx.warnings if "its initial value" in w]
    assert any("student anchor at FPR 1e-1" in w for w in stuck), dx.warnings
    working = train(_config(tmp_path, "ok", [{"name": "ekd", "params": {"bias_correction": True}}],
                            teacher)).run_dir
    assert not [w for w in diagnose(working, plots=False).warnings if "its initial value" in w]


def test_collapsed_anchors_name_the_missing_negatives(tmp_path, teacher):
    run = train(_config(tmp_path, "deep", [{"name": "ekd", "params": {"bias_correction": True}}],
                        teacher, val=False)).run_dir
    text = diagnose(run, plots=False).text()
    # a 32-image batch has < 496 negatives: the anchors at FPR 1e-3 and deeper cannot be real
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    negatives = [r["ekd/threshold_negatives"] for r in rows if "grad/ce" in r][-1]
    assert 400 < negatives < 496
    assert (f"anchors at FPR 1e-3, 1e-4, 1e-5, 1e-6 need at least 1000 negatives but the thresholds "
            f"come from {negatives:.0f}") in text
    assert "1e-2" not in text.split("need at least")[0].split("What looks wrong:")[1]


def test_diagnostics_off_and_not_a_run(tmp_path, teacher, capsys):
    run = train(_config(tmp_path, "off", [{"name": "ekd"}], teacher, val=False, diagnostics=False)).run_dir
    assert not any("grad/" in line for line in (run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(DataError, match="no diagnostics rows"):
        diagnose(run)
    assert main(["diagnose", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ekd diagnose: error:") and "no metrics.jsonl" in err and "\n" not in err


def test_diagnose_command_prints_the_summary_and_writes_plots(tmp_path, teacher, capsys):
    pytest.importorskip("matplotlib")
    run = train(_config(tmp_path, "plots", [{"name": "ekd"}], teacher)).run_dir
    assert main(["diagnose", str(run), "--out", str(tmp_path / "dg")]) == 0
    out = capsys.readouterr().out
    assert "| ekd_pos |" in out and "student val threshold" in out and "What looks wrong:" in out
    assert (tmp_path / "dg" / "anchors.png").stat().st_size > 0
    assert (tmp_path / "dg" / "gradients.png").stat().st_size > 0


def test_ekd_variants_train_through_the_config(tmp_path, teacher):
    variants = {"bias_correction": True, "memory_size": 64, "memory_pairs": True,
                "temperature_mode": "spread", "hard_negatives": "teacher", "reduction": "active",
                "one_sided": True}
    run = train(_config(tmp_path, "variants", [{"name": "ekd", "params": variants}], teacher, val=False))
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "grad/ekd_pos" in r]
    assert logged and all(r["grad/ekd_pos"] > 0 for r in logged)
    assert logged[-1]["ekd/pairs_pos"] > 84  # batch positives plus batch-vs-memory positives
    assert all(0 <= r["ekd/against_pos"] <= 1 and 0 <= r["ekd/against_neg"] <= 1 for r in logged)


def _fake_run(tmp_path, student, teacher, params=None, extra=None):
    """A run directory with one logged step: anchors at FPR 1e-1..1e-3 and a config."""
    import yaml

    row = {"step": 100, "grad/ce": 0.1, "grad/ekd_pos": 0.02, "ekd/threshold_negatives": 1e6, **(extra or {})}
    for fpr, s, t in zip(("1e-1", "1e-2", "1e-3"), student, teacher):
        row[f"ekd/anchor_student@{fpr}"], row[f"ekd/anchor_teacher@{fpr}"] = s, t
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"distill": [{"name": "ekd", "weight": 1.0, "params": params or {}}]}))
    return diagnose(tmp_path, plots=False)


def test_anchor_spans_on_different_scales_are_flagged_unless_temperature_follows_spread(tmp_path):
    dx = _fake_run(tmp_path, (0.17, 0.33, 0.45), (0.885, 0.92, 0.944))
    assert "anchor span from FPR 1e-1 to 1e-3: student 0.280, teacher 0.059" in dx.text()
    assert any("different scales" in w and "T = 0.01" in w for w in dx.warnings)
    dx = _fake_run(tmp_path, (0.17, 0.33, 0.45), (0.885, 0.92, 0.944), {"temperature_mode": "spread"})
    assert not any("different scales" in w for w in dx.warnings)
    dx = _fake_run(tmp_path, (0.17, 0.33, 0.45), (0.20, 0.35, 0.48))  # alike: nothing to say
    assert not any("different scales" in w or "nearly parallel" in w for w in dx.warnings)


def test_a_student_squeezed_into_a_narrow_cone_is_flagged(tmp_path):
    dx = _fake_run(tmp_path, (0.911, 0.960, 0.978), (0.885, 0.92, 0.944))
    cone = [w for w in dx.warnings if "nearly parallel" in w]
    assert len(cone) == 1 and "0.911" in cone[0] and "teacher's are (0.885)" in cone[0]
    assert not any("different scales" in w for w in dx.warnings)  # same span: the student took it


def test_rank_error_pulling_pairs_the_wrong_way_is_reported(tmp_path):
    anchors = ((0.17, 0.33, 0.45), (0.20, 0.35, 0.48))
    dx = _fake_run(tmp_path, *anchors, extra={"ekd/against_pos": 0.62, "ekd/against_neg": 0.1})
    assert "62.0% of the positive pairs' squared rank error pulls them down" in dx.text()
    assert "10.0% of the top-k negative pairs' squared rank error pulls them up" in dx.text()
    wrong = [w for w in dx.warnings if "beats the teacher" in w]
    assert len(wrong) == 1 and "ekd_pos" in wrong[0] and "one_sided: true" in wrong[0]
    dx = _fake_run(tmp_path, *anchors, {"one_sided": True}, extra={"ekd/against_pos": 0.62})
    assert not any("beats the teacher" in w for w in dx.warnings)
    assert "error would pull them down, towards a teacher that ranks them worse than the student does " \
        "(left out: one_sided)" in dx.text()


def test_a_short_run_blames_the_cold_ema_not_the_anchors(tmp_path):
    """After n steps the anchors hold 1 - 0.99^n of their targets: the warm-up is the cause,
    not the soft rank nor the weight, whatever the anchors' size (not only below 1e-3)."""
    import yaml

    row = {"step": 8, "grad/ce": 1.0, "grad/ekd_pos": 0.001, "grad_share/ekd_pos": 0.001,
           "ekd/threshold_negatives": 1e6}
    warm = 1 - 0.99 ** 8
    for fpr, t in zip(("1e-1", "1e-2", "1e-3"), (0.3, 0.45, 0.55)):
        row[f"ekd/anchor_student@{fpr}"], row[f"ekd/anchor_teacher@{fpr}"] = warm * t, warm * t
    val = {"val": True, "step": 8, "lfw/thr@1e-1": 0.3, "lfw/thr@1e-2": 0.45, "lfw/thr@1e-3": 0.55}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(val) + "\n")
    config = {"distill": [{"name": "ekd", "weight": 1.0, "params": {}}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dx = diagnose(tmp_path, plots=False)
    cold = [w for w in dx.warnings if w.startswith("ekd: the anchors are not warmed up")]
    assert cold and "1 - (1 - 0.01)^8 = 7.7%" in cold[0] and "bias_correction" in cold[0]
    assert not any("soft rank steps where the evaluation does not" in w for w in dx.warnings)
    assert not any("a distill weight of ~" in w for w in dx.warnings)
    # warmed up (or bias-corrected): the anchor and weight findings come back
    config["distill"][0]["params"] = {"bias_correction": True}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dx = diagnose(tmp_path, plots=False)
    assert not any("not warmed up" in w for w in dx.warnings)
    assert any("soft rank steps where the evaluation does not" in w for w in dx.warnings)
    assert any("a distill weight of ~" in w for w in dx.warnings)
