"""CoupleFace and GKD through the trainer (what each needs from the teacher, refusals under
Partial FC and for embedding-only teachers) and on two Gloo processes fed as the trainer feeds
them (local halves gathered into the global batch) = one process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ekd.config import load_config
from ekd.errors import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
from test_teacher_centers import cached  # noqa: E402,F401  (fixture: a 6-identity embedding cache)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


# --------------------------------------------------------------------------- through the trainer

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ekd.data import generate_identity_folder
    from test_zoo_training import _teacher

    root = tmp_path_factory.mktemp("zoo_v2") / "train"
    generate_identity_folder(root, num_identities=12, images_per_identity=2, image_size=32, seed=3)
    return root, _teacher(root.parent / "teacher.pt"), _teacher(root.parent / "backbone.pth", classes=None)


def _cfg(tiny, tmp_path, distill: str, *extra: str):
    from test_zoo_training import _tiny

    root, teacher, _ = tiny
    return load_config(None, _tiny(root, teacher, tmp_path / "run") + [f"distill={distill}", *extra])


def test_gkd_with_heads_is_refused_under_partial_fc_but_teacher_centres_run(tiny, tmp_path):
    from ekd.engine.trainer import Trainer

    with pytest.raises(ConfigError, match="gkd need the student's full classifier.*Partial FC"):
        Trainer(_cfg(tiny, tmp_path, "[{name: gkd}]", "head.sample_rate=0.5"))
    trainer = Trainer(_cfg(tiny, tmp_path, "[{name: gkd, params: {logits: teacher_centers}}, "
                                            "{name: coupleface}]", "head.sample_rate=0.5"))
    images, labels, indices = next(iter(trainer.loader))
    terms = trainer.train_step(images, labels, indices, torch.zeros(len(labels), dtype=torch.bool))
    assert {"ce", "gkd_binary", "gkd_primary", "coupleface_fcd", "coupleface_rad"} <= set(terms)
    assert all(np.isfinite(v) for v in terms.values())


def test_gkd_needs_the_teachers_classifier(tiny, tmp_path):
    from ekd.engine.trainer import Trainer

    root, _, bare = tiny
    cfg = _cfg(tiny, tmp_path, "[{name: gkd}]", f"teacher.path={bare}")
    with pytest.raises(ConfigError, match="'gkd' needs the teacher's classifier.*backbone.pth"):
        Trainer(cfg)
    trainer = Trainer(_cfg(tiny, tmp_path, "[{name: coupleface}]", f"teacher.path={bare}"))
    assert trainer.teacher_centers is None


# --------------------------------------------------------------------------- two processes

TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from ekd.distill import build_distiller
    from ekd.utils.distributed import DistInfo, gather_no_grad
    from ekd.heads.partial_fc import gather_global_batch

    CONFIGS = {"coupleface": {"top_k": 3}, "gkd": {"logits": "teacher_centers", "scale": 16.0},
               "gkd_teacher_groups": {"logits": "teacher_centers", "group_by": "teacher", "rate": 0.5}}

    def batch():
        g = torch.Generator().manual_seed(11)
        s = torch.randn(12, 6, generator=g, dtype=torch.float64)
        t = s + 0.5 * torch.randn(12, 6, generator=g, dtype=torch.float64)
        centres = torch.randn(5, 6, generator=g, dtype=torch.float64)
        return s, t, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 1]), centres

    def step(world, rank):
        # as Trainer.compute_terms: the local slice is gathered into the global batch, every
        # rank's distillers see the whole global batch; DDP then averages the gradients
        s, t, y, centres = batch()
        per = s.shape[0] // world
        local = s[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        info = DistInfo(rank=rank, world_size=world)
        all_s, all_y = gather_global_batch(local, y[rank * per:(rank + 1) * per])
        all_t = gather_no_grad(t[rank * per:(rank + 1) * per], info)
        out = {}
        for key, params in CONFIGS.items():
            d = build_distiller(key.split("_")[0], **params, student_dim=6, teacher_dim=6)
            extras = {"teacher_centers": centres}
            terms = d(all_s, all_t, all_y, **{k: extras[k] for k in d.requires})
            loss = sum(terms.values())
            (grad,) = torch.autograd.grad(loss, [local])
            out[key] = (loss.detach(), grad / world, {k: v.detach() for k, v in d.state_dict().items()})
        return out

    def run(rank, path, out):
        dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
        torch.save(step(2, rank), out + f".{rank}")
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.set_num_threads(1)
        mp.start_processes(run, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
        torch.save(step(1, 0), sys.argv[2] + ".single")  # after the fork: no OpenMP pool to inherit
""")


def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    out = str(tmp_path / "result")
    subprocess.run([sys.executable, str(script), str(tmp_path / "rendezvous"), out],
                   check=True, timeout=120, capture_output=True)
    single = torch.load(out + ".single", weights_only=True)
    ranks = [torch.load(out + f".{r}", weights_only=True) for r in (0, 1)]
    for key, (loss, grad, state) in single.items():
        assert torch.isfinite(loss) and grad.abs().sum() > 0, key
        for rank, result in enumerate(ranks):
            r_loss, r_grad, r_state = result[key]
            assert torch.allclose(r_loss, loss, rtol=1e-12, atol=0), (key, rank)
            assert torch.allclose(r_grad, grad[rank * 6:(rank + 1) * 6], rtol=1e-10, atol=1e-15), (key, rank)
            assert r_state.keys() == state.keys() and all(torch.equal(r_state[k], state[k]) for k in state)


def test_cached_teacher_gkd_needs_mean_centres_and_coupleface_needs_nothing(cached, tmp_path):
    """An embedding cache has no classifier: GKD is refused naming the missing classifier, and runs
    on ``teacher.centers: mean_embedding`` centres (the same refusal guards ``logits:
    teacher_centers``: one check for every distiller needing centres); CoupleFace needs embeddings
    only."""
    from ekd.engine.trainer import Trainer
    from test_teacher_centers import _overrides as cache_overrides

    root, _, cache = cached

    def step(distill: str, *extra: str) -> dict:
        trainer = Trainer(load_config(None, cache_overrides(root, cache, tmp_path / "run",
                                                            f"distill={distill}", *extra)))
        images, labels, indices = next(iter(trainer.loader))
        return trainer.train_step(images, labels, indices, torch.zeros(len(labels), dtype=torch.bool))

    with pytest.raises(ConfigError, match="'gkd' needs the teacher's classifier.*embedding cache"):
        step("[{name: gkd}]")
    terms = step("[{name: gkd, params: {logits: teacher_centers}}]", "teacher.centers=mean_embedding")
    assert {"gkd_binary", "gkd_primary"} <= set(terms) and all(np.isfinite(v) for v in terms.values())
    terms = step("[{name: coupleface}]")
    assert {"coupleface_fcd", "coupleface_rad"} <= set(terms) and all(np.isfinite(v) for v in terms.values())
