"""`ekd train` never silently reuses a run folder, and its exit code tells the truth: a folder
holding another run is refused (one line naming it) unless the run is resumed or overwritten;
a resumed run continues metrics.jsonl without duplicates; Ctrl-C saves a resumable checkpoint,
says how to resume, prints no model path and exits 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ekd.commands.cli import main
from ekd.config import load_config
from ekd.data import generate_identity_folder
from ekd.engine.trainer import Trainer
from ekd.utils.checkpoint_io import load_file

SETTINGS = ["data.input_size=32", "model.embedding_size=32", "sampler.random_size=16",
            "sampler.identities_per_batch=4", "train.epochs=2", "train.progress=false",
            "train.device=cpu", "train.log_every=1", "train.tensorboard=false",
            "train.diagnostics=false"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "train"
    generate_identity_folder(root, num_identities=12, images_per_identity=6, image_size=32, seed=1)
    return root


@pytest.fixture()
def config(folder, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{kind: folder, root: {folder}}}\nmodel: {{backbone: mobilefacenet}}\n")
    return path


def _train(config, run, *extra):
    return main(["train", str(config), "--set", f"train.output_dir={run}",
                 *(a for s in SETTINGS for a in ("--set", s)), *extra])


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _step_rows(run):
    return [r["step"] for r in _rows(run) if "epoch_end" not in r and not r.get("val")]


def test_a_second_run_into_the_same_folder_is_refused(config, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(config, run) == 0
    model, rows = (run / "model.pt").read_bytes(), _rows(run)
    capsys.readouterr()
    assert _train(config, run, "--set", "optim.lr=0.05") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err and "holds another run" in err
    assert "--overwrite" in err and "train.resume=auto" in err
    assert (run / "model.pt").read_bytes() == model and _rows(run) == rows  # nothing touched
    assert "lr: 0.1" in (run / "config.yaml").read_text()


def test_overwrite_deletes_the_old_run_first(config, tmp_path):
    run = tmp_path / "run"
    assert _train(config, run) == 0
    (run / "diagnose").mkdir()
    (run / "diagnose" / "old.png").write_bytes(b"x")
    assert _train(config, run, "--set", "train.epochs=1", "--overwrite") == 0
    assert sum(r.get("epoch_end", False) for r in _rows(run)) == 1  # only the new run's rows
    assert not (run / "diagnose").exists()
    steps = _step_rows(run)
    assert steps == sorted(set(steps)) and steps[0] == 1


def test_resume_and_overwrite_together_are_refused(config, tmp_path, capsys):
    assert _train(config, tmp_path / "run", "--set", "train.resume=auto", "--overwrite") == 2
    assert "contradict" in capsys.readouterr().err


def test_a_folder_without_a_run_is_used(config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert _train(config, run, "--set", "train.epochs=1") == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "model.pt").is_file()


def test_resumed_run_continues_metrics_without_duplicates(config, folder, tmp_path):
    straight = tmp_path / "straight"
    assert _train(config, straight) == 0
    run = tmp_path / "run"
    cfg = load_config(config, [f"train.output_dir={run}", *SETTINGS])
    with Trainer(cfg) as trainer:
        original = trainer.train_step

        def die_in_epoch_two(*args):  # killed after logging 2 steps past the epoch-1 checkpoint
            if trainer.state.epoch == 1 and trainer.state.batch_in_epoch == 2:
                raise SystemExit("killed")
            return original(*args)

        trainer.train_step = die_in_epoch_two
        with pytest.raises(SystemExit):
            trainer.fit()
    saved = load_file(run / "checkpoints" / "last.pt")["state"]["step"]
    assert max(_step_rows(run)) == saved + 2  # rows logged after the checkpoint
    assert _train(config, run, "--set", "train.resume=auto") == 0
    assert _step_rows(run) == _step_rows(straight)  # each step logged once, in order
    ends = [r["step"] for r in _rows(run) if r.get("epoch_end")]
    assert ends == [r["step"] for r in _rows(straight) if r.get("epoch_end")]


# -- exit codes through the command line --------------------------------------------------------

def _spawn(config, run, *extra):
    sets = [f"train.output_dir={run}", *SETTINGS, "train.epochs=50", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ekd", "train", str(config),
                             *(a for s in sets for a in ("--set", s))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_rows(run, proc, rows=3, timeout=120):
    end = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"ekd train ended early: {proc.communicate()}")
        started = (run / "config.yaml").is_file() and "epochs: 50" in (run / "config.yaml").read_text()
        if started and metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no training rows within the time limit")


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_exits_130(config, tmp_path):
    run = tmp_path / "run"
    proc = _spawn(config, run)
    _wait_for_rows(run, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "model" not in out and not (run / "model.pt").exists()
    assert "train.resume=auto" in err and "checkpoints/last.pt" in err
    assert (run / "checkpoints" / "last.pt").is_file()
    # the printed command resumes the run (here with fewer epochs, so that it ends)
    assert _train(config, run, "--set", "train.resume=auto", "--set", "train.epochs=1") == 0
    assert (run / "model.pt").is_file()


def test_ctrl_c_in_an_older_folder_prints_no_stale_model(config, tmp_path):
    run = tmp_path / "run"
    assert _train(config, run, "--set", "train.epochs=1") == 0
    proc = _spawn(config, run, "train.overwrite=true")
    _wait_for_rows(run, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "model" not in out and not (run / "model.pt").exists()  # the old model went first


def test_other_failures_exit_non_zero(config, tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert _train(config, tmp_path / "run", "--set", "teacher.kind=checkpoint",
                  "--set", f"teacher.path={tmp_path / 'no_teacher.pt'}",
                  "--set", "distill=[{name: ekd}]") == 2
    assert "no_teacher.pt" in capsys.readouterr().err


# -- everything a run needs is checked before heavy work -----------------------------------------

@pytest.fixture()
def no_heavy_work(monkeypatch):
    """Reading validation sets or the training images (preload/loader) fails the test."""
    import ekd.engine.trainer as trainer_module

    def heavy(*args, **kwargs):
        raise AssertionError("images read before the run's inputs were checked")

    monkeypatch.setattr(trainer_module, "build_validator", heavy)
    monkeypatch.setattr(trainer_module, "build_train_loader", heavy)


def test_a_missing_teacher_is_reported_before_any_image_is_read(config, tmp_path, capsys, no_heavy_work):
    missing = tmp_path / "teacher.pt"
    assert _train(config, tmp_path / "run", "--set", "teacher.kind=checkpoint", "--set",
                  f"teacher.path={missing}", "--set", "distill=[{name: ekd}]", "--set",
                  "data.preload=true", "--set", f"val.sets=[{tmp_path}]") == 2
    assert str(missing) in capsys.readouterr().err


def test_a_teacher_of_the_wrong_kind_is_reported_before_any_image_is_read(config, tmp_path, capsys,
                                                                          no_heavy_work):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"not a model")
    assert _train(config, tmp_path / "run", "--set", "teacher.kind=cache", "--set",
                  f"teacher.path={teacher}", "--set", "distill=[{name: ekd}]",
                  "--set", "data.preload=true") == 2
    assert str(teacher) in capsys.readouterr().err


def test_a_refused_run_folder_is_reported_before_the_data_is_listed(config, tmp_path, capsys, monkeypatch):
    import ekd.engine.trainer as trainer_module

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    monkeypatch.setattr(trainer_module, "build_train_set", lambda cfg: pytest.fail("data listed first"))
    assert _train(config, run) == 2
    assert "holds another run (metrics.jsonl)" in capsys.readouterr().err
