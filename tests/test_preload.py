"""``data.preload``: the resident training set gives the DataLoader's batches bit for bit,
refuses a set that does not fit, and the trainer logs the data-wait share of each step."""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image

from test_scale import _free_port, torchrun_env
from ekd.commands.cli import main
from ekd.config import load_config, save_config
from ekd.data import ImageFolderDataset, generate_identity_folder
from ekd.data.resident import ResidentBatches, ResidentImages, check_fits, resident_bytes
from ekd.data.robust import CorruptSampleWarning
from ekd.data.transforms import normalize, to_tensor
from ekd.utils import distributed as D
from ekd.engine.trainer import Trainer, train
from ekd.errors import ConfigError, DataError

CORRUPT = "id_00003/0001.png"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 identities x 5 images of 40 px (resized to 32 on reading), one of them corrupt."""
    root = tmp_path_factory.mktemp("preload") / "train"
    generate_identity_folder(root, num_identities=10, images_per_identity=5, image_size=40, seed=3)
    (root / CORRUPT).write_bytes(b"not an image")
    return root


def _cfg(folder, out, *extra):
    return load_config(None, ["data.kind=folder", f"data.root={folder}", "data.input_size=32",
                              "model.embedding_size=16", "sampler.random_size=8",
                              "sampler.identities_per_batch=3", "sampler.samples_per_identity=2",
                              "train.epochs=2", "train.max_steps_per_epoch=2", "train.progress=false",
                              "train.device=cpu", "train.log_every=1", "optim.lr=0.05",
                              f"train.output_dir={out}", *extra])


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_normalize_is_the_reference_formula_on_every_path(folder):
    ds = ImageFolderDataset(folder, input_size=32)
    img = Image.open(ds.samples[0][0]).convert("RGB").resize((32, 32), Image.BILINEAR)
    ref = (np.asarray(img, dtype=np.float32) - 127.5) / 127.5  # InsightFace's normalisation
    assert np.array_equal(ds[0][0].numpy(), ref.transpose(2, 0, 1))
    assert np.array_equal(to_tensor(img, 32, flip=True).numpy(), ref[:, ::-1].transpose(2, 0, 1))
    pixels = ds.read_uint8(0)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    assert torch.equal(normalize(pixels), ds[0][0])
    # the lookup table other devices use holds exactly the CPU's values
    values = torch.arange(256, dtype=torch.uint8)
    lut = normalize(values)
    assert torch.equal(lut[values.long()], (values.float() - 127.5) / 127.5)
    assert lut[0] == -1 and lut[255] == 1
    with pytest.raises(DataError, match="uint8"):
        normalize(values.float())


def test_resident_batches_equal_the_dataloader_batches(folder):
    ds = ImageFolderDataset(folder, input_size=32)
    with pytest.warns(CorruptSampleWarning, match="0001.png"):
        resident = ResidentImages.build(ds, "cpu", max_gb=1.0, progress=False)
    assert resident.images.shape == (50, 3, 32, 32) and resident.nbytes == resident_bytes(50, 32)
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("0001.png") and "id_00003" in p)
    sub = int(resident.indices[bad])
    assert sub != bad and ds.labels[sub] == ds.labels[bad]  # same identity stands in
    fresh = ImageFolderDataset(folder, input_size=32)
    batch = [bad, 0, 7, 49, bad, 12]
    images, labels, indices = resident.batch(batch)
    with pytest.warns(CorruptSampleWarning):
        items = [fresh[i] for i in batch]
    assert torch.equal(images, torch.stack([x for x, _, _ in items]))
    assert labels.tolist() == [y for _, y, _ in items] and indices.tolist() == [j for _, _, j in items]
    assert labels.dtype == indices.dtype == torch.int64
    loader = ResidentBatches(resident, [[0, 1], [2, 3, 4]])
    assert len(loader) == 2 and [len(b[1]) for b in loader] == [2, 3]


def test_preload_trains_exactly_as_the_dataloader(folder, tmp_path, caplog):
    plain = Trainer(_cfg(folder, tmp_path / "plain"))
    with pytest.warns(CorruptSampleWarning):
        plain.fit()
    assert plain.dataset.skipped > 0  # the corrupt image was drawn: the skip rule is compared too
    with caplog.at_level(logging.INFO, logger="ekd.train"), pytest.warns(CorruptSampleWarning):
        pre = train(_cfg(folder, tmp_path / "pre", "data.preload=true"))
    a, b = _rows(plain.run_dir), _rows(pre.run_dir)
    steps_a, steps_b = [r for r in a if "epoch_end" not in r], [r for r in b if "epoch_end" not in r]
    assert len(steps_a) == len(steps_b) == 4
    assert [r["loss"] for r in steps_a] == [r["loss"] for r in steps_b]  # bit for bit, step by step
    assert len({r["loss"] for r in steps_a}) > 1
    # the data-wait share is in every row and in the epoch log line
    assert all(0.0 < r["data_wait"] < 1.0 for r in a + b)
    assert sum(r.get("epoch_end", False) for r in b) == 2 and "data_wait=" in caplog.text


def test_preload_through_the_cli_with_workers(folder, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"kind": "folder", "root": str(folder), "input_size": 32,
                                            "preload": True, "num_workers": 1, "on_corrupt": "skip"}}))
    args = ["train", str(cfg), "--set", "model.embedding_size=16", "--set", "sampler.random_size=8",
            "--set", "sampler.identities_per_batch=3", "--set", "sampler.samples_per_identity=2",
            "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--set",
            "train.progress=false", "--set", "train.device=cpu", "--set", "train.log_every=1"]
    assert main(args + ["--set", f"train.output_dir={tmp_path / 'cli'}"]) == 0
    assert len([r for r in _rows(tmp_path / "cli") if "epoch_end" not in r]) == 1


def test_a_set_that_does_not_fit_is_refused_before_decoding(folder, tmp_path, monkeypatch, capsys):
    def never(self, index):  # noqa: ANN001, ARG001
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(ImageFolderDataset, "read_uint8", never)
    cfg = _cfg(folder, tmp_path / "big", "data.preload=true", "data.preload_max_gb=0.0001")
    with pytest.raises(ConfigError, match=r"needs 0\.000154 GB .*50 images x 3x32x32 uint8 = 153600 "
                                          r"bytes.*data\.preload_max_gb is 0\.0001"):
        Trainer(cfg)
    save_config(cfg, tmp_path / "big.yaml")
    code = main(["train", str(tmp_path / "big.yaml")])
    assert code == 2 and "data.preload_max_gb" in capsys.readouterr().err
    check_fits(50, 32, 0.000154)  # exactly 153,600 bytes: fits
    with pytest.raises(ConfigError, match="112x112"):
        check_fits(10**6, 112, 4)


def test_preload_follows_on_corrupt_error(folder):
    ds = ImageFolderDataset(folder, input_size=32, on_corrupt="error")
    with pytest.raises(DataError, match="0001.png"):
        ResidentImages.build(ds, "cpu", progress=False)


def test_preload_needs_read_uint8():
    class NoPixels(torch.utils.data.Dataset):
        input_size, labels = 32, np.zeros(4, np.int64)

        def __len__(self):
            return 4

    with pytest.raises(ConfigError, match="NoPixels cannot be preloaded"):
        ResidentImages.build(NoPixels(), "cpu")

    class WrongPixels(NoPixels):
        def read_uint8(self, index):
            return torch.zeros(3, 28, 28, dtype=torch.uint8)

    with pytest.raises(DataError, match=r"read_uint8\(0\) returned torch.uint8 \(3, 28, 28\), "
                                        r"expected uint8 \(3, 32, 32\)"):
        ResidentImages.build(WrongPixels(), "cpu", progress=False)


def test_preload_max_gb_must_be_positive(folder, tmp_path):
    with pytest.raises(ConfigError, match="data.preload_max_gb must be > 0"):
        _cfg(folder, tmp_path, "data.preload_max_gb=0")


def _two_process_worker(rank, world, port, folder, out):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", CorruptSampleWarning)
    trainers = []  # one process group for both: the first trainer joined it, closes it last
    try:
        for name, extra in (("plain", ()), ("pre", ("data.preload=true",))):
            trainers.append(Trainer(_cfg(folder, out / name, "train.epochs=1", *extra)))
            trainers[-1].fit()
            torch.save(trainers[-1].student.state_dict(), out / f"{name}{rank}.pt")
    finally:
        for trainer in reversed(trainers):
            trainer.close()
        D.shutdown()


def test_preload_under_two_processes_trains_as_the_dataloader(folder, tmp_path):
    """Each rank preloads the whole set and draws its own sampler's batches from it: the same
    per-rank batches, hence the same DDP training, as with DataLoaders."""
    port = _free_port()
    mp.spawn(_two_process_worker, args=(2, port, folder, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        plain = torch.load(tmp_path / f"plain{rank}.pt", weights_only=True)
        pre = torch.load(tmp_path / f"pre{rank}.pt", weights_only=True)
        assert all(torch.equal(plain[k], pre[k]) for k in plain)
    a, b = _rows(tmp_path / "plain"), _rows(tmp_path / "pre")
    assert [r["loss"] for r in a if "loss" in r] == [r["loss"] for r in b if "loss" in r]
    assert len([r for r in a if "epoch_end" not in r]) == 2
