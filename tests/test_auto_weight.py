"""``weight: auto`` (ekd.engine.auto_weight): a distiller's weight set from its measured share of
the margin softmax's gradient into the embedding, fixed after calibration, logged, resumed."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import synthetic_run_tree
from ekd.config import Config, from_dict, validate
from ekd.engine.diagnostics import term_gradient_norms
from ekd.utils.distributed import DistInfo
from ekd.engine.trainer import Trainer, train
from ekd.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(tmp_path, name, distill, teacher=None, **train):
    return synthetic_run_tree(tmp_path, name, distill, teacher, log_every=1, **train)


def _config(*args, **kwargs) -> Config:
    cfg = from_dict(Config, _tree(*args, **kwargs))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto_teacher")
    return train(_config(out, "teacher", [], max_steps_per_epoch=8)).model_path


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_weight_auto_is_checked_with_the_key_named():
    base = {"teacher": {"kind": "checkpoint", "path": "t.pt"}}
    cfg = from_dict(Config, {**base, "distill": [{"name": "cosine", "weight": "auto", "target_share": 0.3}]})
    validate(cfg)
    assert cfg.distill[0].weight == "auto" and cfg.distill[0].target_share == 0.3
    with pytest.raises(ConfigError, match=r"distill\[0\]\.weight must be a number or 'auto', got 'heavy'"):
        validate(from_dict(Config, {**base, "distill": [{"name": "cosine", "weight": "heavy"}]}))
    with pytest.raises(ConfigError, match=r"distill\[0\]\.target_share is used with weight: auto only"):
        validate(from_dict(Config, {**base, "distill": [{"name": "cosine", "weight": 2.0, "target_share": 0.3}]}))
    with pytest.raises(ConfigError, match=r"distill\[0\]\.target_share must be a number > 0"):
        validate(from_dict(Config, {**base, "distill": [{"name": "cosine", "weight": "auto", "target_share": 0}]}))
    with pytest.raises(ConfigError, match="train.auto_weight_steps must be >= 1"):
        validate(from_dict(Config, {**base, "train": {"auto_weight_steps": 0},
                                    "distill": [{"name": "cosine", "weight": "auto"}]}))


def test_a_term_calibrating_is_measured_not_applied(tmp_path, teacher):
    """Until its weight is fixed an auto term leaves the student as a zero-weight term does."""
    auto = Trainer(_config(tmp_path, "auto", [{"name": "cosine", "weight": "auto"}], teacher,
                           auto_weight_steps=50, max_steps_per_epoch=3))
    zero = Trainer(_config(tmp_path, "zero", [{"name": "cosine", "weight": 0.0}], teacher,
                           max_steps_per_epoch=3))
    auto.fit()
    zero.fit()
    assert auto.state.step == zero.state.step == 3
    for (name, a), (_, z) in zip(auto.student.named_parameters(), zero.student.named_parameters()):
        assert torch.equal(a, z), name
    assert auto.auto_weights.calibrating and auto.state.auto_weights == {}
    assert not [r for r in _rows(auto.run_dir) if "auto_weight" in r]


def test_the_fixed_weight_gives_the_target_share_and_is_logged(tmp_path, teacher):
    cfg = _config(tmp_path, "fixed", [{"name": "cosine", "weight": "auto", "target_share": 0.25}], teacher,
                  auto_weight_steps=3)
    with Trainer(cfg) as trainer:
        result = trainer.fit()
        weight = float(trainer.distillers[0].weight)
    events = [r["auto_weight"] for r in _rows(result.run_dir) if "auto_weight" in r]
    assert len(events) == 1
    event = events[0]
    assert event["index"] == 0 and event["name"] == "cosine" and event["steps"] == 3 and event["step"] == 2
    assert event["weight"] == pytest.approx(weight) == pytest.approx(0.25 / event["share_at_weight_1"])
    # the steps logged before the weight was fixed measured the share at weight 1: the median of
    # those three is the recorded one
    shares = [r["grad_share/cosine"] for r in _rows(result.run_dir) if "grad_share/cosine" in r][:3]
    assert event["share_at_weight_1"] == pytest.approx(sorted(shares)[1], rel=1e-6)
    # after calibration the term carries about the target share (the ratio drifts a little)
    later = [r["grad_share/cosine"] for r in _rows(result.run_dir) if "grad_share/cosine" in r][3:]
    assert later and all(0.1 < s < 0.6 for s in later), later
    assert trainer.state.auto_weights == {"0": pytest.approx(weight)}
    # the benchmark's cell records carry the same event (bench/kd_cells.py)
    from bench.kd_cells import auto_weight_events

    assert auto_weight_events(result.run_dir) == [event]


def test_a_resumed_run_keeps_its_weight(tmp_path, teacher):
    distill = [{"name": "cosine", "weight": "auto"}]
    first = _config(tmp_path, "resume", distill, teacher, auto_weight_steps=2, epochs=1)
    train(first)
    again = _config(tmp_path, "resume", distill, teacher, auto_weight_steps=2, epochs=2, resume="auto")
    with Trainer(again) as trainer:
        assert not trainer.auto_weights.calibrating
        saved = trainer.state.auto_weights["0"]
        assert float(trainer.distillers[0].weight) == pytest.approx(saved)
        trainer.fit()
    events = [r for r in _rows(trainer.run_dir) if "auto_weight" in r]
    assert len(events) == 1  # calibrated once, in the first run


def test_weight_auto_needs_a_margin_softmax(tmp_path, teacher):
    cfg = _config(tmp_path, "ada", [{"name": "adadistill", "weight": 1.0},
                                    {"name": "cosine", "weight": "auto"}], teacher)
    with pytest.raises(ConfigError, match="replaces the margin softmax"):
        Trainer(cfg)


def test_a_term_without_gradient_into_the_embedding_is_refused(tmp_path, teacher):
    from ekd.engine.auto_weight import AutoWeights

    cfg = _config(tmp_path, "none", [{"name": "cosine", "weight": "auto"}], teacher, auto_weight_steps=1)
    distillers = torch.nn.ModuleList([torch.nn.Module()])
    auto = AutoWeights(cfg.distill, distillers, 1, True)
    emb = torch.randn(4, 8, requires_grad=True)
    terms = {"ce": (emb ** 2).sum(), "cosine": torch.zeros((), requires_grad=True)}
    assert term_gradient_norms(terms, emb, DistInfo())["grad_share/cosine"] == 0.0
    with pytest.raises(ConfigError, match=r"distill\[0\] cosine: weight 'auto' measured no gradient"):
        auto.observe(terms, {"cosine": 0}, emb, DistInfo(), step=0)


def test_the_guard_does_not_take_the_term_joining_the_loss_for_a_divergence(tmp_path, teacher):
    """Once an auto weight is fixed the logged loss holds the term; the divergence guard's running
    minimum restarts there instead of counting a jump that never ends as a blow-up."""
    from ekd.engine.guard import DivergenceGuard
    from ekd.config import GuardConfig

    guard = DivergenceGuard(GuardConfig(loss_factor=1.2, loss_windows=2, warmup_epochs=0.0), warmup_steps=0)
    assert guard.observe_loss(1, 10.0) is None
    guard.loss_redefined(2)
    assert guard.observe_loss(2, 10.0) is None  # the step that fixed the weight: the old loss
    for step in (3, 4, 5):  # the new loss, three times the old one, then slowly down
        assert guard.observe_loss(step, 31.0 - step) is None
    assert guard.observe_loss(6, 60.0) is None  # a real blow-up is still caught...
    assert guard.observe_loss(7, 60.0).rule == "loss"  # ...after loss_windows windows
    # through the trainer: a term carrying 3x the margin softmax's gradient joins the loss
    cfg = _config(tmp_path, "guarded", [{"name": "cosine", "weight": "auto", "target_share": 3.0}], teacher,
                  auto_weight_steps=2, epochs=2, guard={"warmup_epochs": 0.0, "loss_windows": 2})
    result = train(cfg)
    assert not [r for r in _rows(result.run_dir) if "stopped" in r]
    assert [r for r in _rows(result.run_dir) if "auto_weight" in r]
