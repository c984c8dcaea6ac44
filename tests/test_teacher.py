"""Strict teacher loading: a teacher that fails to load is an error, never a random model."""

from __future__ import annotations

import pickle

import pytest
import torch

from ekd.errors import CheckpointError, ConfigError
from ekd.models import build_backbone
from ekd.teachers.checkpoint import load_teacher
from ekd.utils.checkpoint_io import FORMAT, load_file, load_state_strict, save_atomic


def _ekd_checkpoint(path, backbone="mobilefacenet", emb=32, size=32):
    model = build_backbone(backbone, embedding_size=emb, input_size=size)
    save_atomic({"format": FORMAT, "version": 1,
                 "model_meta": {"backbone": backbone, "embedding_size": emb, "input_size": size},
                 "model": model.state_dict(), "head": {"weight": torch.randn(5, emb)}}, path)
    return model


def test_loads_our_checkpoint_exactly_and_frozen(tmp_path):
    ref = _ekd_checkpoint(tmp_path / "t.pt").eval()
    t = load_teacher(tmp_path / "t.pt")
    assert t.backbone == "mobilefacenet" and t.embedding_size == 32 and t.head_state is not None
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(t.model(x), ref(x))


def test_loads_arcface_torch_style_state_dict_with_backbone(tmp_path):
    model = build_backbone("iresnet18", embedding_size=512, input_size=112)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    t = load_teacher(tmp_path / "backbone.pth", backbone="iresnet18")
    assert t.embedding_size == 512 and t.input_size == 112
    with pytest.raises(ConfigError, match="set teacher.backbone"):
        load_teacher(tmp_path / "backbone.pth")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pt"):
        load_teacher(tmp_path / "nope.pt")


def test_wrong_architecture_lists_keys(tmp_path):
    torch.save(build_backbone("iresnet18", 512, 112).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"r18.pth.*missing keys: .*layer1.2"):
        load_teacher(tmp_path / "r18.pth", backbone="iresnet34")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = build_backbone("mobilefacenet", 32, 32).state_dict()
    state.pop("features.layers.3.weight")
    state["extra.weight"] = torch.zeros(1)
    model = build_backbone("mobilefacenet", 32, 32)
    with pytest.raises(CheckpointError, match=r"missing keys: features.layers.3.weight.*unexpected keys: extra.weight"):
        load_state_strict(model, state, "file.pt")


def test_shape_mismatch_is_listed(tmp_path):
    torch.save(build_backbone("mobilefacenet", 64, 32).state_dict(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_teacher(tmp_path / "m.pth", backbone="mobilefacenet", embedding_size=32, input_size=32)


def test_corrupt_and_hostile_files_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_teacher(tmp_path / "junk.pt")

    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('%s').write_text('pwned')" % (tmp_path / "owned"),))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_file(tmp_path / "evil.pt")
    assert not (tmp_path / "owned").exists()
