"""data.kind=rec end to end: training from a .rec, workers, bad records, teacher caches over a
.rec (refusal, 2 processes, resume) and ekd data unpack."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp  # (registers the tensor reductions with ForkingPickler)
from multiprocessing.reduction import ForkingPickler
from torch.utils.data import DataLoader

from test_scale import _free_port, torchrun_env
from ekd.commands.cli import main
from ekd.config import _CHOICES, load_config
from ekd.data import generate_identity_folder
from ekd.data.kinds import DATASET_KINDS, build_dataset, fingerprint_of
from ekd.data.rec_folder import pack_folder
from ekd.data.record_dataset import RecordDataset
from ekd.data.recordio import IRHeader, RecordIOWriter, pack
from ekd.data.robust import CorruptSampleWarning
from ekd.data.sampler import BalancedBatchSampler
from ekd.data.transforms import normalize
from ekd.utils import distributed as D
from ekd.engine.trainer import Trainer
from ekd.errors import CheckpointError, ConfigError, DataError
from ekd.models import build_backbone
from ekd.teachers.cache import DONE_FILE, TeacherCache, file_fingerprint
from ekd.teachers.cache_builder import build_cache
from ekd.teachers.cache_builder import embedder_from_file

SIZE = 32


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec") / "faces"
    generate_identity_folder(root, num_identities=6, images_per_identity=4, image_size=24, seed=3)
    return root


@pytest.fixture(scope="module")
def rec(faces):
    pack_folder(faces, faces.parent / "packed" / "train.rec")
    return faces.parent / "packed" / "train.rec"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A bare state_dict teacher (as arcface_torch's backbone.pth), randomly initialised."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "backbone.pth"
    torch.save(build_backbone("mobilefacenet", 8, SIZE).state_dict(), path)
    return path


def _copy_rec(rec, to):
    to.mkdir(parents=True, exist_ok=True)
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(rec.parent / name, to / name)
    return to / "train.rec"


def _record_offset(rec, key):
    for line in rec.with_suffix(".idx").read_text().splitlines():
        k, off = line.split()
        if int(k) == key:
            return int(off)
    raise KeyError(key)


def _overrides(root, out, *extra):
    return ["data.kind=rec", f"data.root={root}", f"data.input_size={SIZE}", "model.embedding_size=8",
            "sampler.random_size=4", "sampler.identities_per_batch=2", "sampler.samples_per_identity=2",
            "train.epochs=1", "train.max_steps_per_epoch=2", "train.progress=false", "train.device=cpu",
            "train.log_every=1", f"train.output_dir={out}", *extra]


def _yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("{}\n")
    return str(path)


# --------------------------------------------------------------------------- kinds, contract

def test_dataset_kinds_registry_is_the_config_choice(rec):
    assert set(_CHOICES["data.kind"]) == set(DATASET_KINDS) == {"folder", "rec", "synthetic"}
    with pytest.raises(ConfigError, match="data.root is required when data.kind is 'rec'"):
        load_config(None, ["data.kind=rec"])
    ds = build_dataset(load_config(None, _overrides(rec, "x")).data)
    assert isinstance(ds, RecordDataset) and ds.input_size == SIZE


def test_rec_dataset_contract_and_labels_as_data_info(faces, rec, capsys):
    from ekd.data import ImageFolderDataset

    ds = RecordDataset(rec, input_size=SIZE)
    folder = ImageFolderDataset(faces, input_size=SIZE)
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, folder.labels)
    assert ds.num_classes == 6 and len(ds) == 24
    for i in (0, 13):
        u8 = ds.read_uint8(i)
        assert u8.dtype == torch.uint8 and u8.shape == (3, SIZE, SIZE)
        image, label, index = ds[i]
        assert torch.equal(image, normalize(u8)) and (label, index) == (folder.labels[i], i)
        assert torch.equal(image, folder[i][0])  # the same bytes decode and resize the same
    assert main(["data", "info", str(rec)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == len(ds) and info["identities"] == ds.num_classes


def test_pickled_dataset_is_small_and_workers_load_the_same_batches(faces, tmp_path):
    big_folder = tmp_path / "big"
    generate_identity_folder(big_folder, num_identities=6, images_per_identity=40, image_size=16, seed=1)
    big = RecordDataset(pack_folder(big_folder, tmp_path / "big.rec")["rec"], input_size=SIZE)
    small = RecordDataset(pack_folder(faces, tmp_path / "small.rec")["rec"], input_size=SIZE)
    sizes = [len(ForkingPickler.dumps(d)) for d in (small, big)]
    assert sizes[1] - sizes[0] < 200 and sizes[1] < 4096, sizes  # no per-image payload
    sampler = BalancedBatchSampler(small.labels, 4, 2, 2, seed=0)
    plain = list(DataLoader(small, batch_sampler=sampler))
    spawned = list(DataLoader(small, batch_sampler=sampler, num_workers=2, multiprocessing_context="spawn"))
    assert len(plain) == len(spawned) > 0
    for (xa, ya, ia), (xb, yb, ib) in zip(plain, spawned):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


# --------------------------------------------------------------------------- training

def test_train_from_rec_through_the_cli(rec, tmp_path):
    args = ["train", _yaml(tmp_path)]
    for o in _overrides(rec, tmp_path / "run", "data.num_workers=1"):
        args += ["--set", o]
    assert main(args) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("ce" in x and np.isfinite(x["ce"]) for x in lines)


def _corrupt_image(rec, key):
    """Overwrite the start of record ``key``'s image bytes (same length: the file stays framed)."""
    off = _record_offset(rec, key) + 8 + 24
    with open(rec, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\xaa" * 16)


def test_on_corrupt_skip_trains_and_error_names_the_file(rec, tmp_path, capsys):
    bad = _copy_rec(rec, tmp_path / "bad")
    _corrupt_image(bad, 5)
    trainer = Trainer(load_config(None, _overrides(bad, tmp_path / "s")))
    with pytest.warns(CorruptSampleWarning, match="record 5"):
        image, label, index = trainer.dataset[4]  # key 5 = item 4
    assert index != 4 and label == trainer.dataset.labels[4] and trainer.dataset.skipped == 1
    args = ["train", _yaml(tmp_path)]
    for o in _overrides(bad, tmp_path / "e", "data.on_corrupt=error", "sampler.random_size=24",
                        "sampler.identities_per_batch=0", "train.ce_on=all", "data.num_workers=1"):
        args += ["--set", o]
    assert main(args) == 2  # raised in a DataLoader worker: the message, not torch's traceback
    err = capsys.readouterr().err
    assert f"{bad} record 5" in err and "cannot decode" in err and "worker process 0" in err
    assert "Traceback" not in err and "File " not in err


def test_rec_without_idx_is_indexed_by_a_scan_with_a_warning(rec, tmp_path):
    copy = _copy_rec(rec, tmp_path / "noidx")
    copy.with_suffix(".idx").unlink()
    with pytest.warns(UserWarning, match=r"train\.idx not found: indexing .*train\.rec by a sequential scan"):
        ds = RecordDataset(copy, input_size=SIZE)
    assert np.array_equal(ds.labels, RecordDataset(rec).labels)
    assert torch.equal(ds[3][0], RecordDataset(rec, input_size=SIZE)[3][0])


def test_truncated_rec_is_a_clear_error(rec, tmp_path, capsys):
    cut = _copy_rec(rec, tmp_path / "cut")
    with open(cut, "r+b") as fh:
        fh.truncate(_record_offset(cut, 24) + 40)  # inside the last image record
    where = re.escape(str(cut)) + r": (truncated record header|record) at byte offset"
    with pytest.raises(DataError, match=where):
        RecordDataset(cut, on_corrupt="error")
    args = ["train", _yaml(tmp_path)]
    for o in _overrides(cut, tmp_path / "e", "data.on_corrupt=error"):
        args += ["--set", o]
    assert main(args) == 2
    assert str(cut) in capsys.readouterr().err


def test_non_contiguous_labels_warn_naming_the_file(tmp_path, faces):
    rec = tmp_path / "sparse" / "train.rec"
    png = sorted(faces.rglob("*.png"))
    with RecordIOWriter(rec) as w:  # no header record 0: every key is an image
        for key, label in enumerate([0, 0, 0, 2, 2, 2, 5, 5, 5]):
            w.write(key, pack(IRHeader(0, float(label), key), png[key].read_bytes()))
    with pytest.warns(UserWarning, match=re.escape(f"{rec}: labels are not contiguous: 3 of 0..5 unused")):
        trainer = Trainer(load_config(None, _overrides(rec, tmp_path / "r", "sampler.random_size=3")))
    assert trainer.dataset.num_classes == 6 and trainer.head.weight.shape[0] == 6
    assert "ce" in trainer.fit().final_terms


# --------------------------------------------------------------------------- teacher cache

def _cache_cli(data, out, teacher_file, *extra):
    return main(["teacher-cache", "--data", str(data), "--input-size", str(SIZE), "--out", str(out),
                 "--teacher", str(teacher_file), "--backbone", "mobilefacenet", "--device", "cpu",
                 "--batch-size", "4", "--chunk-batches", "1", *extra])


def test_teacher_cache_over_rec_trains_and_is_refused_for_another_file(rec, teacher_file, tmp_path):
    assert _cache_cli(rec, tmp_path / "c", teacher_file) == 0
    ds = RecordDataset(rec, input_size=SIZE)
    cache = TeacherCache(tmp_path / "c", fingerprint_of(ds), file_fingerprint(teacher_file))
    assert cache.manifest["dataset_kind"] == "rec" and len(cache) == len(ds)
    net, _ = embedder_from_file(teacher_file, "mobilefacenet", SIZE, torch.device("cpu"))
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in (2, 17)])
        expected = torch.cat([net(x), net(x.flip(-1))])
    got = cache.lookup(torch.tensor([2, 17, 2, 17]), torch.tensor([False, False, True, True]))
    assert torch.allclose(got, expected, rtol=2e-3, atol=2e-3)
    cached = _overrides(rec, tmp_path / "s", "teacher.kind=cache", f"teacher.path={tmp_path / 'c'}",
                        f"teacher.cache_teacher={teacher_file}", "distill=[{name: ekd}]")
    assert "ekd_pos" in Trainer(load_config(None, cached)).fit().final_terms
    relabelled = _copy_rec(rec, tmp_path / "other")  # same size and offsets, one label changed
    with open(relabelled, "r+b") as fh:
        fh.seek(_record_offset(relabelled, 1) + 8 + 4)
        fh.write(struct.pack("<f", 3.0))
    other = [o if not o.startswith("data.root=") else f"data.root={relabelled}" for o in cached]
    other.append(f"train.output_dir={tmp_path / 'other_run'}")
    refused = re.escape(f"made for another dataset ({rec}) than {relabelled}")
    with pytest.raises(CheckpointError, match=refused):
        Trainer(load_config(None, other))


def _cache_worker(rank, world, port, rec, teacher_file, out):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        assert _cache_cli(rec, out, teacher_file) == 0
    finally:
        D.shutdown()


def _cache_bytes(folder):
    return [(folder / n).read_bytes() for n in ("embeddings.f16", "norms.f32")]


def test_two_process_cache_equals_one_process_and_resume_equals_straight_run(rec, teacher_file, tmp_path,
                                                                            caplog):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _cache_cli(rec, tmp_path / "one", teacher_file) == 0
        # interrupted after 2 of 6 chunks, then the same command resumes it
        ds = RecordDataset(rec, input_size=SIZE)
        net, name = embedder_from_file(teacher_file, "mobilefacenet", SIZE, torch.device("cpu"))
        for folder in ("resumed", "marked"):
            calls = []
            counted = lambda x: (calls.append(len(x)), net(x))[1]  # noqa: E731
            build_cache(counted, ds, tmp_path / folder, file_fingerprint(teacher_file), name, batch_size=4,
                        chunk_batches=1, progress=False, stop_after_chunks=2)
            assert calls == [1, 4, 4, 4, 4]  # a probe, then 2 chunks of one batch and its mirror
        assert np.fromfile(tmp_path / "resumed" / DONE_FILE, np.uint8).tolist() == [1, 1, 0, 0, 0, 0]
        with pytest.raises(CheckpointError, match="unfinished .* run the same command again"):
            TeacherCache(tmp_path / "resumed")
        with caplog.at_level(logging.INFO, logger="ekd.teacher_cache"):
            assert _cache_cli(rec, tmp_path / "resumed", teacher_file) == 0
        assert "resuming an unfinished cache" in caplog.text
        assert not (tmp_path / "resumed" / DONE_FILE).exists()
        assert _cache_bytes(tmp_path / "resumed") == _cache_bytes(tmp_path / "one")
        # chunks done before the interrupt are not embedded again: a mark in chunk 0 survives
        norms = np.memmap(tmp_path / "marked" / "norms.f32", np.float32, "r+", shape=(24, 2))
        norms[:4] = 7.0
        norms.flush()
        assert _cache_cli(rec, tmp_path / "marked", teacher_file) == 0
        marked = TeacherCache(tmp_path / "marked")
        assert (marked.norms[:4] == 7.0).all()
        assert np.array_equal(marked.norms[4:], TeacherCache(tmp_path / "one").norms[4:])
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_cache_worker, args=(2, _free_port(), rec, teacher_file, tmp_path / "two"), nprocs=2, join=True)
    assert _cache_bytes(tmp_path / "two") == _cache_bytes(tmp_path / "one")
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    assert manifests[0] == manifests[1] and manifests[0]["complete"] is True


# --------------------------------------------------------------------------- torchrun training

def _train_worker(rank, world, port, rec, out):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        with Trainer(load_config(None, _overrides(rec, out / "run"))) as trainer:
            images, labels, indices = next(iter(trainer.loader))
            trainer.train_step(images, labels, indices, torch.zeros(len(labels), dtype=torch.bool))
        torch.save({"images": images, "labels": labels, "indices": indices}, out / f"batch{rank}.pt")
    finally:
        D.shutdown()


def test_two_process_training_from_rec_gives_each_rank_its_share(rec, tmp_path):
    mp.spawn(_train_worker, args=(2, _free_port(), rec, tmp_path), nprocs=2, join=True)
    ds = RecordDataset(rec, input_size=SIZE)
    batches = [torch.load(tmp_path / f"batch{r}.pt", weights_only=True) for r in (0, 1)]
    random_parts = [set(b["indices"][:4].tolist()) for b in batches]
    assert not random_parts[0] & random_parts[1]  # disjoint shares of the epoch permutation
    for b in batches:
        for j, i in enumerate(b["indices"].tolist()):
            assert torch.equal(b["images"][j], ds[i][0]) and int(b["labels"][j]) == ds.labels[i]


# --------------------------------------------------------------------------- unpack

def test_unpack_then_pack_reproduces_the_rec(faces, rec, tmp_path, capsys):
    assert main(["data", "unpack", str(rec), str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 24 and summary["identities"] == 6 and summary["reencoded_as_png"] == 0
    files = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.png"))
    assert [p.parts[0] for p in files] == [str(label) for label in RecordDataset(rec).labels]
    originals = sorted(faces.rglob("*.png"))
    assert [(tmp_path / "out" / p).read_bytes() for p in files] == [p.read_bytes() for p in originals]
    assert main(["data", "pack", str(tmp_path / "out"), str(tmp_path / "again" / "train.rec")]) == 0
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "again" / name).read_bytes() == (rec.parent / name).read_bytes(), name
    assert main(["data", "unpack", str(rec), str(tmp_path / "out")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
