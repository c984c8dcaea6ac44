"""Validation during training (``val`` section), best.pt and TensorBoard scalars."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import weakref

import pytest
import torch
import torch.multiprocessing as mp

from ekd.engine.preflight import load_checked_config as load_config
from ekd.data import generate_identity_folder, write_pairs
from ekd.data.verification_bin import make_bin
from ekd.utils import distributed as D
from ekd.utils.distributed import DistInfo
from ekd.engine.state import MetricsLog
from ekd.engine.tensorboard_log import open_tensorboard
from ekd.engine.trainer import Trainer, train
from ekd.engine.validation import Validator
from ekd.errors import ConfigError, DataError
from ekd.eval.protocols import read_pair_list
from ekd.utils.checkpoint_io import load_file
from test_scale import _die_after_first_epoch, _free_port, torchrun_env


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    generate_identity_folder(root / "train", num_identities=10, images_per_identity=6, image_size=32, seed=2)
    generate_identity_folder(root / "faces", num_identities=6, images_per_identity=4, image_size=32, seed=3)
    write_pairs(root / "faces", root / "pairs.txt", 40, seed=0)
    make_bin(read_pair_list(root / "pairs.txt", root / "faces"), root / "lfw.bin")
    generate_identity_folder(root / "small", num_identities=4, images_per_identity=2, image_size=16, seed=4)
    write_pairs(root / "small", root / "small_pairs.txt", 8, seed=0)
    make_bin(read_pair_list(root / "small_pairs.txt", root / "small"), root / "small.bin")
    return root


def _overrides(data, out, *extra):
    return ["data.kind=folder", f"data.root={data / 'train'}", "data.input_size=32",
            "model.embedding_size=16", "sampler.random_size=8", "sampler.identities_per_batch=4",
            "train.epochs=2", "train.progress=false", "train.device=cpu", "train.log_every=1",
            f"train.output_dir={out}", "train.max_steps_per_epoch=3", "optim.lr=0.01", *extra]


def _sets(data):
    return (f"val.sets=[{data / 'lfw.bin'}, {{path: {data / 'pairs.txt'}, root: {data / 'faces'}, "
            f"name: pl}}, {{path: {data / 'faces'}, name: folder}}]")


def _event_accumulator():
    """TensorBoard's event reader; the test is skipped without the 'tensorboard' extra."""
    return pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _validator(data, *extra):
    return Validator(load_config(None, _overrides(data, data / "unused", *extra)), DistInfo(),
                     torch.device("cpu"))


def test_validation_rows_best_checkpoint_log_line_and_tensorboard(data, tmp_path, caplog):

    from ekd.commands.cli import main

    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="ekd"):
        result = train(load_config(None, _overrides(data, run, _sets(data), "val.every_steps=2",
                                                    "val.keep_best=lfw/acc", "val.fprs=[1e-1]")))
    val_rows = [r for r in _rows(run) if r.get("val")]
    # every 2 steps and at each epoch end (3 steps per epoch); step 6 is both, validated once
    assert [r["step"] for r in val_rows] == [2, 3, 4, 6]
    names = ["lfw/acc", "lfw/auc", "lfw/tpr@1e-1", "pl/acc", "pl/auc", "pl/tpr@1e-1",
             "folder/auc", "folder/tpr@1e-1"]
    for r in val_rows:
        assert set(names) <= set(r) and "folder/acc" not in r
        assert 0 <= r["lfw/acc"] <= 1 and 0 <= r["folder/auc"] <= 1
        # the .bin was made from the pair list: same images, same pairs, same metrics
        assert r["lfw/acc"] == r["pl/acc"] and r["lfw/auc"] == pytest.approx(r["pl/auc"], abs=1e-6)
    epoch_lines = [m for m in caplog.messages if m.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("val: lfw/acc=" in m for m in epoch_lines)

    best_value = max(r["lfw/acc"] for r in val_rows)
    best_step = next(r["step"] for r in val_rows if r["lfw/acc"] == best_value)
    best = load_file(run / "checkpoints" / "best.pt")
    assert best["best"] == {"metric": "lfw/acc", "value": best_value, "step": best_step,
                            "epoch": next(r["epoch"] for r in val_rows if r["step"] == best_step)}
    state = load_file(run / "checkpoints" / "last.pt")["state"]
    assert (state["best_metric"], state["best_value"], state["best_step"]) == ("lfw/acc", best_value, best_step)
    # best.pt holds the model that scored best: ekd eval of it reproduces the value
    assert main(["eval", "--model", str(run / "checkpoints" / "best.pt"), "--bin", str(data / "lfw.bin"),
                 "--device", "cpu", "--out", str(tmp_path / "rep")]) == 0
    evaluated = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert next(iter(evaluated.values()))["sets"]["lfw"]["accuracy"] == pytest.approx(best_value, abs=1e-9)
    assert result.model_path.is_file()

    acc = _event_accumulator()(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/loss", "train/lr", "train/images_per_s", "epoch/loss",
            "epoch/seconds"} | {f"val/{n}" for n in names} <= tags
    tb = {e.step: e.value for e in acc.Scalars("val/lfw/acc")}
    assert tb == pytest.approx({r["step"]: r["lfw/acc"] for r in val_rows})
    lrs = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lrs == pytest.approx({r["step"]: r["lr"] for r in _rows(run) if "lr" in r})


def test_validation_does_not_change_training(data, tmp_path):
    plain = train(load_config(None, _overrides(data, tmp_path / "a", "train.epochs=1")))
    validated = train(load_config(None, _overrides(data, tmp_path / "b", "train.epochs=1",
                                                   f"val.sets=[{data / 'lfw.bin'}]", "val.every_steps=1")))
    a, b = load_file(plain.model_path)["model"], load_file(validated.model_path)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_keeps_the_best_so_far(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    keep = [f"val.sets=[{data / 'lfw.bin'}]", "val.keep_best=lfw/auc", "val.fprs=[1e-1]"]
    _die_after_first_epoch(Trainer(load_config(None, _overrides(data, run, *keep))))
    first = load_file(run / "checkpoints" / "last.pt")["state"]
    assert first["best_metric"] == "lfw/auc" and first["best_step"] == 3
    saved = _digest(run / "checkpoints" / "best.pt")

    resumed = Trainer(load_config(None, _overrides(data, run, *keep, "train.resume=auto")))
    assert resumed.state.best_value == first["best_value"] and resumed.state.best_step == 3
    real_run = Validator.run

    def worse(self, model):  # epoch 2 scores below the best so far
        values = real_run(self, model)
        values["lfw/auc"] = first["best_value"] - 0.01
        return values

    monkeypatch.setattr(Validator, "run", worse)
    resumed.fit()
    assert _digest(run / "checkpoints" / "best.pt") == saved
    final = load_file(run / "checkpoints" / "last.pt")["state"]
    assert (final["best_value"], final["best_step"], final["epoch"]) == (first["best_value"], 3, 2)
    EventAccumulator = _event_accumulator()

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()  # the killed run's events up to its checkpoint, then the resumed run's
    assert [e.step for e in events.Scalars("val/lfw/auc")] == [3, 6]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]

    # a best.pt written after the last.pt (killed in between) holds the higher value: kept
    best = load_file(run / "checkpoints" / "best.pt")
    best["best"]["value"] = first["best_value"] + 0.5
    torch.save(best, run / "checkpoints" / "best.pt")
    again = Trainer(load_config(None, _overrides(data, run, *keep, "train.resume=auto")))
    assert again.state.best_value == first["best_value"] + 0.5


def test_resumed_run_replaces_the_killed_runs_later_tensorboard_events(data, tmp_path):
    EventAccumulator = _event_accumulator()

    run = tmp_path / "run"
    trainer = Trainer(load_config(None, _overrides(data, run)))
    step = trainer.train_step

    def die_after_step_four(*args):  # step 4 is logged, the checkpoint is still at step 3
        if trainer.state.step == 4:
            raise SystemExit("killed")
        return step(*args)

    trainer.train_step = die_after_step_four
    with pytest.raises(SystemExit):
        trainer.fit()
    train(load_config(None, _overrides(data, run, "train.resume=auto")))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def _ddp_val_worker(rank, world, port, data, out):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        with Trainer(load_config(None, _ddp_val_overrides(data, out / "ddp"))) as trainer:
            ddp = weakref.ref(trainer.student_ddp)
            if rank == 1:  # per-rank BatchNorm statistics: rank 0's are broadcast before embedding
                for m in trainer.student.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_var.mul_(3.0)
            with MetricsLog(out / f"rows{rank}.jsonl", enabled=trainer.dist.is_main) as metrics:
                values = trainer.validator.validate(trainer, metrics).values
        # closed: the DDP wrapper is gone and the group left, so the process exits cleanly
        # (a group still held at exit aborted it after the collectives above, now and then)
        assert ddp() is None and not D.is_initialized()
        (out / f"values{rank}.json").write_text(json.dumps(values))
    finally:
        D.shutdown()


def _ddp_val_overrides(data, out):
    return _overrides(data, out, f"val.sets=[{data / 'lfw.bin'}, {{path: {data / 'faces'}, name: folder}}]",
                      "val.keep_best=folder/auc", "val.fprs=[1e-1, 1e-2]", "val.batch_size=7")


def test_two_process_validation_equals_one_process(data, tmp_path):
    single = Trainer(load_config(None, _ddp_val_overrides(data, tmp_path / "single")))
    expected = single.validator.run(single.student)
    mp.spawn(_ddp_val_worker, args=(2, _free_port(), data, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"values{rank}.json").read_text())
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert (got[k] is None and v is None) or got[k] == pytest.approx(v, abs=1e-6), (rank, k)
    rows = (tmp_path / "rows0.jsonl").read_text().splitlines()
    assert len(rows) == 1 and not (tmp_path / "rows1.jsonl").exists()  # rank 0 alone writes
    best = load_file(tmp_path / "ddp" / "checkpoints" / "best.pt")  # written by the collective save
    assert best["best"]["value"] == pytest.approx(expected["folder/auc"], abs=1e-6)
    assert best["head"]["weight"].shape == (10, 16)


# --------------------------------------------------------------------------- bad input

def test_missing_set_is_an_error_naming_the_file(data, tmp_path, capsys):
    from ekd.commands.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")
    args = ["train", str(cfg)] + [a for o in _overrides(data, tmp_path / "r") for a in ("--set", o)]
    assert main(args + ["--set", f"val.sets=[{tmp_path / 'nope.bin'}]"]) == 2
    err = capsys.readouterr().err
    assert "val.sets[0] (nope)" in err and str(tmp_path / "nope.bin") in err and "Traceback" not in err


def test_bin_of_another_image_size(data):
    with pytest.raises(DataError, match=r"small\.bin image 0 is 16x16 but data.input_size is 32.*val.resize"):
        _validator(data, f"val.sets=[{data / 'small.bin'}]")
    with pytest.raises(ConfigError, match="'root' is for pair lists.*lfw.bin is a bin set"):
        _validator(data, f"val.sets=[{{path: {data / 'lfw.bin'}, root: {data}}}]")
    resized = _validator(data, f"val.sets=[{data / 'small.bin'}]", "val.resize=true")
    assert resized.metric_names() == ["small/acc", "small/auc", "small/tpr@1e-3", "small/tpr@1e-4"]


def test_keep_best_must_name_a_metric_of_the_sets(data):
    with pytest.raises(ConfigError, match=r"val.keep_best: 'lfw/tpr@1e-5'.*valid: lfw/acc, lfw/auc, "
                                          r"lfw/tpr@1e-3, lfw/tpr@1e-4"):
        load_config(None, [f"val.sets=[{data / 'lfw.bin'}]", "val.keep_best=lfw/tpr@1e-5"])
    with pytest.raises(ConfigError, match="'cfp/acc'"):
        load_config(None, [f"val.sets=[{data / 'lfw.bin'}]", "val.keep_best=cfp/acc"])
    with pytest.raises(ConfigError, match="folder sets .* no 10-fold accuracy"):
        _validator(data, f"val.sets=[{data / 'faces'}]", "val.keep_best=faces/acc")
    # 20 impostor pairs cannot measure TPR at FPR 1e-3
    with pytest.raises(ConfigError, match=r"lfw/tpr@1e-3' cannot be measured.*20 impostor pairs"):
        _validator(data, f"val.sets=[{data / 'lfw.bin'}]", "val.keep_best=lfw/tpr@1e-3")


def test_malformed_val_sections(data):
    with pytest.raises(ConfigError, match=r"unknown key 'val.sets\[0\].pth'; valid keys.*path, name"):
        load_config(None, ["val.sets=[{pth: a.bin}]"])
    with pytest.raises(ConfigError, match="name 'lfw' is used twice"):
        load_config(None, ["val.sets=[a/lfw.bin, b/lfw.bin]"])
    with pytest.raises(ConfigError, match="val.fprs: 0.0002 is not one of 1e-1"):
        load_config(None, ["val.sets=[a.bin]", "val.fprs=[2e-4]"])
    with pytest.raises(ConfigError, match="val.sets is empty"):
        load_config(None, ["val.every_steps=100"])
    with pytest.raises(ConfigError, match="val.every_steps must be >= 1"):
        load_config(None, ["val.sets=[a.bin]", "val.every_steps=0"])


def test_empty_sets_are_errors(data, tmp_path):
    comments = tmp_path / "empty.txt"
    comments.write_text("# nothing here\n\n")
    with pytest.raises(DataError, match="empty.txt: no usable pairs"):
        _validator(data, f"val.sets=[{comments}]")
    same = tmp_path / "same.txt"
    first = sorted((data / "faces").rglob("*.png"))[:2]
    same.write_text(f"{first[0]} {first[1]} 1\n")
    with pytest.raises(DataError, match="1 genuine and 0 impostor pairs"):
        _validator(data, f"val.sets=[{same}]")
    singles = tmp_path / "singles"
    generate_identity_folder(singles, num_identities=3, images_per_identity=1, image_size=32, seed=5)
    with pytest.raises(DataError, match="no identity has 2 or more images"):
        _validator(data, f"val.sets=[{singles}]")


# --------------------------------------------------------------------------- TensorBoard missing

def _without_tensorboard(monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # the import raises ImportError


def test_tensorboard_missing(data, tmp_path, monkeypatch, caplog):
    _without_tensorboard(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ekd"):
        assert open_tensorboard(None, tmp_path / "tb", enabled=True) is None
    assert any("ekd[tensorboard]" in m for m in caplog.messages)
    with pytest.raises(ConfigError, match=r"train.tensorboard is true .*pip install 'ekd\[tensorboard\]'"):
        train(load_config(None, _overrides(data, tmp_path / "t", "train.tensorboard=true", "train.epochs=1")))
    result = train(load_config(None, _overrides(data, tmp_path / "auto", "train.epochs=1",
                                                "train.max_steps_per_epoch=1")))
    assert result.model_path.is_file() and not (tmp_path / "auto" / "tensorboard").exists()


def test_tensorboard_off(data, tmp_path):
    train(load_config(None, _overrides(data, tmp_path / "off", "train.epochs=1", "train.max_steps_per_epoch=1",
                                       "train.tensorboard=false")))
    assert not (tmp_path / "off" / "tensorboard").exists()
