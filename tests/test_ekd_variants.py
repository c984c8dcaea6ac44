"""EKD variants (``distill/ekd.py`` options beyond the paper): each against an independent float64
reference of its definition, the defaults unchanged, bad values refused."""

from __future__ import annotations

import math

import pytest
import torch

from ekd.distill import build_distiller
from ekd.errors import ConfigError

FPRS = (0.1, 0.01)


def _batch(seed=0, n=24, d=16):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = t + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)  # a related student
    return s, t, torch.arange(n) // 4


def _reference(s, t, labels, *, anchor_source="own", hard="student", temperature_mode="fixed",
               scale=0.1, focus=None, width=0.05, reduction="mean", top_k=30, temp=0.01,
               one_sided=False):
    """The variant losses (pos, neg), written from their docstrings, first step (EMA from 0,
    bias-corrected so the anchors are the batch thresholds)."""
    n = len(labels)
    su, tu = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    i, j = torch.triu_indices(n, n, 1)
    ss, ts = (su @ su.T)[i, j], (tu @ tu.T)[i, j]
    same = labels[i] == labels[j]

    def thresholds(neg):
        srt = torch.sort(neg, descending=True).values
        return torch.stack([srt[len(neg) // round(1 / f)] for f in FPRS])

    a_s, a_t = thresholds(ss[~same]), thresholds(ts[~same])
    if anchor_source == "teacher":
        a_s = a_t
    if temperature_mode == "spread":
        t_s, t_t = scale * ss[~same].std(), scale * ts[~same].std()
    else:
        t_s = t_t = temp

    def rank(x, a, tt):
        return sum(1 / (1 + torch.exp(-(x - a[k]) / tt)) for k in range(len(FPRS)))

    def term(xs, xt, sign):
        diff = rank(xt, a_t, t_t) - rank(xs, a_s, t_s)
        err = (diff.clamp_min(0) if sign > 0 else diff.clamp_max(0)) ** 2 if one_sided else diff ** 2
        if focus is not None:
            w = torch.exp(-0.5 * ((xt - a_t[FPRS.index(focus)]) / width) ** 2)
            err = err * w / w.mean()
        if reduction == "active":
            act = ((xs[:, None] - a_s[None]).abs() < 5 * t_s).any(1) | ((xt[:, None] - a_t[None]).abs() < 5 * t_t).any(1)
            return err.sum() / max(int(act.sum()), 1)
        return err.mean()

    key = ss[~same] if hard == "student" else ts[~same]
    top = torch.sort(key, descending=True).indices[:top_k]
    return 0.02 * term(ss[same], ts[same], 1), 0.01 * term(ss[~same][top], ts[~same][top], -1)


VARIANTS = [
    ({}, {}),
    ({"anchor_source": "teacher"}, {"anchor_source": "teacher"}),
    ({"hard_negatives": "teacher"}, {"hard": "teacher"}),
    ({"temperature_mode": "spread", "temperature_scale": 0.2}, {"temperature_mode": "spread", "scale": 0.2}),
    ({"focus_fpr": 0.01, "focus_width": 0.1}, {"focus": 0.01, "width": 0.1}),
    ({"reduction": "active"}, {"reduction": "active"}),
    ({"one_sided": True}, {"one_sided": True}),
    ({"temperature_mode": "spread", "reduction": "active", "anchor_source": "teacher"},
     {"temperature_mode": "spread", "reduction": "active", "anchor_source": "teacher"}),
]


@pytest.mark.parametrize("params,ref", VARIANTS, ids=[str(v[0]) or "paper" for v in VARIANTS])
def test_variant_equals_its_definition(params, ref):
    s, t, labels = _batch()
    ekd = build_distiller("ekd", fprs=list(FPRS), top_k=30, bias_correction=True, **params).double()
    got = ekd(s, t, labels)
    pos, neg = _reference(s, t, labels, **ref)
    assert float(got["ekd_pos"]) == pytest.approx(float(pos), rel=1e-9, abs=1e-15)
    assert float(got["ekd_neg"]) == pytest.approx(float(neg), rel=1e-9, abs=1e-15)


def test_every_variant_changes_the_loss_and_sends_gradient():
    s, t, labels = _batch(1)
    base = build_distiller("ekd", fprs=list(FPRS), top_k=30, bias_correction=True).double()(s, t, labels)
    for params, _ in VARIANTS[1:7]:
        x = s.clone().requires_grad_(True)
        got = build_distiller("ekd", fprs=list(FPRS), top_k=30, bias_correction=True, **params).double()(x, t, labels)
        assert not math.isclose(float(got["ekd_pos"] + got["ekd_neg"]), float(base["ekd_pos"] + base["ekd_neg"]),
                                rel_tol=1e-9), params
        (got["ekd_pos"] + got["ekd_neg"]).backward()
        assert x.grad is not None and float(x.grad.abs().sum()) > 0, params


def test_one_sided_keeps_only_the_errors_that_cost_the_student():
    """A student whose positive pairs are all above every anchor owes nothing on them under
    ``one_sided`` while the paper's MSE pulls them down towards the teacher's ranks; the
    diagnostics report that pull ("against") as all of the positive error."""
    s, t, labels = _batch(2)
    g = torch.Generator().manual_seed(3)
    student = 5.0 * torch.nn.functional.one_hot(labels, 16).double() + 0.1 * torch.randn(24, 16, generator=g, dtype=torch.float64)
    common = dict(fprs=list(FPRS), top_k=30, bias_correction=True, temperature=0.05)
    one = build_distiller("ekd", one_sided=True, **common).double()
    mse = build_distiller("ekd", **common).double()
    one.record_diagnostics = mse.record_diagnostics = True
    got, paper = one(student, t, labels), mse(student, t, labels)
    assert float(got["ekd_pos"]) == pytest.approx(0.0, abs=1e-12) and float(paper["ekd_pos"]) > 1e-4
    assert 0 < float(got["ekd_neg"]) < float(paper["ekd_neg"])
    assert mse.diagnostics()["against_pos"] == pytest.approx(1.0)
    assert 0 < mse.diagnostics()["against_neg"] < 1


def test_memory_pairs_distil_batch_against_memory_without_self_pairs():
    torch.manual_seed(0)
    s1, t1 = torch.randn(8, 6), torch.randn(8, 6)
    labels = torch.arange(8) // 2
    common = dict(fprs=[0.1], top_k=10_000, memory_size=16, student_dim=6, teacher_dim=6, bias_correction=True)
    plain = build_distiller("ekd", **common)
    pairs = build_distiller("ekd", memory_pairs=True, **common)
    for m in (plain, pairs):
        m(s1, t1, labels)  # fills the memory with batch 1
    s2 = torch.randn(8, 6, requires_grad=True)
    t2 = torch.randn(8, 6)
    a = plain(s2, t2, labels)
    pairs.record_diagnostics = True
    b = pairs(s2, t2, labels)
    # batch 2 has 4 identities x 2 images: 4 positive pairs in the batch, + 8 x 2 against batch 1
    # (same labels), and only batch 1 in the memory (not batch 2 itself)
    assert pairs.diagnostics()["pairs_pos"] == 4 + 16
    assert float(a["ekd_pos"]) != pytest.approx(float(b["ekd_pos"]))
    (b["ekd_pos"] + b["ekd_neg"]).backward()
    assert float(s2.grad.abs().sum()) > 0


def test_defaults_are_the_paper_and_bad_values_are_refused():
    ekd = build_distiller("ekd")
    assert ekd.is_paper_loss and ekd.anchor_source == "own" and ekd.hard_negatives == "student"
    for params, match in [({"temperature_mode": "auto"}, "temperature_mode must be one of fixed, spread"),
                          ({"anchor_source": "student"}, "anchor_source must be one of own, teacher"),
                          ({"hard_negatives": "both"}, "hard_negatives"), ({"reduction": "sum"}, "reduction"),
                          ({"focus_fpr": 0.5}, "focus_fpr 0.5 is not one of fprs"),
                          ({"memory_pairs": True}, "memory_pairs needs memory_size > 0"),
                          ({"temperature_scale": 0.0}, "temperature_scale and focus_width must be > 0")]:
        with pytest.raises(ConfigError, match=match):
            build_distiller("ekd", **params)
