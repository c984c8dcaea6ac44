"""``icd_face`` and ``unified_kd``: values and gradients against a float64 computation written
here from the equations of docs/methods.md (loops over pairs, no code shared with the package),
the checkpointed memory, refusals, and 2 Gloo processes fed as the trainer feeds them."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from ekd.config import Config, DistillerConfig
from ekd.distill import build_distiller
from ekd.engine.distill_inputs import build_distillers
from ekd.errors import ConfigError

N, IDS, D, MEM = 8, 4, 6, 10


def _batches(steps: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        s = torch.randn(N, D, generator=g, dtype=torch.float64)
        t = torch.randn(N, D, generator=g, dtype=torch.float64)
        y = torch.randperm(N, generator=g) % IDS + (step % 2)  # labels shift: bank pairs vary
        out.append((s, t, y))
    return out


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_norm(a) * _norm(b)).sum()


class _Bank:
    """The reference FIFO: a list of (unit student, unit teacher, label), oldest first."""

    def __init__(self, size: int) -> None:
        self.size, self.rows = size, []

    def push(self, s, t, y) -> None:
        for i in range(len(y)):
            self.rows.append((_norm(s[i].detach()), _norm(t[i].detach()), int(y[i])))
        self.rows = self.rows[-self.size:]


def _ref_icd(s, t, y, bank: _Bank, bins: int = 101, eps: float = 1e-6):
    fcd = sum(((_norm(s[i]) - _norm(t[i])) ** 2).sum() for i in range(N)) / N
    ps, pt = [], []
    for i in range(N):
        for j in range(i + 1, N):
            if y[i] == y[j]:
                ps.append(_cos(s[i], s[j]))
                pt.append(_cos(t[i], t[j]))
        for bs, bt, by in bank.rows:
            if int(y[i]) == by:
                ps.append(_cos(s[i], bs))
                pt.append(_cos(t[i], bt))
    delta = 2.0 / (bins - 1)

    def hist(sims):
        return [sum(torch.clamp(1 - torch.abs(x - (-1 + r * delta)) / delta, min=0) for x in sims) / len(sims)
                for r in range(bins)]

    h_s, h_t = hist(ps), hist(pt)
    sdc = sum(h_t[r] * (torch.log(h_t[r] + eps) - torch.log(h_s[r] + eps)) for r in range(bins))
    return fcd, sdc


def _ref_unified(s, t, bank: _Bank, hard_weight: float = 1.0):
    d = [((_norm(s[i]) - _norm(t[i])) ** 2).sum() for i in range(N)]
    e = []
    for i in range(N):
        for j in range(i + 1, N):
            e.append((_cos(s[i], s[j]) - _cos(t[i], t[j])) ** 2)
        for bs, bt, _ in bank.rows:
            e.append((_cos(s[i], bs) - _cos(t[i], bt)) ** 2)

    def mined(values):
        mean = sum(v.item() for v in values) / len(values)
        return sum(v * (1 + hard_weight * (v.item() >= mean)) for v in values) / len(values)

    return mined(d), mined(e)


@pytest.mark.parametrize("name", ["icd_face", "unified_kd"])
def test_loss_and_gradient_match_the_equations_over_steps(name):
    distiller = build_distiller(name, memory_size=MEM, student_dim=D, teacher_dim=D).double()
    bank = _Bank(MEM)
    for step, (s0, t, y) in enumerate(_batches()):  # 8 + 8 + 8 > 10: the memory wraps around
        s = s0.clone().requires_grad_(True)
        terms = distiller(s, t, y)
        (got_grad,) = torch.autograd.grad(sum(terms.values()), [s])
        r = s0.clone().requires_grad_(True)
        want = _ref_icd(r, t, y, bank) if name == "icd_face" else _ref_unified(r, t, bank)
        (want_grad,) = torch.autograd.grad(sum(want), [r])
        keys = ["icd_face_fcd", "icd_face_sdc"] if name == "icd_face" else ["unified_kd_iled", "unified_kd_rpsd"]
        assert list(terms) == keys
        for k, w in zip(keys, want):
            assert terms[k].item() == pytest.approx(w.item(), rel=1e-8, abs=1e-12), (step, k)
        assert torch.allclose(got_grad, want_grad, rtol=1e-8, atol=1e-12), step
        bank.push(s0, t, y)
    want_s = torch.stack([row[0] for row in bank.rows])
    got_s, got_t, got_y = distiller.memory.contents(torch.float64)
    order = torch.argsort((torch.arange(MEM) - distiller.memory.next) % MEM)  # slots, oldest first
    assert torch.allclose(got_s[order], want_s) and got_y[order].tolist() == [row[2] for row in bank.rows]


def test_icd_face_first_step_without_positive_pairs_is_zero_sdc_and_bank_supplies_them_later():
    d = build_distiller("icd_face", memory_size=16, student_dim=D, teacher_dim=D)
    s, t = torch.randn(4, D), torch.randn(4, D)
    first = d(s, t, torch.arange(4))
    assert first["icd_face_sdc"].item() == 0.0  # all distinct, empty bank: no positive pair yet
    second = d(torch.randn(4, D), torch.randn(4, D), torch.arange(4))
    assert second["icd_face_sdc"].item() > 0.0  # the bank holds one sample of each identity


def test_sdc_prefers_the_teacher_compactness():
    """A student as compact as the teacher within identities gets a lower SDC than a diffuse one."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(IDS, 32, generator=g)
    y = torch.arange(32) % IDS
    t = centres[y] + 0.3 * torch.randn(32, 32, generator=g)
    compact = centres[y] + 0.3 * torch.randn(32, 32, generator=g)
    diffuse = centres[y] + 3.0 * torch.randn(32, 32, generator=g)
    sdc = lambda s: build_distiller("icd_face", memory_size=0, fcd_weight=0.0)(s, t, y)["icd_face_sdc"]  # noqa: E731
    assert sdc(compact) < sdc(diffuse)


@pytest.mark.parametrize("name", ["icd_face", "unified_kd"])
def test_memory_survives_state_dict_round_trip(name):
    a = build_distiller(name, memory_size=12, student_dim=D, teacher_dim=D)
    for s, t, y in _batches(seed=5):
        a(s.float(), t.float(), y)
    b = build_distiller(name, memory_size=12, student_dim=D, teacher_dim=D)
    b.load_state_dict(a.state_dict())
    s, t, y = _batches(1, seed=9)[0]
    out_a, out_b = a(s.float(), t.float(), y), b(s.float(), t.float(), y)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    fresh = build_distiller(name, memory_size=12, student_dim=D, teacher_dim=D)(s.float(), t.float(), y)
    assert any(not torch.equal(out_a[k], fresh[k]) for k in out_a)  # the memory mattered


@pytest.mark.parametrize("name,term", [("icd_face", "fcd_weight"), ("unified_kd", "iled_weight")])
def test_different_widths_are_refused_unless_the_instance_term_is_off(name, term):
    cfg = Config()
    cfg.model.embedding_size = 8
    cfg.distill = [DistillerConfig(name=name)]
    with pytest.raises(ConfigError, match=f"widths must match.*{term}: 0"):
        build_distillers(cfg, teacher_dim=16, num_classes=4)
    cfg.distill = [DistillerConfig(name=name, params={term: 0.0, "memory_size": 8})]
    (d,) = build_distillers(cfg, teacher_dim=16, num_classes=4)
    assert d.memory.student.shape == (8, 8) and d.memory.teacher.shape == (8, 16)
    terms = d(torch.randn(5, 8), torch.randn(5, 16), torch.arange(5) % 2)
    assert len(terms) == 1 and all(torch.isfinite(v) for v in terms.values())


def test_bad_parameters_name_the_key():
    with pytest.raises(ConfigError, match="memory_size must be an integer >= 0"):
        build_distiller("unified_kd", memory_size=-1, student_dim=4, teacher_dim=4)
    with pytest.raises(ConfigError, match="memory_size > 0 needs student_dim"):
        build_distiller("icd_face")
    with pytest.raises(ConfigError, match="bins must be an integer >= 2"):
        build_distiller("icd_face", bins=1, memory_size=0)
    with pytest.raises(ConfigError, match="hard_weight must be >= 0"):
        build_distiller("unified_kd", hard_weight=-1.0, memory_size=0)
    with pytest.raises(ConfigError, match="valid: fcd_weight"):
        build_distiller("icd_face", lambda_sdc=1.0)


# --------------------------------------------------------------------------- 2 processes

DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from ekd.distill import build_distiller
    from ekd.heads.partial_fc import gather_global_batch

    def run(rank, name, path, out):
        dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
        batches = torch.load(out + ".batches", weights_only=True)
        d = build_distiller(name, memory_size=10, student_dim=6, teacher_dim=6).double()
        record = []
        for s, t, y in batches:  # the trainer: local rows, gathered into the global batch
            local = s.chunk(2)[rank].clone().requires_grad_(True)
            all_s, all_y = gather_global_batch(local, y.chunk(2)[rank])
            all_t = torch.cat([p.contiguous() for p in t.chunk(2)])  # the trainer's no-grad gather
            terms = d(all_s, all_t, all_y)
            sum(terms.values()).backward()
            record.append(({k: v.detach() for k, v in terms.items()}, local.grad))
        torch.save({"record": record, "state": d.state_dict()}, out + f".{rank}")
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.start_processes(run, args=tuple(sys.argv[1:4]), nprocs=2, start_method="fork")
""")


@pytest.mark.parametrize("name", ["icd_face", "unified_kd"])
def test_two_processes_equal_one_process_on_the_global_batch(name, tmp_path):
    batches = _batches()
    out = str(tmp_path / "run")
    torch.save(batches, out + ".batches")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), name, str(tmp_path / "rendezvous"), out],
                   check=True, timeout=120, capture_output=True)
    one = build_distiller(name, memory_size=10, student_dim=6, teacher_dim=6).double()
    ranks = [torch.load(out + f".{r}", weights_only=True) for r in (0, 1)]
    for step, (s0, t, y) in enumerate(batches):
        s = s0.clone().requires_grad_(True)
        terms = one(s, t, y)
        sum(terms.values()).backward()
        for r, got in enumerate(ranks):
            got_terms, got_grad = got["record"][step]
            for k, v in terms.items():
                assert math.isclose(got_terms[k].item(), v.item(), rel_tol=1e-12, abs_tol=1e-15), (step, k)
            # the gather's backward sums the 2 ranks' identical losses; DDP then averages
            assert torch.allclose(got_grad / 2, s.grad.chunk(2)[r], rtol=1e-10, atol=1e-14), (step, r)
    for got in ranks:
        assert got["state"].keys() == one.state_dict().keys()
        assert all(torch.equal(got["state"][k], v) for k, v in one.state_dict().items())


# --------------------------------------------------------------------------- through the trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """An embedding-only teacher: a cache of a random projection over a tiny identity folder."""
    from ekd.data import ImageFolderDataset, generate_identity_folder
    from ekd.teachers.cache_builder import build_cache

    root = tmp_path_factory.mktemp("faces") / "train"
    generate_identity_folder(root, num_identities=6, images_per_identity=4, image_size=32, seed=5)
    proj = torch.randn(3 * 32 * 32, 12, generator=torch.Generator().manual_seed(0))
    cache = build_cache(lambda x: x.flatten(1) @ proj, ImageFolderDataset(root, input_size=32),
                        root.parent / "cache", teacher_fp="t", teacher_name="random projection",
                        progress=False)
    return root, cache


def _overrides(root, cache, out, *extra):
    return ["data.kind=folder", f"data.root={root}", "data.input_size=32", "model.embedding_size=12",
            "sampler.random_size=8", "sampler.identities_per_batch=2", "train.epochs=1",
            "train.progress=false", "train.device=cpu", f"train.output_dir={out}",
            "train.max_steps_per_epoch=2", "teacher.kind=cache", f"teacher.path={cache}", *extra]


@pytest.mark.parametrize("name", ["icd_face", "unified_kd"])
def test_trains_from_cached_embeddings_and_resumes_with_its_memory(name, cached, tmp_path):
    from ekd.config import load_config
    from ekd.engine.trainer import Trainer
    from ekd.utils.checkpoint_io import load_file

    root, cache = cached
    spec = f"distill=[{{name: {name}, params: {{memory_size: 64}}}}]"
    trainer = Trainer(load_config(None, _overrides(root, cache, tmp_path / "a", spec)))
    result = trainer.fit()  # an embedding-only teacher is enough: no class centres needed
    assert all(math.isfinite(v) for v in result.final_terms.values())
    last = result.run_dir / "checkpoints" / "last.pt"
    saved = load_file(last)["distillers"]
    memory = trainer.distillers[0].memory
    assert int((memory.labels >= 0).sum()) > 0
    assert torch.equal(saved["0.memory.student"], memory.student)
    assert torch.equal(saved["0.memory.labels"], memory.labels)
    resumed = Trainer(load_config(None, _overrides(root, cache, tmp_path / "b", spec, f"train.resume={last}")))
    assert all(torch.equal(v, saved[k]) for k, v in resumed.distillers.state_dict().items())


def test_cached_teacher_of_another_width_is_refused_at_start(cached, tmp_path):
    from ekd.config import load_config
    from ekd.engine.trainer import Trainer

    root, cache = cached
    cfg = load_config(None, _overrides(root, cache, tmp_path / "w", "model.embedding_size=8",
                                       "distill=[{name: icd_face}]"))
    with pytest.raises(ConfigError, match="icd_face.*widths must match: student 8, teacher 12"):
        Trainer(cfg)
