"""Typed YAML configs: overrides, unknown keys, wrong types, impossible values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ekd.config import Config, load_config, save_config, to_dict
from ekd.errors import ConfigError


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides(tmp_path):
    path = _write(tmp_path, {"data": {"kind": "synthetic"}, "model": {"backbone": "iresnet18"},
                             "distill": [{"name": "ekd"}],
                             "teacher": {"kind": "checkpoint", "path": "t.pt"}})
    cfg = load_config(path, ["optim.lr=0.05", "distill.0.weight=2", "train.device=cpu",
                             "optim.milestones=[2, 4]"])
    assert cfg.model.backbone == "iresnet18"
    assert cfg.optim.lr == 0.05 and cfg.optim.milestones == [2, 4]
    assert cfg.distill[0].weight == 2.0 and cfg.distill[0].params == {}
    assert cfg.train.device == "cpu"


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*valid keys of optim: lr, momentum"):
        load_config(_write(tmp_path, {"optim": {"lrr": 0.1}}))
    with pytest.raises(ConfigError, match=r"'modle'.*valid keys: data, sampler, model"):
        load_config(_write(tmp_path, {"modle": {}}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["train.nope=1"])


def test_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match="train.progress: expected true/false"):
        load_config(None, ["train.progress=3"])
    with pytest.raises(ConfigError, match="distill: expected a list"):
        load_config(_write(tmp_path, {"distill": {"name": "ekd"}}))


def test_impossible_values(tmp_path):
    with pytest.raises(ConfigError, match="sampler.random_size must be >= 0"):
        load_config(None, ["sampler.random_size=-1"])
    with pytest.raises(ConfigError, match="head.kind: 'softmax' is not one of arcface, cosface"):
        load_config(None, ["head.kind=softmax"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(None, ["distill=[{name: ekd}]"])
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.kind=folder"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("model: !!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(hostile)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.embedding_size=128"])
    save_config(cfg, tmp_path / "out.yaml")
    assert to_dict(load_config(tmp_path / "out.yaml")) == to_dict(cfg)


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/*.yaml missing"
    for f in files:
        assert isinstance(load_config(f), Config)
