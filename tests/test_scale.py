"""Scale features on CPU: DDP equivalence (gloo), exact resume, Ctrl-C, NaN guard, teacher cache."""

from __future__ import annotations

import os
import shutil
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ekd.config import load_config
from ekd.data import generate_identity_folder
from ekd.utils import distributed as D
from ekd.engine.build import CXX_CANDIDATES
from ekd.engine.trainer import Trainer, train
from ekd.errors import CheckpointError, EkdError
from ekd.teachers.cache import TeacherCache, dataset_fingerprint
from ekd.teachers.cache_builder import build_cache, import_npz
from ekd.utils.checkpoint_io import load_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "train"
    generate_identity_folder(root, num_identities=10, images_per_identity=6, image_size=32, seed=2)
    return root


def _overrides(folder, out, *extra):
    return [f"data.kind=folder", f"data.root={folder}", "data.input_size=32",
            "model.backbone=mobilefacenet", "model.embedding_size=16", "sampler.random_size=8",
            "sampler.identities_per_batch=4", "train.epochs=2", "train.progress=false",
            "train.device=cpu", "train.log_every=1", f"train.output_dir={out}",
            "train.max_steps_per_epoch=3", *extra]


def _weights(path):
    return load_file(path)["model"]


def _die_after_first_epoch(trainer: Trainer) -> None:
    """Run until the process "dies" at the start of epoch 2, after the epoch-1 checkpoint."""
    run_epoch = trainer._run_epoch

    def die_in_epoch_two(metrics):
        if trainer.state.epoch == 1:
            raise SystemExit("killed")
        return run_epoch(metrics)

    trainer._run_epoch = die_in_epoch_two
    with pytest.raises(SystemExit):
        trainer.fit()


def test_resume_after_kill_equals_straight_run(folder, tmp_path):
    straight = train(load_config(None, _overrides(folder, tmp_path / "a")))
    # the process dies at the start of epoch 2, after the epoch-1 checkpoint was written
    _die_after_first_epoch(Trainer(load_config(None, _overrides(folder, tmp_path / "b"))))
    ckpt = load_file(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["state"]["epoch"] == 1 and {"optimizer", "scheduler", "rng", "scaler"} <= set(ckpt)
    resumed = train(load_config(None, _overrides(folder, tmp_path / "b", "train.resume=auto")))
    a, b = _weights(straight.model_path), _weights(resumed.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_writes_resumable_checkpoint_and_resume_is_exact(folder, tmp_path):
    straight = train(load_config(None, _overrides(folder, tmp_path / "a", "train.epochs=1")))
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / "b", "train.epochs=1")))
    original = trainer.train_step

    def step_then_interrupt(*args):
        out = original(*args)
        if trainer.state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer.train_step = step_then_interrupt
    result = trainer.fit()
    assert result.interrupted and not (tmp_path / "b" / "model.pt").exists()
    ckpt = load_file(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["state"]["batch_in_epoch"] == 2 and ckpt["state"]["epoch"] == 0
    resumed = train(load_config(None, _overrides(folder, tmp_path / "b", "train.epochs=1",
                                                 "train.resume=auto")))
    a, b = _weights(straight.model_path), _weights(resumed.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_skips_then_stops(folder, tmp_path):
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / "n", "train.max_bad_steps=2")))
    images, labels, indices = next(iter(trainer.loader))
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.compute_terms = lambda *a: {"ce": torch.tensor(float("nan"), requires_grad=True)}
    assert trainer.train_step(images, labels, indices, flipped) is None
    assert trainer.state.skipped == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())
    with pytest.raises(EkdError, match=r"2 non-finite steps in a row .*ce=nan"):
        trainer.train_step(images, labels, indices, flipped)


def _teacher(folder, tmp_path):
    return train(load_config(None, _overrides(folder, tmp_path / "t", "train.epochs=1",
                                              "train.ce_on=all"))).model_path


def test_cached_teacher_equals_live_teacher(folder, tmp_path):
    teacher = _teacher(folder, tmp_path)
    live = Trainer(load_config(None, _overrides(folder, tmp_path / "live", "teacher.kind=checkpoint",
                                                f"teacher.path={teacher}", "distill=[{name: ekd}]")))
    cache_dir = build_cache(live.teacher.model, live.dataset, tmp_path / "cache", teacher_fp="x",
                            teacher_name="t", progress=False)
    cached = Trainer(load_config(None, _overrides(folder, tmp_path / "c", "teacher.kind=cache",
                                                  f"teacher.path={cache_dir}", "distill=[{name: ekd}]")))
    images, labels, indices = next(iter(live.loader))
    images, flipped = live._mirror(images)
    a = live.teacher.embed(images, indices, flipped)
    b = cached.teacher.embed(images, indices, flipped)
    assert torch.allclose(a, b, rtol=2e-3, atol=2e-3)  # float16 storage
    result = cached.fit()
    assert "ekd_neg" in result.final_terms


def test_stale_cache_is_an_error(folder, tmp_path):
    teacher = _teacher(folder, tmp_path)
    live = Trainer(load_config(None, _overrides(folder, tmp_path / "live", "teacher.kind=checkpoint",
                                                f"teacher.path={teacher}", "distill=[{name: ekd}]")))
    cache_dir = build_cache(live.teacher.model, live.dataset, tmp_path / "cache", teacher_fp="abc",
                            teacher_name="t", progress=False)
    with pytest.raises(CheckpointError, match="another dataset"):
        TeacherCache(cache_dir, dataset_fp="0" * 64)
    with pytest.raises(CheckpointError, match="another teacher"):
        TeacherCache(cache_dir, dataset_fingerprint(live.dataset.root, live.dataset.samples), "def")
    (cache_dir / "embeddings.f16").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="truncated"):
        TeacherCache(cache_dir)


def test_shared_embedding_format_imports(train_faces, tmp_path):
    from ekd.data import ImageFolderDataset
    import numpy as np

    faces = train_faces
    ds = ImageFolderDataset(faces / "train", input_size=112, identities=["cfp-001", "cfp-002"])
    cache = TeacherCache(import_npz(faces / "teacher_dlib_r29" / "train.npz", ds, tmp_path / "c"),
                         dataset_fingerprint(ds.root, ds.samples))
    assert cache.embedding_size == 128 and len(cache) == len(ds) == 28
    npz = np.load(faces / "teacher_dlib_r29" / "train.npz")
    row = list(npz["paths"]).index("cfp-002/" + os.path.basename(ds.samples[20][0]))
    got = cache.lookup(torch.tensor([20, 20]), torch.tensor([False, True]))
    assert torch.allclose(got[0], torch.from_numpy(npz["emb"][row]), atol=1e-3)
    assert torch.allclose(got[1], torch.from_numpy(npz["emb_flip"][row]), atol=1e-3)


def test_view32_teacher_cache_gives_each_image_its_own_row_and_mirror(train_faces, tmp_path):
    """The cpu3 teacher (T3: the crop seen at 32 px) through the cache a student trains with:
    every image of two identities, both mirror flags, is the npz row of that very file."""
    from pathlib import Path

    import numpy as np
    from conftest import need_faces

    from ekd.data import ImageFolderDataset

    need_faces("teacher_dlib_r29_view32/train.npz")
    ds = ImageFolderDataset(train_faces / "train", input_size=32, identities=["cfp-003", "cfp-004"])
    cache = TeacherCache(import_npz(train_faces / "teacher_dlib_r29_view32" / "train.npz", ds, tmp_path / "c"),
                         dataset_fingerprint(ds.root, ds.samples))
    npz = np.load(train_faces / "teacher_dlib_r29_view32" / "train.npz")
    rows = {path: i for i, path in enumerate(npz["paths"])}
    index = torch.arange(len(ds))
    for flag, key in ((False, "emb"), (True, "emb_flip")):
        got = cache.lookup(index, torch.full((len(ds),), flag))
        want = np.stack([npz[key][rows[f"{Path(path).parent.name}/{Path(path).name}"]] for path, _ in ds.samples])
        assert torch.allclose(got, torch.from_numpy(want).float(), atol=1e-3)
    plain, mirrored = cache.lookup(index, torch.zeros(len(ds), dtype=torch.bool)), \
        cache.lookup(index, torch.ones(len(ds), dtype=torch.bool))
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the flag picks another row


# --------------------------------------------------------------------------- DDP (gloo)

def torchrun_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives process ``rank`` of ``world`` (rendezvous on loopback)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, folder, out, ekd_params="", extra=()):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        with Trainer(load_config(None, _ddp_overrides(folder, out / f"r{rank}", ekd_params, *extra))) as trainer:
            trainer.train_step(*_fixed_batch(trainer, rank, world))
            torch.save({k: v.detach() for k, v in trainer.student.named_parameters()}, out / f"rank{rank}.pt")
            torch.save(trainer.diagnostics, out / f"diagnostics{rank}.pt")
            torch.save(trainer.state.auto_weights, out / f"auto_weights{rank}.pt")
            torch.save(trainer._batch_auc, out / f"batch_auc{rank}.pt")
    finally:
        D.shutdown()


def _ddp_overrides(folder, out, ekd_params="", *extra):
    # BatchNorm would see per-rank statistics; freeze it (eval mode) so that the comparison is
    # about the loss and the gradient, which must be world-size invariant.
    return _overrides(folder, out, "train.ce_on=all", "sampler.random_size=0",
                      "teacher.kind=checkpoint", f"teacher.path={out.parent / 't' / 'model.pt'}",
                      f"distill=[{{name: ekd, weight: 10.0, params: {{top_k: 20, temperature: 0.1{ekd_params}}}}}, "
                      "{name: sp, weight: 10.0}, {name: cosine}]", "optim.lr=0.01",
                      "train.log_every=1", *extra)  # step 1 is logged: diagnostics on the global batch


def calibrate_and_freeze_bn(student: torch.nn.Module, images: torch.Tensor) -> None:
    """BatchNorm statistics of the whole batch (the same on every rank), then frozen (eval)."""
    for m in student.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    student.train()
    with torch.no_grad():
        student(images)
    student.eval()


def _fixed_batch(trainer, rank, world):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(8, 3, 32, 32, generator=g)
    calibrate_and_freeze_bn(trainer.student, images)
    labels = torch.arange(8) // 2
    per = 8 // world
    sl = slice(rank * per, (rank + 1) * per)
    return images[sl], labels[sl], torch.arange(8)[sl], torch.zeros(per, dtype=torch.bool)


# the paper's EKD, a loss variant (one_sided: the variants' code path) on the gathered pairs, and
# the paper's EKD with the student's step compiled (train.compile: DDP under torch.compile)
# the cosine term with weight auto (calibrated on this one step: measured on the global batch,
# not applied, then fixed) is the last
@pytest.mark.parametrize(("ekd_params", "extra"), [("", ()), (", one_sided: true", ()),
                                                   ("", ("train.compile=true",)),
                                                   ("", ("distill.2.weight=auto", "train.auto_weight_steps=1"))],
                         ids=["paper", "one_sided", "compiled", "auto_weight"])
def test_two_process_step_equals_one_process_on_concatenated_batch(folder, tmp_path, ekd_params, extra):
    if extra and not any(shutil.which(c) for c in CXX_CANDIDATES):
        pytest.skip("no C++ compiler for inductor on this machine")
    _teacher(folder, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: NHWC kernels split their sums by thread
    try:
        single = Trainer(load_config(None, _ddp_overrides(folder, tmp_path / "single", ekd_params, *extra)))
        single.train_step(*_fixed_batch(single, 0, 1))
    finally:
        torch.set_num_threads(threads)
    expected = {k: v.detach() for k, v in single.student.named_parameters()}
    mp.spawn(_ddp_worker, args=(2, _free_port(), folder, tmp_path, ekd_params, extra), nprocs=2, join=True)
    results = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)}
    for rank in (0, 1):
        got = results[rank]
        diff = max(float((got[k].float() - expected[k].float()).abs().max()) for k in expected)
        worst = max(expected, key=lambda k: float((got[k].float() - expected[k].float()).abs().max()))
        assert diff < 1e-5, (rank, diff, worst)
        # gradient norms per term and EKD's recorded internals: those of the concatenated batch
        diagnostics = torch.load(tmp_path / f"diagnostics{rank}.pt", weights_only=True)
        assert {"grad/ce", "grad/ekd_pos", "grad/sp", "ekd/active_neg"} <= set(single.diagnostics)
        assert diagnostics.keys() == single.diagnostics.keys()
        for k, v in single.diagnostics.items():
            assert diagnostics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (rank, k)
        auto_weights = torch.load(tmp_path / f"auto_weights{rank}.pt", weights_only=True)
        assert auto_weights.keys() == single.state.auto_weights.keys()
        for k, v in single.state.auto_weights.items():
            assert auto_weights[k] == pytest.approx(v, rel=1e-4), (rank, k)
        # the guard's training-batch pair AUC: that of the concatenated batch (4 identities)
        assert torch.load(tmp_path / f"batch_auc{rank}.pt") == pytest.approx(single._batch_auc, abs=1e-6)
    if "train.auto_weight_steps=1" in extra:
        assert set(single.state.auto_weights) == {"2"}


def test_teacher_cache_cli_and_training_from_it(folder, tmp_path):
    from ekd.commands.cli import main

    teacher = _teacher(folder, tmp_path)
    assert main(["teacher-cache", "--data", str(folder), "--input-size", "32", "--out",
                 str(tmp_path / "cache"), "--teacher", str(teacher), "--device", "cpu"]) == 0
    result = train(load_config(None, _overrides(folder, tmp_path / "s", "teacher.kind=cache",
                                                f"teacher.path={tmp_path / 'cache'}",
                                                f"teacher.cache_teacher={teacher}",
                                                "distill=[{name: ekd}]", "train.epochs=1")))
    assert "ekd_pos" in result.final_terms
    other = tmp_path / "other.pt"
    other.write_bytes(teacher.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="another teacher"):
        Trainer(load_config(None, _overrides(folder, tmp_path / "s2", "teacher.kind=cache",
                                             f"teacher.path={tmp_path / 'cache'}",
                                             f"teacher.cache_teacher={other}", "distill=[{name: ekd}]")))


def test_partial_fc_sampling_trains(folder, tmp_path):
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / "p", "head.sample_rate=0.5",
                                                   "train.epochs=1")))
    assert trainer.partial_fc and trainer.head.num_sample == 5
    result = trainer.fit()
    assert "ce" in result.final_terms
    assert load_file(result.model_path)["head"]["weight"].shape == (10, 16)


def test_onnx_teacher_matches_the_pytorch_teacher(folder, tmp_path):
    pytest.importorskip("onnxruntime")
    from ekd.deploy.onnx_export import export_onnx
    from ekd.teachers.checkpoint import load_teacher

    teacher = _teacher(folder, tmp_path)
    loaded = load_teacher(teacher)
    export_onnx(loaded.model, tmp_path / "t.onnx", backbone=loaded.backbone,
                input_size=loaded.input_size)
    trainer = Trainer(load_config(None, _overrides(folder, tmp_path / "o", "teacher.kind=onnx",
                                                   f"teacher.path={tmp_path / 't.onnx'}",
                                                   "distill=[{name: ekd}]", "train.epochs=1")))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.model(images)
    got = trainer.teacher.embed(images, torch.arange(4), torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert "ekd_neg" in trainer.fit().final_terms


def _resume_worker(rank, world, port, folder, out):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        result = train(load_config(None, _overrides(folder, out, "train.resume=auto")))
        assert not result.interrupted
        assert not D.is_initialized()  # train() left the group it joined: the process exits cleanly
    finally:
        D.shutdown()


def test_resume_with_another_world_size(folder, tmp_path):
    _die_after_first_epoch(Trainer(load_config(None, _overrides(folder, tmp_path / "w"))))
    mp.spawn(_resume_worker, args=(2, _free_port(), folder, tmp_path / "w"), nprocs=2, join=True)
    final = load_file(tmp_path / "w" / "checkpoints" / "last.pt")
    assert final["state"]["epoch"] == 2 and final["world_size"] == 2
    assert final["head"]["weight"].shape == (10, 16)
    assert (tmp_path / "w" / "model.pt").is_file()


def _eval_worker(rank, world, port, folder, out):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    from ekd.data import ListDataset
    from ekd.eval.flip_embed import embed_dataset
    from ekd.models import build_backbone

    D.init_distributed("cpu")
    try:
        torch.manual_seed(0)
        model = build_backbone("mobilefacenet", 16, 32).eval()
        paths = sorted(str(p) for p in folder.rglob("*.png"))[:13]  # 13: uneven shards
        emb = embed_dataset(model, ListDataset(paths, 32), batch_size=4)
        torch.save(torch.from_numpy(emb), out / f"emb{rank}.pt")
    finally:
        D.shutdown()


def test_evaluation_is_sharded_and_gathered(folder, tmp_path):
    from ekd.data import ListDataset
    from ekd.eval.flip_embed import embed_dataset
    from ekd.models import build_backbone

    mp.spawn(_eval_worker, args=(2, _free_port(), folder, tmp_path), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet", 16, 32).eval()
    paths = sorted(str(p) for p in folder.rglob("*.png"))[:13]
    expected = torch.from_numpy(embed_dataset(model, ListDataset(paths, 32), batch_size=4))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"emb{rank}.pt", weights_only=True)
        assert got.shape == (13, 16) and torch.allclose(got, expected, atol=1e-5)
