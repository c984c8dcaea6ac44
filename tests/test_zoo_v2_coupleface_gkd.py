"""CoupleFace and GKD: values against float64 references written here from the methods'
equations, the KD decomposition GKD rests on, degenerate batches and refusals (through the trainer
and on two processes: test_zoo_v2_coupleface_gkd_trainer.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ekd.distill import build_distiller, distiller_params
from ekd.distill.coupleface import informative_pairs
from ekd.distill.gkd import grouped_kd, primary_mask
from ekd.errors import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
from test_degenerate import CASES, _batch  # noqa: E402

N, IDS, D = 8, 4, 6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(N, D, generator=g, dtype=torch.float64)
    s = t + 0.7 * torch.randn(N, D, generator=g, dtype=torch.float64)
    return s, t


# --------------------------------------------------------------------------- CoupleFace

def coupleface_reference(s: torch.Tensor, t: torch.Tensor, labels: list[int], top_k: int,
                         fcd_weight: float, rad_weight: float) -> torch.Tensor:
    """FCD + RAD written out sample by sample (float64, differentiable in ``s``)."""
    n = len(labels)
    us = [s[i] / torch.sqrt((s[i] ** 2).sum()) for i in range(n)]
    ut = [t[i] / torch.sqrt((t[i] ** 2).sum()) for i in range(n)]
    fcd = sum(((us[i] - ut[i]) ** 2).sum() for i in range(n)) / n
    diffs = []
    for i in range(n):
        negatives = [j for j in range(n) if labels[j] != labels[i]]
        negatives.sort(key=lambda j: -float((ut[i] * ut[j]).sum()))
        for j in negatives[:top_k]:
            diffs.append(((us[i] * us[j]).sum() - (ut[i] * ut[j]).sum()) ** 2)
    rad = sum(diffs) / len(diffs)
    return fcd_weight * fcd + rad_weight * rad


@pytest.mark.parametrize("top_k,fcd_weight,rad_weight", [(3, 1.0, 1.0), (1, 0.5, 2.0), (10, 0.0, 1.0)])
def test_coupleface_matches_the_equations(top_k, fcd_weight, rad_weight):
    s0, t = _inputs()
    s = s0.clone().requires_grad_(True)
    d = build_distiller("coupleface", top_k=top_k, fcd_weight=fcd_weight, rad_weight=rad_weight,
                        student_dim=D, teacher_dim=D)
    terms = d(s, t, LABELS)
    assert set(terms) == ({"coupleface_fcd"} if fcd_weight else set()) | {"coupleface_rad"}
    got = sum(terms.values())
    (grad,) = torch.autograd.grad(got, s)
    ref_s = s0.clone().requires_grad_(True)
    want = coupleface_reference(ref_s, t, LABELS.tolist(), top_k, fcd_weight, rad_weight)
    (want_grad,) = torch.autograd.grad(want, ref_s)
    assert abs(got.item() - want.item()) <= 1e-8 * abs(want.item())
    assert torch.allclose(grad, want_grad, rtol=1e-8, atol=1e-12)


def test_coupleface_mines_the_teachers_nearest_other_identities():
    """Anchor 0's mined relation is the other-identity sample the teacher puts next to it, even
    when its own identity's sample is nearer; same-identity pairs are never mined."""
    t = torch.eye(N, D + 2, dtype=torch.float64)
    t[1] = t[0] + 0.01 * t[1]  # same identity as 0, nearest of all
    t[5] = t[0] + 0.2 * t[5]  # other identity, nearest negative of 0
    rows, cols = informative_pairs(F.normalize(t) @ F.normalize(t).t(), LABELS, top_k=1)
    pairs = set(zip(rows.tolist(), cols.tolist()))
    assert (0, 5) in pairs and (5, 0) in pairs and len(pairs) == N
    assert all(LABELS[i] != LABELS[j] for i, j in pairs)
    one_id = informative_pairs(torch.zeros(N, N), torch.zeros(N, dtype=torch.long), top_k=3)
    assert one_id[0].numel() == 0


def test_coupleface_refuses_fcd_across_widths_and_bad_params():
    with pytest.raises(ConfigError, match="FCD term .* widths must match.*fcd_weight: 0"):
        build_distiller("coupleface", student_dim=8, teacher_dim=16)
    rad_only = build_distiller("coupleface", fcd_weight=0.0, student_dim=8, teacher_dim=16)
    terms = rad_only(torch.randn(N, 8), torch.randn(N, 16), LABELS)
    assert set(terms) == {"coupleface_rad"} and torch.isfinite(terms["coupleface_rad"])
    with pytest.raises(ConfigError, match="top_k"):
        build_distiller("coupleface", top_k=0)
    with pytest.raises(ConfigError, match="rad_weight"):
        build_distiller("coupleface", rad_weight=-1.0)


# --------------------------------------------------------------------------- GKD

def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def gkd_reference(zs: np.ndarray, zt: np.ndarray, labels: list[int], temperature: float,
                  rate: float, alpha: float, beta: float, lam: float, group_by: str) -> dict:
    """GKD from its definition, one sample at a time (float64 numpy)."""
    n, c = zs.shape
    zg = zs if group_by == "student" else zt
    mass = sum(_softmax(zg[i]) for i in range(n))
    cum, k = 0.0, c
    for rank, value in enumerate(sorted(mass, reverse=True)):
        cum += value
        if cum >= rate * n:
            k = rank + 1
            break
    binary = primary = secondary = 0.0
    for i in range(n):
        others = sorted((j for j in range(c) if j != labels[i]), key=lambda j: -zg[i, j])
        group_p = [labels[i]] + others[: k - 1]
        group_s = [j for j in range(c) if j not in group_p]
        ps, pt = _softmax(zs[i] / temperature), _softmax(zt[i] / temperature)
        for group, acc in ((group_p, "p"), (group_s, "s")):
            bs, bt = ps[group].sum(), pt[group].sum()
            if not group:
                continue
            binary += bt * np.log(bt / bs)
            kl = sum(pt[j] / bt * np.log((pt[j] / bt) / (ps[j] / bs)) for j in group)
            if acc == "p":
                primary += kl
            else:
                secondary += kl
    f = temperature ** 2 / n
    return {"gkd_binary": alpha * f * binary, "gkd_primary": beta * f * primary,
            "gkd_secondary": lam * f * secondary, "k": k}


def _logits(seed: int = 3, classes: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zt = 6.0 * torch.randn(N, classes, generator=g, dtype=torch.float64)
    zs = zt + 4.0 * torch.randn(N, classes, generator=g, dtype=torch.float64)
    return zs, zt


@pytest.mark.parametrize("params", [{}, {"rate": 0.5, "group_by": "teacher"},
                                    {"rate": 0.99, "temperature": 2.0, "secondary_weight": 0.5},
                                    {"rate": 1.0, "binary_weight": 2.0, "primary_weight": 1.0}])
def test_gkd_matches_the_grouped_kd_definition(params):
    zs, zt = _logits()
    zs = zs.requires_grad_(True)
    d = build_distiller("gkd", **params)
    terms = d(torch.zeros(N, D), torch.zeros(N, D), LABELS, student_logits=zs, teacher_logits=zt)
    p = {**distiller_params("gkd"), **params}
    want = gkd_reference(zs.detach().numpy(), zt.numpy(), LABELS.tolist(), p["temperature"], p["rate"],
                         p["binary_weight"], p["primary_weight"], p["secondary_weight"], p["group_by"])
    assert 1 < want["k"] <= 7
    extra = {"gkd_secondary"} if p["secondary_weight"] else set()
    assert set(terms) == {"gkd_binary", "gkd_primary"} | extra
    for key, value in terms.items():
        assert value.item() == pytest.approx(want[key], rel=1e-8, abs=1e-14), key

    def loss(z: torch.Tensor) -> torch.Tensor:  # groups are locally constant: a smooth function
        return sum(d(torch.zeros(N, D), torch.zeros(N, D), LABELS, student_logits=z,
                     teacher_logits=zt).values())

    assert torch.autograd.gradcheck(loss, (zs,), eps=1e-6, atol=1e-7)


def test_gkd_groups_decompose_kd():
    """KL(p_t || p_s) = Binary-KD + b_t^P Primary-KD + b_t^S Secondary-KD, per sample."""
    zs, zt = _logits(seed=5, classes=9)
    xs, xt = zs / 4.0, zt / 4.0
    primary = primary_mask(zs, LABELS, 4)
    assert (primary.sum(1) == 4).all() and primary[torch.arange(N), LABELS].all()
    pt = F.softmax(xt, 1)
    kd = (pt * (F.log_softmax(xt, 1) - F.log_softmax(xs, 1))).sum(1)
    b_p = (pt * primary).sum(1)
    binary, primary_kd, secondary_kd = grouped_kd(xs, xt, primary)
    assert torch.allclose(binary + b_p * primary_kd + (1 - b_p) * secondary_kd, kd, rtol=1e-10, atol=1e-14)
    everything = torch.ones_like(primary)
    binary, primary_kd, secondary_kd = grouped_kd(xs, xt, everything)  # no secondary group
    assert torch.allclose(primary_kd, kd, rtol=1e-10) and (binary.abs() < 1e-15).all()
    assert (secondary_kd == 0).all()


def test_gkd_primary_group_is_the_target_plus_the_top_others_ties_to_lower_index():
    z = torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    mask = primary_mask(z, torch.tensor([2, 4]), 3)
    assert mask.tolist() == [[False, True, True, True, False], [True, True, False, False, True]]
    assert primary_mask(z, torch.tensor([0, 0]), 1).tolist() == [[True] + [False] * 4] * 2
    assert primary_mask(z, torch.tensor([0, 0]), 5).all()


def test_gkd_with_teacher_centres_scores_both_models_on_them():
    s, t = _inputs()
    centres = torch.randn(IDS + 1, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    d = build_distiller("gkd", logits="teacher_centers", scale=16.0, student_dim=D, teacher_dim=D)
    assert d.requires == frozenset({"teacher_centers"})
    got = d(s, t, LABELS, teacher_centers=centres)
    w = F.normalize(centres)
    zs, zt = 16.0 * F.normalize(s) @ w.t(), 16.0 * F.normalize(t) @ w.t()
    want = build_distiller("gkd")(s, t, LABELS, student_logits=zs, teacher_logits=zt)
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-10)
    with pytest.raises(ConfigError, match="widths must match"):
        build_distiller("gkd", logits="teacher_centers", student_dim=8, teacher_dim=16)


def test_gkd_refuses_mismatched_logits_and_bad_params():
    d = build_distiller("gkd")
    with pytest.raises(ConfigError, match="needs student_logits, teacher_logits"):
        d(torch.randn(N, D), torch.randn(N, D), LABELS)
    with pytest.raises(ConfigError, match="same identities"):
        d(torch.randn(N, D), torch.randn(N, D), LABELS, student_logits=torch.randn(N, 5),
          teacher_logits=torch.randn(N, 6))
    for bad in ({"rate": 0.0}, {"group_by": "both"}, {"logits": "features"}, {"primary_weight": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_distiller("gkd", **bad)


def test_gkd_paper_defaults():
    p = distiller_params("gkd")
    assert (p["temperature"], p["rate"], p["binary_weight"], p["primary_weight"],
            p["secondary_weight"], p["group_by"], p["logits"]) == (4.0, 0.93, 1.0, 8.0, 0.0, "student",
                                                                    "heads")


# --------------------------------------------------------------------------- degenerate batches

VARIANTS = {"gkd_centres_teacher_groups": ("gkd", {"logits": "teacher_centers", "group_by": "teacher"}),
            "coupleface_rad_only": ("coupleface", {"fcd_weight": 0.0, "top_k": 1})}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_non_default_variants_finite_on_degenerate_batches(variant, case):
    """The default settings are covered by test_degenerate (registry-wide); these are the others."""
    name, params = VARIANTS[variant]
    s, t, labels = _batch(case)
    dim = s.shape[1]
    d = build_distiller(name, **params, student_dim=dim, teacher_dim=dim)
    s = s.clone().requires_grad_(True)
    extras = {"teacher_centers": torch.randn(10, dim, generator=torch.Generator().manual_seed(1))}
    terms = d(s, t, labels, **{k: extras[k] for k in d.requires})
    total = sum(terms.values())
    (grad,) = torch.autograd.grad(total, [s])
    assert torch.isfinite(total) and torch.isfinite(grad).all(), (variant, case, terms)
    assert float(grad.abs().max()) <= 1e6
