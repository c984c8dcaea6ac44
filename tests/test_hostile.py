"""Hostile and damaged files: nothing crafted to run code is executed; every deserialiser in src/
is a safe one; checkpoint writes are atomic; damaged checkpoints give errors naming the keys."""

from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import pytest
import torch

from ekd.config import load_config
from ekd.data.verification_bin import BinDataset, load_bin
from ekd.errors import CheckpointError, ConfigError, DataError
from ekd.models import build_backbone
from ekd.teachers.checkpoint import load_teacher
from ekd.utils.checkpoint_io import FORMAT, load_file, load_state_strict, save_atomic

SRC = Path(__file__).resolve().parents[1] / "src"


class Payload:
    """Unpickling this writes ``marker`` (the proof that code ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _calls(tree: ast.AST, module: str, func: str):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == func and isinstance(node.func.value, ast.Name)
                and node.func.value.id == module):
            yield node


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def test_every_deserialiser_in_src_is_safe():
    """torch.load always weights_only=True; no pickle.load(s) (the .bin reader subclasses
    Unpickler with an allow-list); yaml only via safe_load/safe_dump; np.load without pickles."""
    bad = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        where = lambda n: f"{path.relative_to(SRC)}:{n.lineno}"  # noqa: E731
        bad += [f"{where(n)} torch.load without weights_only=True" for n in _calls(tree, "torch", "load")
                if _kw(n, "weights_only") is not True]
        bad += [f"{where(n)} pickle.{f}" for f in ("load", "loads") for n in _calls(tree, "pickle", f)]
        bad += [f"{where(n)} yaml.{f}" for f in ("load", "unsafe_load", "full_load", "load_all")
                for n in _calls(tree, "yaml", f)]
        bad += [f"{where(n)} np.load allow_pickle" for n in _calls(tree, "np", "load")
                if _kw(n, "allow_pickle") not in (None, False)]
    assert not bad, "unsafe deserialisation:\n" + "\n".join(bad)


def test_the_source_scan_would_notice(tmp_path):
    tree = ast.parse("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
                     "torch.load(p, weights_only=True)\n")
    flagged = [n.lineno for n in _calls(tree, "torch", "load") if _kw(n, "weights_only") is not True]
    assert flagged == [2, 3]


# ------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_hostile_checkpoint_refused_by_load_file_and_load_teacher(tmp_path, writer):
    marker = tmp_path / "owned"
    obj = {"format": FORMAT, "model_meta": {"backbone": "mobilefacenet", "embedding_size": 32,
                                            "input_size": 32}, "model": Payload(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(obj, path)  # zip format, the pickle inside carries the payload
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(CheckpointError, match="evil.pt.*refused to load"):
        load_file(path)
    with pytest.raises(CheckpointError, match="evil.pt.*refused to load"):
        load_teacher(path)
    assert not marker.exists()


def test_atomic_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": torch.tensor(1)}, path)
    real_save = torch.save

    def half_then_fail(obj, fh, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # a partial file on disk ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_atomic({"step": torch.tensor(2)}, path)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"step": torch.tensor(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert int(load_file(path)["step"]) == 1  # the previous checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp files left
    save_atomic({"step": torch.tensor(4)}, path)
    assert int(load_file(path)["step"]) == 4


def test_truncated_and_damaged_checkpoints(tmp_path):
    path = tmp_path / "t.pt"
    model = build_backbone("mobilefacenet", 32, 32)
    save_atomic({"format": FORMAT, "version": 1, "model_meta": {"backbone": "mobilefacenet",
                 "embedding_size": 32, "input_size": 32}, "model": model.state_dict()}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable PyTorch checkpoint"):
        load_teacher(tmp_path / "cut.pt")
    save_atomic({"format": FORMAT, "model": model.state_dict()}, tmp_path / "nometa.pt")
    with pytest.raises(CheckpointError, match="nometa.pt: an ekd checkpoint without .*model_meta"):
        load_teacher(tmp_path / "nometa.pt")


def test_architecture_and_size_mismatches_name_both(tmp_path):
    path = tmp_path / "t.pt"
    model = build_backbone("mobilefacenet", 32, 32)
    save_atomic({"format": FORMAT, "version": 1, "model_meta": {"backbone": "mobilefacenet",
                 "embedding_size": 32, "input_size": 32}, "model": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="holds a mobilefacenet but iresnet50 was requested"):
        load_teacher(path, backbone="iresnet50")
    with pytest.raises(CheckpointError, match="trained at input size 32, requested 112"):
        load_teacher(path, input_size=112)


def test_non_tensor_state_entries_are_listed():
    model = build_backbone("mobilefacenet", 32, 32)
    state = dict(model.state_dict())
    key = next(iter(state))
    state[key] = [1, 2, 3]
    state[7] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=f"not tensors: {key}"):
        load_state_strict(model, state, "x.pt")
    state[key] = model.state_dict()[key]
    with pytest.raises(CheckpointError, match="unexpected keys: 7"):
        load_state_strict(model, state, "x.pt")


# ------------------------------------------------------------------------------ .bin and YAML

@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_hostile_bin_refused_by_every_entry_point(tmp_path, protocol):
    marker = tmp_path / "owned"
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([b"x", b"y"], [Payload(marker)]), protocol=protocol))
    with pytest.raises(DataError, match="lfw.bin: not a readable verification .bin.*not allowed"):
        load_bin(path)
    with pytest.raises(DataError, match="not allowed"):
        BinDataset(path)
    from ekd.commands.cli_data import bin_info

    with pytest.raises(DataError):
        bin_info(path)
    assert not marker.exists()


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {m}']",
    "!!python/object/new:subprocess.Popen [['touch', '{m}']]",
    "!!python/object:ekd.config.Config {{}}",
    "!!python/name:os.system",
])
def test_yaml_python_tags_are_refused(tmp_path, tag):
    marker = tmp_path / "owned"
    value = tag.format(m=marker)
    (tmp_path / "c.yaml").write_text(f"model: {value}\n")
    with pytest.raises(ConfigError, match="invalid YAML.*could not determine a constructor"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="--set model: cannot parse value"):
        load_config(None, [f"model={value}"])
    assert not marker.exists()


def test_damaged_teacher_caches_and_embedding_files(tmp_path):
    import json

    from ekd.teachers.cache import MANIFEST, TeacherCache
    from ekd.teachers.cache_builder import import_npz

    for manifest in ('{"version": 1, "num_samples": 0, "embedding_size": 4}', "[1, 2]",
                     "[" * 100000, '{"version": 1, "num_samples": "x"}'):
        (tmp_path / MANIFEST).write_text(manifest)
        (tmp_path / "embeddings.f16").write_bytes(b"")
        with pytest.raises(CheckpointError, match="unreadable manifest"):
            TeacherCache(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"version": 1, "num_samples": 2, "embedding_size": 4}))
    with pytest.raises(CheckpointError, match="missing or truncated"):
        TeacherCache(tmp_path)
    (tmp_path / "emb.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="emb.npz: not an embedding file"):
        import_npz(tmp_path / "emb.npz", dataset=None, out=tmp_path / "cache")
