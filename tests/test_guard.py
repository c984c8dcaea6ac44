"""The divergence guard through `ekd train`: a planted blow-up (loss rule), a planted collapse to
chance with a finite loss (chance rule), a two-process stop; each names the rule and step,
records it in metrics.jsonl, keeps the last good checkpoint, exits non-zero, and the kept
checkpoint resumes. replay() on a run's metrics.jsonl gives the live guard's verdict."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from ekd.commands.cli import main
from ekd.config import load_config
from ekd.data import generate_identity_folder
from ekd.utils import distributed as D
from ekd.engine.guard import GuardVerdict, TrainingStopped, read_rows, replay
from ekd.engine.trainer import Trainer
from ekd.utils.checkpoint_io import load_file

from test_scale import _free_port, torchrun_env

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread

SETTINGS = ["data.input_size=32", "model.embedding_size=16", "sampler.random_size=8",
            "sampler.identities_per_batch=4", "train.epochs=4", "train.max_steps_per_epoch=3",
            "train.progress=false", "train.device=cpu", "train.log_every=1", "train.tensorboard=false",
            "train.diagnostics=false", "optim.lr=0.01"]
BLOW_UP_AT = 5  # steps 1-3: epoch 1, 4-6: epoch 2 (its checkpoint is suspect), stop at step 7
GUARD = ["train.guard.warmup_epochs=0", "train.guard.loss_factor=1.5", "train.guard.loss_windows=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    generate_identity_folder(root / "train", num_identities=10, images_per_identity=6, image_size=32, seed=2)
    generate_identity_folder(root / "faces", num_identities=6, images_per_identity=4, image_size=32, seed=3)
    (root / "run.yaml").write_text(f"data: {{kind: folder, root: {root / 'train'}}}\n")
    return root


def _train(data, run, *extra):
    sets = [f"train.output_dir={run}", *SETTINGS, *extra]
    return main(["train", str(data / "run.yaml"), *(a for s in sets for a in ("--set", s))])


@pytest.fixture()
def blow_up(monkeypatch):
    """Every loss term x5 from step BLOW_UP_AT on: finite, far above the minimum."""
    original = Trainer.compute_terms

    def planted(self, *args):
        terms = original(self, *args)
        return {k: v * 5 for k, v in terms.items()} if self.state.step + 1 >= BLOW_UP_AT else terms

    monkeypatch.setattr(Trainer, "compute_terms", planted)


def test_planted_blow_up_stops_names_rule_and_keeps_the_last_good_checkpoint(data, tmp_path, blow_up,
                                                                               capsys, monkeypatch):
    run = tmp_path / "run"
    assert _train(data, run, *GUARD) == 2
    err = capsys.readouterr().err
    assert "stopped at step 7 by the loss rule" in err and "last_good.pt" in err
    stop = read_rows(run / "metrics.jsonl")[-1]
    assert stop["stopped"] == "loss" and stop["metric"] == "loss" and stop["step"] == 7
    kept = run / "checkpoints" / "last_good.pt"
    assert stop["checkpoint"] == str(kept) and load_file(kept)["state"]["step"] == 3
    assert not (run / "model.pt").exists()
    monkeypatch.undo()  # what made it diverge is gone: the kept checkpoint resumes to the end
    assert _train(data, run, *GUARD, f"train.resume={kept}") == 0
    rows = read_rows(run / "metrics.jsonl")
    assert not any("stopped" in r for r in rows) and (run / "model.pt").is_file()
    assert [r["step"] for r in rows if r.get("epoch_end")] == [3, 6, 9, 12]


def test_replay_of_metrics_gives_the_live_guards_verdict(data, tmp_path, blow_up):
    run = tmp_path / "off"
    assert _train(data, run, *GUARD, "train.guard.enabled=false") == 0  # the switch: trains on
    cfg = load_config(data / "run.yaml", [*SETTINGS, *GUARD]).train.guard
    verdict = replay(read_rows(run / "metrics.jsonl"), cfg)
    assert verdict is not None and (verdict.rule, verdict.step) == ("loss", 7)
    cfg.loss_factor = None
    assert replay(read_rows(run / "metrics.jsonl"), cfg) is None


@pytest.fixture()
def collapse(monkeypatch):
    """From step 4 on every weight is zero: one embedding for all faces, a finite loss."""
    original = Trainer.train_step

    def planted(self, *args):
        out = original(self, *args)
        if self.state.step >= 4:
            with torch.no_grad():
                for p in self.student.parameters():
                    p.zero_()
        return out

    monkeypatch.setattr(Trainer, "train_step", planted)


def test_planted_collapse_to_chance_with_a_finite_loss(data, tmp_path, collapse, capsys):
    run = tmp_path / "run"
    assert _train(data, run, f"val.sets=[{{path: {data / 'faces'}, name: faces}}]",
                  "train.guard.loss_factor=null", "train.guard.warmup_epochs=1.5") == 2
    err = capsys.readouterr().err
    assert "stopped at step 6 by the chance rule" in err and "faces/auc" in err
    rows = read_rows(run / "metrics.jsonl")
    assert rows[-1]["stopped"] == "chance" and rows[-1]["metric"] == "faces/auc"
    assert rows[-1]["value"] == pytest.approx(0.5)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)  # no loss said so
    assert rows[-1]["checkpoint"] == str(run / "checkpoints" / "last.pt")  # epoch 1's


def test_guard_settings_are_checked(data, tmp_path, capsys):
    assert _train(data, tmp_path / "run", "train.guard.loss_factor=0.9") == 2
    assert "train.guard.loss_factor must be > 1" in capsys.readouterr().err


def _stop_worker(rank, world, port, data, out):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        cfg = load_config(data / "run.yaml", [f"train.output_dir={out / 'run'}", *SETTINGS])
        with Trainer(cfg) as trainer:
            if rank == 1:  # only rank 1's guard fires, at step 4
                observe = trainer.guard.observe_loss
                trainer.guard.observe_loss = lambda step, loss: (
                    GuardVerdict("loss", "loss", loss, step, "planted") if step == 4 else observe(step, loss))
            try:
                trainer.fit()
                result = {"stopped": None}
            except TrainingStopped as stop:
                result = {"stopped": stop.verdict.rule, "step": trainer.state.step}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        D.shutdown()


def test_two_processes_stop_together(data, tmp_path):
    mp.spawn(_stop_worker, args=(2, _free_port(), data, tmp_path), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got == [{"stopped": "guard", "step": 4}, {"stopped": "loss", "step": 4}]
    stop = read_rows(tmp_path / "run" / "metrics.jsonl")[-1]  # rank 0 records it
    assert stop["stopped"] == "guard" and stop["step"] == 4


def test_planted_collapse_without_a_validation_set_is_stopped_by_the_batch_rule(data, tmp_path, collapse, capsys):
    run = tmp_path / "run"
    assert _train(data, run, "train.guard.loss_factor=null", "train.guard.warmup_epochs=1",
                  "train.guard.batch_windows=3") == 2
    err = capsys.readouterr().err
    assert "stopped at step 7 by the batch chance rule" in err and "pair AUC 0.5000" in err
    rows = read_rows(run / "metrics.jsonl")
    assert rows[-1]["stopped"] == "batch chance" and rows[-1]["metric"] == "batch_auc"
    aucs = {r["step"]: r["batch_auc"] for r in rows if "batch_auc" in r}
    assert all(aucs[s] != 0.5 for s in (1, 2, 3, 4)) and all(aucs[s] == 0.5 for s in (5, 6, 7))
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)  # no loss said so
    cfg = load_config(data / "run.yaml", [*SETTINGS, "train.guard.loss_factor=null", "train.guard.warmup_epochs=1",
                                          "train.guard.batch_windows=3"]).train.guard
    verdict = replay(rows, cfg)
    assert (verdict.rule, verdict.step) == ("batch chance", 7)
    cfg.batch_windows = None
    assert replay(rows, cfg) is None


def test_batch_pair_auc():
    from ekd.engine.guard import batch_pair_auc

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    separated = torch.eye(3)[labels] + 0.01 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    assert batch_pair_auc(separated, labels) == 1.0
    assert batch_pair_auc(torch.zeros(6, 3), labels) == 0.5
    assert math.isnan(batch_pair_auc(separated, torch.arange(6)))  # no genuine pair
