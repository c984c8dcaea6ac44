"""The distillation zoo: parity with the EKD authors' baselines, edge batches, toy optimisation,
the extras contract and AdaDistill's centre updates (issue 3)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ekd.distill import DISTILLERS, EXTRAS, build_distiller, distiller_params
from ekd.distill.adadistill import AdaDistillLoss, sequential_ema
from ekd.errors import ConfigError
from ekd.heads import ArcFace

ZOO = ["fitnet", "kd", "darkrank", "sp", "cckd", "rkd", "cosine", "shrinkteanet",
       "triplet_distill", "margin_distill", "proxylesskd", "adadistill", "coupleface", "gkd",
       "icd_face", "unified_kd"]
DIM, CLASSES, SCALE = 16, 10, 16.0


# --------------------------------------------------------------------------- parity

@pytest.fixture(scope="module")
def vectors(testvectors):
    return dict(np.load(testvectors / "distill_reference.npz"))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# key in the npz -> (distiller, params): the authors' conventions (see testvectors/README.md)
PARITY = {"rkd": ("rkd", {}), "cckd": ("cckd", {"order": 1}), "sp": ("sp", {}),
          "darkrank": ("darkrank", {}), "kd_t4": ("kd", {"temperature": 4.0}),
          "cosine": ("cosine", {}), "fitnet": ("fitnet", {})}


@pytest.mark.parametrize("key", sorted(PARITY))
def test_baseline_parity_loss_and_gradient(vectors, key):
    name, params = PARITY[key]
    loss_fn = build_distiller(name, **params).double()
    student = torch.tensor(vectors["baseline/student"], requires_grad=True)
    teacher = torch.tensor(vectors["baseline/teacher"])
    labels = torch.tensor(vectors["baseline/labels"])
    extras, wrt = {}, student
    if name == "kd":
        wrt = torch.tensor(vectors["baseline/student_logits"], requires_grad=True)
        extras = {"student_logits": wrt, "teacher_logits": torch.tensor(vectors["baseline/teacher_logits"])}
    loss = sum(loss_fn(student, teacher, labels, **extras).values())
    loss.backward()
    assert _rel(loss.detach().numpy(), vectors[f"baseline/{key}/loss"]) < 1e-8
    assert _rel(wrt.grad.numpy(), vectors[f"baseline/{key}/grad_student"]) < 1e-8


def test_every_baseline_in_the_vectors_is_tested(vectors):
    keys = {k.split("/")[1] for k in vectors if k.startswith("baseline/") and k.count("/") == 2}
    assert keys == set(PARITY)


def test_cckd_default_is_the_papers_second_order():
    torch.manual_seed(0)
    s, t = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    g = 0.8
    sim = lambda x: F.normalize(x) @ F.normalize(x).t()  # noqa: E731
    k = lambda x: np.exp(-g) * (1 + g * sim(x) + g * g / 2 * sim(x) ** 2)  # noqa: E731
    want = F.mse_loss(k(s), k(t))
    assert build_distiller("cckd")(s, t, None)["cckd"].item() == pytest.approx(want.item(), rel=1e-12)


def test_registry_names_and_paper_defaults():
    assert set(ZOO) | {"ekd"} == set(DISTILLERS)
    p = {n: distiller_params(n) for n in ZOO}
    assert (p["rkd"]["distance_weight"], p["rkd"]["angle_weight"]) == (25.0, 50.0)
    assert (p["darkrank"]["alpha"], p["darkrank"]["beta"], p["darkrank"]["list_length"]) == (3.0, 3.0, 3)
    assert (p["cckd"]["gamma"], p["cckd"]["order"]) == (0.4, 2)
    assert p["kd"]["temperature"] == 4.0
    assert (p["triplet_distill"]["m_min"], p["triplet_distill"]["m_max"]) == (0.2, 0.5)
    md, ada = p["margin_distill"], p["adadistill"]
    assert (md["scale"], md["m_min"], md["m_max"]) == (64.0, 0.2, 0.5)
    assert (ada["kind"], ada["scale"], ada["margin"], ada["hard_weighting"]) == ("arcface", 64.0, 0.45, True)
    for name in ZOO:
        assert DISTILLERS[name].requires <= EXTRAS, name


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid: distance_weight"):
        build_distiller("rkd", dist_weight=1.0)


# --------------------------------------------------------------------------- every method

def make(name: str, dim: int = DIM, **params) -> torch.nn.Module:
    auto = {"num_classes": CLASSES, "student_dim": dim, "teacher_dim": dim}
    accepted = distiller_params(name)
    return build_distiller(name, **{k: v for k, v in auto.items() if k in accepted}, **params)


class Extras:
    """What the trainer would provide: fixed class centres, a student margin head."""

    def __init__(self, dim: int = DIM, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.teacher_centers = torch.randn(CLASSES, dim, generator=gen)
        self.head = ArcFace(dim, CLASSES, scale=SCALE, margin=0.5)
        self.head.weight.data = torch.randn(CLASSES, dim, generator=gen)

    def __call__(self, name: str, s: torch.Tensor, t: torch.Tensor) -> dict:
        out = {}
        req = DISTILLERS[name].requires
        if "student_logits" in req:
            w = F.normalize(self.head.weight.to(s.dtype))
            out["student_logits"] = F.linear(F.normalize(s), w).clamp(-1, 1) * SCALE
        if "teacher_logits" in req:
            w = F.normalize(self.teacher_centers.to(t.dtype))
            out["teacher_logits"] = F.linear(F.normalize(t), w).clamp(-1, 1) * SCALE
        if "teacher_centers" in req:
            out["teacher_centers"] = self.teacher_centers
        if "student_head" in req:
            out["student_head"] = self.head
        return out


def _edge_batches() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, DIM, generator=gen), torch.randn(12, DIM, generator=gen)
    zero_s, zero_t = s.clone(), t.clone()
    zero_s[[0, 5]] = 0.0
    zero_t[[1, 5]] = 0.0
    dup = torch.cat([s[:4]] * 3)
    return {
        "one_identity": (s, t, torch.zeros(12, dtype=torch.long)),
        "all_distinct": (s[:CLASSES], t[:CLASSES], torch.arange(CLASSES)),
        "duplicated_samples": (dup, torch.cat([t[:4]] * 3), torch.arange(12) % 4),
        "zero_norm": (zero_s, zero_t, torch.arange(12) // 3),
        "pair": (s[:2], t[:2], torch.tensor([3, 3])),
    }


@pytest.mark.parametrize("case", sorted(_edge_batches()))
@pytest.mark.parametrize("name", ZOO + ["ekd"])
def test_finite_loss_and_gradients_on_edge_batches(name, case):
    s0, t, labels = _edge_batches()[case]
    s = s0.clone().requires_grad_(True)
    distiller, extras = make(name), Extras()
    terms = distiller(s, t, labels, **extras(name, s, t))
    assert terms and all(k.startswith(name) for k in terms), terms.keys()
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss), (name, case, terms)
    assert s.grad is not None and torch.isfinite(s.grad).all(), (name, case)


# methods whose loss is a discrepancy that vanishes when the student reproduces the teacher
MIMIC = ["fitnet", "kd", "sp", "cckd", "rkd", "cosine", "shrinkteanet", "ekd", "coupleface", "gkd",
         "icd_face", "unified_kd"]


@pytest.mark.parametrize("name", MIMIC)
def test_zero_loss_when_student_equals_teacher(name):
    torch.manual_seed(0)
    e = torch.randn(24, DIM, dtype=torch.float64)
    labels = torch.arange(24) // 4
    extras = Extras()
    extras.head.weight.data = extras.teacher_centers.clone()  # same centres -> same logits
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in extras(name, e, e).items()}
    terms = make(name).double()(e, e.clone(), labels, **kw)
    assert all(abs(v.item()) < 1e-10 for v in terms.values()), terms


def test_darkrank_is_lower_for_the_teacher_than_for_a_random_student():
    torch.manual_seed(0)
    t, labels = torch.randn(32, DIM), torch.arange(32) // 4
    d = make("darkrank")
    assert d(t.clone(), t, labels)["darkrank"] < d(torch.randn(32, DIM), t, labels)["darkrank"]


@pytest.mark.parametrize("name", ZOO + ["ekd"])
def test_one_gradient_step_on_a_toy_problem_lowers_the_loss(name):
    torch.manual_seed(0)
    x = torch.randn(32, 24)
    labels = torch.arange(32) // 4
    teacher_map = torch.randn(24, DIM)
    extras = Extras()
    t = x @ teacher_map
    w = (teacher_map + 0.8 * torch.randn(24, DIM)).requires_grad_(True)
    start = make(name)
    modules = [start] + ([extras.head] if name == "kd" else [])

    def loss_at(weights: torch.Tensor, distiller: torch.nn.Module) -> torch.Tensor:
        s = x @ weights
        return sum(distiller(s, t, labels, **extras(name, s, t)).values())

    before_fn = copy.deepcopy(start)
    before = loss_at(w, before_fn)
    params = [w] + [p for m in modules for p in m.parameters()]
    grads = torch.autograd.grad(before, params, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    with torch.no_grad():
        step = 1e-3 * w.norm() / grads[0].norm()
        w_after = w - step * grads[0]
    after = loss_at(w_after, copy.deepcopy(start))
    assert after.item() < before.item(), (name, before.item(), after.item())


# --------------------------------------------------------------------------- specifics

def test_fitnet_learns_a_regressor_when_widths_differ():
    d = build_distiller("fitnet", student_dim=8, teacher_dim=16)
    assert d.regressor is not None and d.regressor.weight.shape == (16, 8)
    s, t = torch.randn(5, 8), torch.randn(5, 16)
    d(s, t, torch.arange(5))["fitnet"].backward()
    assert d.regressor.weight.grad is not None
    with pytest.raises(ConfigError, match="student_dim and teacher_dim"):
        build_distiller("fitnet")(s, t, torch.arange(5))
    assert build_distiller("fitnet", student_dim=16, teacher_dim=16).regressor is None


def test_shared_space_methods_refuse_different_widths():
    for name in ("margin_distill", "proxylesskd", "adadistill"):
        with pytest.raises(ConfigError, match="widths must match"):
            extra = {"num_classes": 3} if name == "adadistill" else {}
            build_distiller(name, student_dim=8, teacher_dim=16, **extra)


def test_missing_extra_is_a_config_error():
    with pytest.raises(ConfigError, match="needs student_logits, teacher_logits"):
        build_distiller("kd")(torch.randn(4, 8), torch.randn(4, 8), torch.arange(4))


def test_rkd_chunked_angle_equals_one_block():
    torch.manual_seed(0)
    s = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(20, 6, dtype=torch.float64), torch.arange(20)
    grads = []
    for chunk in (7 * 400, 1 << 20):  # several blocks vs one
        s.grad = None
        loss = sum(build_distiller("rkd", chunk_elements=chunk)(s, t, y).values())
        loss.backward()
        grads.append((loss.item(), s.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-14)


def _expected_triplet_margins(t: torch.Tensor, y: torch.Tensor, m_min=0.2, m_max=0.5):
    """Per (anchor, positive) pair, the list of margins m(a, p, n) over its negatives, by the
    paper's formula written as loops: m_min + (m_max - m_min) * gap / D_max."""
    u = (t / t.norm(dim=1, keepdim=True)).double()
    d = ((u[:, None] - u[None]) ** 2).sum(-1)  # squared L2 of unit vectors
    gaps = {(a, p): [max(0.0, float(d[a, n] - d[a, p])) for n in range(len(y)) if y[n] != y[a]]
            for a in range(len(y)) for p in range(len(y)) if p != a and y[p] == y[a]}
    d_max = max(g for row in gaps.values() for g in row)
    return {k: [m_min + (m_max - m_min) * g / d_max if d_max > 0 else m_min for g in row]
            for k, row in gaps.items()}


def test_triplet_margins_follow_the_teacher():
    """A collapsed student (d_s = 0 everywhere) pays exactly the margin of every triplet, so the
    loss is the mean margin (mining all) or the mean largest margin per pair (mining hard)."""
    torch.manual_seed(0)
    t, y = torch.randn(16, DIM), torch.arange(16) // 4
    collapsed = torch.ones(16, DIM)
    margins = _expected_triplet_margins(t, y)
    want_all = np.mean([m for row in margins.values() for m in row])
    want_hard = np.mean([max(row) for row in margins.values()])
    assert 0.2 < want_all < want_hard <= 0.5  # the margins really vary with the teacher
    assert make("triplet_distill")(collapsed, t, y)["triplet_distill"].item() == \
        pytest.approx(want_all, abs=1e-5)
    assert make("triplet_distill", mining="hard")(collapsed, t, y)["triplet_distill"].item() == \
        pytest.approx(want_hard, abs=1e-5)
    # the teacher separates every negative equally: every margin is m_max
    square = torch.eye(4, DIM).repeat_interleave(2, dim=0)  # 4 identities, 2 equal images each
    y4 = torch.arange(8) // 2
    assert make("triplet_distill")(torch.ones(8, DIM), square, y4)["triplet_distill"].item() == \
        pytest.approx(0.5, abs=1e-6)
    # the teacher puts positives farther than negatives: no gap anywhere, every margin is m_min
    swapped = torch.eye(4, DIM)[[0, 1, 1, 0, 2, 3, 3, 2]]
    assert make("triplet_distill")(torch.ones(8, DIM), swapped, y4)["triplet_distill"].item() == \
        pytest.approx(0.2, abs=1e-6)
    assert make("triplet_distill")(t, t, torch.zeros(16, dtype=torch.long))["triplet_distill"] == 0


def test_margin_distill_margins_span_the_range():
    d = make("margin_distill")
    centres = torch.eye(4, DIM)
    off_centre = torch.tensor([0.0, 0.5, 1.0, 3.0])[:, None] * torch.eye(4, DIM)[[1, 2, 3, 0]]
    teacher = centres + off_centre  # sample 3 is farthest from its centre
    m = d.margins(teacher, centres, torch.arange(4))
    assert m.max().item() == pytest.approx(0.5) and (m >= 0.2).all() and m.argmin() == 3


# --------------------------------------------------------------------------- AdaDistill

def test_sequential_ema_matches_a_loop_over_samples():
    torch.manual_seed(0)
    centres = torch.randn(5, 4, dtype=torch.float64)
    targets = F.normalize(torch.randn(9, 4, dtype=torch.float64))
    labels = torch.tensor([3, 1, 3, 0, 3, 1, 4, 0, 3])
    alpha = torch.rand(9, dtype=torch.float64).clamp_min(1e-6)
    want = centres.clone()
    for i in range(9):
        want[labels[i]] = alpha[i] * want[labels[i]] + (1 - alpha[i]) * targets[i]
    got = centres.clone()
    sequential_ema(got, targets, labels, alpha)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_adadistill_update_matches_the_papers_rule_without_duplicates():
    torch.manual_seed(0)
    d = AdaDistillLoss(num_classes=6, teacher_dim=8).double()
    old = d.centres.clone()
    s, t = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    y = torch.tensor([5, 0, 2, 3])
    d(s, t, y)
    th = F.normalize(t)
    lam = F.cosine_similarity(old[y], th).clamp(1e-6, 1)
    a = (F.cosine_similarity(s, th).clamp(-1, 1) * lam).clamp(1e-6, 1)
    want = old.clone()
    want[y] = a[:, None] * old[y] + (1 - a[:, None]) * th
    assert torch.allclose(d.centres, want, rtol=1e-12, atol=1e-15)
    assert "centres" in d.state_dict() and not list(d.parameters())


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from ekd.distill.adadistill import AdaDistillLoss

    def run(rank, path, out):
        dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
        torch.manual_seed(100 + rank)  # every rank sees a different batch
        d = AdaDistillLoss(num_classes=7, teacher_dim=8, seed=0)
        if rank == 1:
            d.centres.add_(1.0)  # a diverged copy must be overwritten by rank 0's on step 1
        for _ in range(3):
            n = 5 + rank  # unequal batch sizes
            s = torch.randn(n, 8, requires_grad=True)
            loss = d(s, torch.randn(n, 8), torch.randint(0, 7, (n,)))["adadistill"]
            loss.backward()
        torch.save(d.centres, out + f".{rank}")
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.start_processes(run, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
""")


def test_adadistill_centres_stay_identical_across_ranks(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = str(tmp_path / "centres")
    subprocess.run([sys.executable, str(script), str(tmp_path / "rendezvous"), out],
                   check=True, timeout=120, capture_output=True)
    c0, c1 = torch.load(out + ".0"), torch.load(out + ".1")
    assert torch.equal(c0, c1)
    assert not torch.equal(c0, AdaDistillLoss(num_classes=7, teacher_dim=8, seed=0).centres)
