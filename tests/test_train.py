"""The trainer end to end on a tiny synthetic folder: run directory, checkpoints, teacher use."""

from __future__ import annotations

import json

import pytest
import torch

from ekd.commands.cli import main
from ekd.config import load_config
from ekd.data import generate_identity_folder
from ekd.engine.optim import lr_factor, param_groups
from ekd.engine.trainer import Trainer, train
from ekd.errors import CheckpointError, ConfigError
from ekd.models import build_backbone
from ekd.teachers.checkpoint import load_teacher
from ekd.utils.checkpoint_io import load_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "train"
    generate_identity_folder(root, num_identities=12, images_per_identity=6, image_size=32, seed=1)
    return root


def _cfg(folder, out, *extra):
    return load_config(None, [f"data.kind=folder", f"data.root={folder}", "data.input_size=32",
                              "model.backbone=mobilefacenet", "model.embedding_size=32",
                              "sampler.random_size=16", "sampler.identities_per_batch=4",
                              "train.epochs=2", "train.progress=false", "train.device=cpu",
                              "train.log_every=1", f"train.output_dir={out}", *extra])


def test_train_writes_run_directory_and_checkpoints(folder, tmp_path):
    result = train(_cfg(folder, tmp_path / "run"))
    run = result.run_dir
    assert (run / "config.yaml").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("epoch_end", False) for r in rows) == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ckpt = load_file(run / "checkpoints" / "last.pt")
    assert {"model", "head", "optimizer", "scheduler", "epoch", "distillers", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 2
    student = load_teacher(result.model_path)  # the final student is loadable as a teacher
    assert student.backbone == "mobilefacenet" and student.input_size == 32


def test_distillation_from_a_trained_teacher(folder, tmp_path):
    teacher = train(_cfg(folder, tmp_path / "teacher", "train.epochs=1", "train.ce_on=all"))
    cfg = _cfg(folder, tmp_path / "student", "train.epochs=1", "teacher.kind=checkpoint",
               f"teacher.path={teacher.model_path}", "distill=[{name: ekd, weight: 1.0}]")
    trainer = Trainer(cfg)
    assert not trainer.teacher.model.training
    before = {k: v.clone() for k, v in trainer.teacher.model.state_dict().items()}
    result = trainer.fit()
    assert {"ce", "ekd_pos", "ekd_neg"} <= set(result.final_terms)
    after = trainer.teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # teacher frozen, BN stats too
    ckpt = load_file(result.run_dir / "checkpoints" / "last.pt")
    assert float(ckpt["distillers"]["0.student_anchor"].abs().sum()) > 0


def test_a_teacher_that_fails_to_load_stops_training(folder, tmp_path):
    cfg = _cfg(folder, tmp_path / "s", "teacher.kind=checkpoint", f"teacher.path={tmp_path}/none.pt",
               "distill=[{name: ekd}]")
    with pytest.raises(CheckpointError, match="none.pt"):
        Trainer(cfg)
    torch.save(build_backbone("iresnet18", 32, 32).state_dict(), tmp_path / "r18.pth")
    cfg = _cfg(folder, tmp_path / "s", "teacher.kind=checkpoint", f"teacher.path={tmp_path}/r18.pth",
               "teacher.backbone=mobilefacenet", "distill=[{name: ekd}]")
    with pytest.raises(CheckpointError, match="r18.pth.*missing keys"):
        Trainer(cfg)


def test_unknown_distiller_parameter(folder, tmp_path):
    teacher = tmp_path / "t.pt"
    cfg = _cfg(folder, tmp_path / "s", "teacher.kind=checkpoint", f"teacher.path={teacher}",
               "distill=[{name: ekd, params: {temprature: 0.1}}]")
    torch.save(build_backbone("mobilefacenet", 32, 32).state_dict(), teacher)
    cfg.teacher.backbone = "mobilefacenet"
    with pytest.raises(ConfigError, match="unknown parameter.*temprature.*valid: fprs, temperature"):
        Trainer(cfg)


def test_cli_train_reports_errors_without_traceback(folder, tmp_path, capsys):
    code = main(["train", str(tmp_path / "missing.yaml")])
    assert code == 2
    assert "config file not found" in capsys.readouterr().err


def test_no_weight_decay_on_bn_and_bias():
    model = build_backbone("mobilefacenet", 32, 32)
    decay, no_decay = param_groups([model], 5e-4)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_compiled_student_trains_the_same_model(folder, tmp_path):
    """``train.compile``: the training forward runs under torch.compile; one step (with the
    diagnostics' gradient probes on the compiled graph's output) gives the eager model up to
    rounding (~2e-5; later steps drift apart as under any change of summation order, as for
    channels_last), and the saved model is the plain module's (no compile wrapper in its keys)."""
    pytest.importorskip("torch._inductor")
    from ekd.engine.build import CXX_CANDIDATES
    import shutil

    if not any(shutil.which(c) for c in CXX_CANDIDATES):
        pytest.skip("no C++ compiler for inductor on this machine")
    models = []
    for name, flag in (("compiled", "true"), ("eager", "false")):
        trainer = Trainer(_cfg(folder, tmp_path / name, "train.epochs=1", "train.max_steps_per_epoch=1",
                                "model.width=0.25", f"train.compile={flag}"))
        assert (trainer.student_forward is trainer.student_ddp) == (flag == "false")
        result = trainer.fit()
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("grad/ce" in r for r in rows)
        saved = load_file(result.model_path)["model"]
        assert not any("_orig_mod" in k for k in saved)
        models.append(load_teacher(result.model_path).model)
    images = torch.stack([trainer.dataset[i][0] for i in range(8)])
    with torch.no_grad():
        a, b = (torch.nn.functional.normalize(m(images)) for m in models)
    assert torch.allclose(a, b, atol=2e-4), float((a - b).abs().max())


def test_compile_without_a_cxx_compiler_is_a_config_error(folder, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"train.compile.*C\+\+ compiler"):
        Trainer(_cfg(folder, tmp_path / "run", "train.compile=true"))


def test_lr_schedule_warmup_cosine_and_step():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "step", [50, 80]) == pytest.approx(0.01)


def test_channels_last_on_cpu_is_the_same_training_in_nhwc(folder, tmp_path):
    """``train.channels_last`` (default) keeps the student in NHWC on CPU too. One step equals the
    NCHW step to rounding (later steps drift apart as any change of summation order makes them),
    and the saved model loads into a plain (contiguous) backbone."""
    models = []
    for name, flag in (("nhwc", "true"), ("nchw", "false")):
        trainer = Trainer(_cfg(folder, tmp_path / name, "train.epochs=1", "train.max_steps_per_epoch=1",
                                f"train.channels_last={flag}"))
        conv = next(m for m in trainer.student.modules() if isinstance(m, torch.nn.Conv2d))
        fmt = torch.channels_last if flag == "true" else torch.contiguous_format
        assert trainer.channels_last == (flag == "true") and conv.weight.is_contiguous(memory_format=fmt)
        models.append(load_teacher(trainer.fit().model_path).model)
    images = torch.stack([trainer.dataset[i][0] for i in range(8)])
    with torch.no_grad():
        a, b = (torch.nn.functional.normalize(m(images)) for m in models)
    assert torch.allclose(a, b, atol=2e-3), float((a - b).abs().max())
