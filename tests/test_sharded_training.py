"""Through the trainer: gradient clipping (``optim.clip_grad_norm``), the classifier-based
distillers under Partial FC (class-sharded teacher centres, sampled negatives) and the refusal
of class-based methods without shard support."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ekd.config import load_config
from ekd.distill import Distiller
from ekd.engine.distill_inputs import check_sharding
from ekd.engine.trainer import Trainer
from ekd.errors import ConfigError
from ekd.utils.checkpoint_io import load_file
from test_scale import _free_port, calibrate_and_freeze_bn, torchrun_env
from test_zoo_training import EMB, IDS, SIZE, _teacher, _tiny, folder  # noqa: F401 (fixture)

ZOO = Path(__file__).resolve().parents[1] / "configs" / "zoo"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread




@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("shard_teacher") / "teacher.pt")


def _step(trainer: Trainer) -> dict:
    images, labels, indices = next(iter(trainer.loader))
    return trainer.train_step(images, labels, indices, torch.zeros(len(labels), dtype=torch.bool))


def _grad_norm(trainer: Trainer) -> float:
    grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))


@pytest.mark.parametrize("extra", [[], ["head.sample_rate=0.5"]], ids=["full_head", "partial_fc"])
def test_clip_grad_norm_bounds_the_norm_of_all_gradients(folder, teacher, tmp_path, extra):
    base = _tiny(folder, teacher, tmp_path / "a") + ["distill=[{name: cosine}]"] + extra
    free = Trainer(load_config(None, base))
    _step(free)
    unclipped = _grad_norm(free)
    limit = unclipped / 4
    clipped = Trainer(load_config(None, base + [f"optim.clip_grad_norm={limit}"]))
    assert _step(clipped) is not None
    assert _grad_norm(clipped) == pytest.approx(limit, rel=1e-4)  # scaled down to the limit
    loose = Trainer(load_config(None, base + [f"optim.clip_grad_norm={10 * unclipped}"]))
    _step(loose)
    assert _grad_norm(loose) == pytest.approx(unclipped, rel=1e-5)  # below the limit: untouched


@pytest.mark.parametrize("value", ["0", "-1", "true"])
def test_clip_grad_norm_must_be_positive(folder, teacher, tmp_path, value):
    with pytest.raises(ConfigError, match="optim.clip_grad_norm"):
        load_config(None, _tiny(folder, teacher, tmp_path) + [f"optim.clip_grad_norm={value}"])


def test_adadistill_zoo_configs_clip_at_5_like_the_authors():
    for name in ("adadistill", "ekd_adadistill"):
        assert load_config(ZOO / f"{name}.yaml").optim.clip_grad_norm == 5.0
    assert load_config(ZOO / "kd.yaml").optim.clip_grad_norm is None  # off by default


@pytest.mark.parametrize("name", ["kd", "proxylesskd", "margin_distill", "adadistill"])
def test_classifier_methods_train_under_partial_fc(name, folder, teacher, tmp_path):
    cfg = load_config(None, _tiny(folder, teacher, tmp_path / "s")
                      + [f"distill=[{{name: {name}}}]", "head.sample_rate=0.5"])
    trainer = Trainer(cfg)  # formerly refused for kd and proxylesskd
    assert trainer.partial_fc and trainer.class_shard is not None
    assert trainer.class_shard.num_sample == IDS // 2
    if trainer.teacher_centers is not None:
        assert trainer.teacher_centers.shape == (trainer.class_shard.size, EMB)
    terms = _step(trainer)
    assert terms is not None and name in terms and all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    if name == "adadistill":
        result = trainer.fit()
        ckpt = load_file(result.run_dir / "checkpoints" / "last.pt")
        assert ckpt["distillers"]["0.centres"].shape == (IDS, EMB)
        resumed = Trainer(load_config(None, _tiny(folder, teacher, tmp_path / "s")
                                      + [f"distill=[{{name: {name}}}]", "train.resume=auto"]))
        assert torch.equal(resumed.distillers[0].centres, ckpt["distillers"]["0.centres"])


def _clip_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from ekd.engine.optim import clip_grad_norm
    from ekd.heads.sharded_ce import shard_range

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rep, full = _clip_grads()
    start, end = shard_range(full.shape[0], rank, world)
    shard = nn.Parameter(torch.zeros(end - start, full.shape[1]))
    shard.grad = full.grad[start:end].clone()
    norm = clip_grad_norm([rep], [shard], 1.0, distributed=True)
    torch.save({"norm": norm, "rep": rep.grad, "shard": shard.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


def _clip_grads() -> tuple[nn.Parameter, nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    rep, full = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(7, 3))
    rep.grad, full.grad = torch.randn(4, 3, generator=gen), torch.randn(7, 3, generator=gen)
    return rep, full


def test_clipping_with_partial_fc_shards_on_2_processes_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from ekd.engine.optim import clip_grad_norm

    mp.start_processes(_clip_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "r")), nprocs=2,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in range(2)]
    rep, full = _clip_grads()
    want_norm = clip_grad_norm([rep, full], [], 1.0)
    assert want_norm > 1.0  # the clip is active
    for r in ranks:
        torch.testing.assert_close(r["norm"], want_norm)
        torch.testing.assert_close(r["rep"], rep.grad)
    torch.testing.assert_close(torch.cat([r["shard"] for r in ranks]), full.grad)


class _NeedsLogits(Distiller):
    name = "needs_logits"
    requires = frozenset({"student_logits"})


def test_class_based_method_without_shard_support_is_refused_under_partial_fc():
    with pytest.raises(ConfigError, match="needs_logits need the student's full classifier.*class_shard"):
        check_sharding(nn.ModuleList([_NeedsLogits()]))


# --------------------------------------------------------------------------- trainer, 2 Gloo processes

SHARDED_DISTILL = ("distill=[{name: kd}, {name: proxylesskd, params: {replace_ce: false}}, "
                   "{name: margin_distill, params: {replace_ce: false, scale: 16.0}}, "
                   "{name: adadistill, params: {replace_ce: false, scale: 16.0}}]")


def _overrides(folder: Path, teacher: Path, out: Path) -> list[str]:
    return _tiny(folder, teacher, out) + [SHARDED_DISTILL, "train.ce_on=all", "optim.lr=0.01",
                                          "optim.clip_grad_norm=1.0", "head.scale=16.0"]


def _fixed_batch(trainer: Trainer, rank: int, world: int) -> tuple:
    """8 images of 4 identities; BatchNorm calibrated on all 8 and frozen (as in test_scale)."""
    g = torch.Generator().manual_seed(7)
    images = torch.randn(8, 3, SIZE, SIZE, generator=g)
    calibrate_and_freeze_bn(trainer.student, images)
    labels = torch.tensor([0, 0, 5, 5, 7, 7, 11, 11])  # classes on both ranks' shards
    per = 8 // world
    sl = slice(rank * per, (rank + 1) * per)
    return images[sl], labels[sl], torch.arange(8)[sl], torch.zeros(per, dtype=torch.bool)


def _trainer_worker(rank: int, world: int, port: int, folder: Path, teacher: Path, out: Path) -> None:
    import os

    from ekd.utils import distributed as D

    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        with Trainer(load_config(None, _overrides(folder, teacher, out / f"r{rank}"))) as trainer:
            assert trainer.class_shard is not None and trainer.class_shard.size == IDS // world
            terms = trainer.train_step(*_fixed_batch(trainer, rank, world))
            torch.save({"terms": terms, "model": {k: v.detach() for k, v in trainer.student.named_parameters()},
                        "centres": trainer.distillers[3].full_centres()}, out / f"rank{rank}.pt")
    finally:
        D.shutdown()


def test_trainer_step_with_sharded_distillers_on_2_processes_equals_one_process(folder, teacher, tmp_path):
    import socket

    import torch.multiprocessing as mp

    single = Trainer(load_config(None, _overrides(folder, teacher, tmp_path / "single")))
    assert single.class_shard is None  # one process, sample rate 1: the unsharded path
    want = single.train_step(*_fixed_batch(single, 0, 1))
    expected = {k: v.detach() for k, v in single.student.named_parameters()}
    port = _free_port()
    mp.spawn(_trainer_worker, args=(2, port, folder, teacher, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["terms"].keys() == want.keys() >= {"ce", "kd", "proxylesskd", "margin_distill", "adadistill"}
        for k in want:
            assert got["terms"][k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), (rank, k)
        diff = max(float((got["model"][k] - expected[k]).abs().max()) for k in expected)
        assert diff < 1e-5, (rank, diff)
        torch.testing.assert_close(got["centres"], single.distillers[3].centres, rtol=1e-5, atol=1e-6)
