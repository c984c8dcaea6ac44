"""No partial data without consent: a .rec cut short is an error in `ekd train` and `ekd data
info` alike (naming the file and the first bad record); data.accept_truncated trains on the
readable part and says at start and end what was dropped. `ekd data pack` checks the folder as
`ekd data check` does and writes each set's own property file."""

from __future__ import annotations

import logging
import re
import shutil

import pytest

from ekd.commands.cli import main
from ekd.data import generate_identity_folder
from ekd.data.record_dataset import RecordDataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("partial")
    generate_identity_folder(root / "faces", num_identities=20, images_per_identity=8, image_size=32, seed=1)
    assert main(["data", "pack", str(root / "faces"), str(root / "full" / "train.rec")]) == 0
    return root


def _cut(packed, tmp_path, keep_fraction=0.6):
    cut = tmp_path / "cut"
    shutil.copytree(packed / "full", cut)
    rec = cut / "train.rec"
    size = rec.stat().st_size
    with open(rec, "r+b") as fh:
        fh.truncate(int(size * keep_fraction) + 2)  # mid-record
    return rec


def _train(rec, run, *extra):
    sets = ["data.kind=rec", f"data.root={rec}", "data.input_size=32", "model.embedding_size=16",
            "sampler.random_size=8", "sampler.identities_per_batch=4", "train.epochs=1",
            "train.max_steps_per_epoch=2", "train.progress=false", "train.device=cpu",
            "train.tensorboard=false", f"train.output_dir={run}", *extra]
    return main(["train", str(run.parent / "run.yaml"), *(a for s in sets for a in ("--set", s))])


@pytest.fixture()
def run_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("data: {kind: rec}\n")


def test_a_rec_cut_short_is_an_error_in_info_and_train(packed, tmp_path, capsys, run_yaml):
    rec = _cut(packed, tmp_path)
    assert main(["data", "info", str(rec)]) == 2
    info = capsys.readouterr().err
    assert str(rec) in info and re.search(r"image record \d+ \(byte offset \d+\)", info)
    assert _train(rec, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.split("error: ", 1)[1] == info.split("error: ", 1)[1]  # the same message
    assert "data.accept_truncated=true" in err and not (tmp_path / "run" / "model.pt").exists()


def test_an_index_pointing_past_the_end_is_an_error(packed, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(packed / "full", cut)
    idx = cut / "train.idx"
    lines = idx.read_text().splitlines()
    key = lines[5].split("\t")[0]
    lines[5] = f"{key}\t{(cut / 'train.rec').stat().st_size + 400}"
    idx.write_text("\n".join(lines) + "\n")
    assert main(["data", "info", str(cut / "train.rec")]) == 2
    assert f"image record {key} " in capsys.readouterr().err


def test_accept_truncated_trains_on_the_readable_part_and_says_so_twice(packed, tmp_path, caplog, run_yaml):
    rec = _cut(packed, tmp_path)
    with pytest.warns(UserWarning, match="cut short"):
        readable = RecordDataset(rec, accept_truncated=True)
    dropped_images, dropped_ids, indexed = readable.truncated
    assert indexed == 160 and dropped_images == 160 - len(readable) > 0
    assert dropped_ids == 20 - len(set(readable.labels.tolist())) > 0
    with caplog.at_level(logging.WARNING, logger="ekd.train"):
        assert _train(rec, tmp_path / "run", "data.accept_truncated=true") == 0
    said = [r.getMessage() for r in caplog.records if "data.accept_truncated" in r.getMessage()]
    counts = f"{dropped_images} of 160 images and {dropped_ids} identities dropped"
    assert len(said) == 2 and all(counts in m for m in said)
    assert said[0].startswith("training on") and said[1].startswith("trained on")


def _break_one_jpeg(folder):
    victim = sorted((folder / sorted(p.name for p in folder.iterdir())[3]).iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    return victim


def test_pack_refuses_an_unreadable_image_or_leaves_it_out_when_asked(packed, tmp_path, capsys):
    faces = tmp_path / "faces"
    shutil.copytree(packed / "faces", faces)
    victim = _break_one_jpeg(faces)
    assert main(["data", "pack", str(faces), str(tmp_path / "a" / "train.rec")]) == 2
    assert str(victim) in capsys.readouterr().err and not (tmp_path / "a" / "train.rec").exists()
    assert main(["data", "pack", str(faces), str(tmp_path / "b" / "train.rec"), "--on-corrupt", "skip"]) == 0
    assert str(victim.relative_to(faces)) in capsys.readouterr().out
    assert len(RecordDataset(tmp_path / "b" / "train.rec")) == 159


def test_two_sets_packed_into_one_folder_keep_their_own_property(packed, tmp_path):
    small = tmp_path / "small"
    generate_identity_folder(small, num_identities=3, images_per_identity=2, image_size=16, seed=2)
    out = tmp_path / "sets"
    assert main(["data", "pack", str(packed / "faces"), str(out / "big")]) == 0
    assert main(["data", "pack", str(small), str(out / "small")]) == 0
    assert (out / "big.property").read_text() == "20,32,32\n"
    assert (out / "small.property").read_text() == "3,16,16\n"
    assert not (out / "property").exists()
    assert RecordDataset(out / "big.rec").num_classes == 20
