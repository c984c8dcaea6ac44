"""Bad data: corrupt/truncated images skipped (counted, warned) or fatal by switch, also inside
DataLoader workers; broken .rec files named with byte offsets; non-contiguous labels; the
folder checker (empty identities, unreadable files, duplicates)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ekd.config import load_config
from ekd.data import CorruptSampleWarning, ImageFolderDataset, check_folder
from ekd.data.record_dataset import RecordDataset
from ekd.data.recordio import MAGIC, IRHeader, RecordIOWriter, pack
from ekd.errors import ConfigError, DataError


def _img(seed: int, fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def faces(tmp_path):
    """id0: a ok, b truncated PNG, c ok; id1: d ok, e truncated JPEG, f not an image."""
    root = tmp_path / "faces"
    (root / "id0").mkdir(parents=True)
    (root / "id1").mkdir()
    (root / "id0" / "a.png").write_bytes(_img(1))
    (root / "id0" / "b.png").write_bytes(_img(2)[:60])
    (root / "id0" / "c.png").write_bytes(_img(3))
    (root / "id1" / "d.jpg").write_bytes(_img(4, "JPEG"))
    (root / "id1" / "e.jpg").write_bytes(_img(5, "JPEG")[:200])
    (root / "id1" / "f.png").write_bytes(b"definitely not a PNG")
    return root


def test_corrupt_image_is_skipped_with_a_counted_warning(faces):
    ds = ImageFolderDataset(faces, input_size=8)
    assert ds.on_corrupt == "skip" and ds.skipped == 0
    with pytest.warns(CorruptSampleWarning, match=r"b\.png"):
        image, label, index = ds[1]
    # replaced by another image of the same identity, returned with its own label and index
    assert (label, index) == (0, 2) and image.shape == (3, 8, 8)
    assert ds.skipped == 1 and 1 in ds.corrupt
    image, label, index = ds[1]  # known bad: substituted again, no new decode attempt needed
    assert index == 2 and ds.skipped == 2


def test_truncated_jpeg_skipped_and_error_switch(faces):
    ds = ImageFolderDataset(faces, input_size=8)
    with pytest.warns(CorruptSampleWarning, match=r"e\.jpg"):
        _, label, index = ds[4]
    assert label == 1 and index == 3  # f.png is unreadable too: wraps round to d.jpg
    strict = ImageFolderDataset(faces, input_size=8, on_corrupt="error")
    with pytest.raises(DataError, match=r"e\.jpg"):
        strict[4]
    with pytest.raises(DataError, match="on_corrupt must be one of skip, error"):
        ImageFolderDataset(faces, on_corrupt="ignore")


def test_skip_never_crashes_a_dataloader_worker_and_counts_across_workers(faces):
    ds = ImageFolderDataset(faces, input_size=8)
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)  # the workers warn on their own stderr
    labels = torch.cat([b[1] for b in batches])
    indices = torch.cat([b[2] for b in batches])
    assert len(labels) == 6
    assert set(indices.tolist()) <= {0, 2, 3}  # only readable items come out
    assert ds.skipped == 3  # b, e and f, counted in the workers, visible here


def test_all_unreadable_gives_a_clear_error(tmp_path):
    (tmp_path / "id0").mkdir()
    (tmp_path / "id0" / "x.png").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(CorruptSampleWarning), pytest.raises(DataError, match=r"x\.png.*gives up"):
        ds[0]


def test_missing_root_and_empty_identity_are_reported(tmp_path, faces):
    with pytest.raises(DataError, match="dataset folder not found: .*nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        ImageFolderDataset(tmp_path / "afile")
    (faces / "id2_empty").mkdir()
    with pytest.warns(UserWarning, match="without images.*id2_empty"):
        ds = ImageFolderDataset(faces)
    assert ds.classes == ["id0", "id1"]


def test_config_switch_for_corrupt_images():
    assert load_config(None, []).data.on_corrupt == "skip"
    assert load_config(None, ["data.on_corrupt=error"]).data.on_corrupt == "error"
    with pytest.raises(ConfigError, match="data.on_corrupt: 'drop' is not one of skip, error"):
        load_config(None, ["data.on_corrupt=drop"])


# ---------------------------------------------------------------------------------- check_folder

def test_check_folder_reports_everything(faces):
    (faces / "id2_empty").mkdir()
    (faces / "id3").mkdir()
    (faces / "id3" / "dup_of_a.png").write_bytes((faces / "id0" / "a.png").read_bytes())
    (faces / "id0" / "a_copy.png").write_bytes((faces / "id0" / "a.png").read_bytes())
    (faces / "id1" / "notes.txt").write_text("x")
    report = check_folder(faces)
    assert not report.ok
    assert report.identities == 3 and report.images == 8
    assert report.empty_identities == ["id2_empty"]
    assert report.single_image_identities == ["id3"]
    assert sorted(p for p, _ in report.unreadable) == ["id0/b.png", "id1/e.jpg", "id1/f.png"]
    assert report.duplicates_across == [["id0/a.png", "id0/a_copy.png", "id3/dup_of_a.png"]]
    assert report.other_files == ["id1/notes.txt"]
    text = report.format()
    for needle in ("PROBLEMS FOUND", "different identities", "id3/dup_of_a.png", "id2_empty",
                   "unreadable", "single image"):
        assert needle in text
    assert report.to_dict()["duplicates_across_identities"] == report.duplicates_across


def test_check_folder_within_identity_duplicates_and_clean_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(_img(1))
    (tmp_path / "a" / "2.png").write_bytes(_img(1))
    (tmp_path / "b" / "3.png").write_bytes(_img(3))
    (tmp_path / "b" / "4.png").write_bytes(_img(4))
    report = check_folder(tmp_path)
    assert report.ok and report.duplicates_within == [["a/1.png", "a/2.png"]]
    assert not report.duplicates_across and "OK" in report.format()
    with pytest.raises(DataError, match="not found"):
        check_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no identity sub-folders"):
        check_folder(tmp_path / "flat")


# ------------------------------------------------------------------------------------ RecordIO

def _rec(tmp_path, labels=(0, 0, 1), payloads=None, header0=True):
    """InsightFace layout with images 1..n; returns (rec path, byte offsets by key)."""
    payloads = payloads or [_img(i) for i in range(len(labels))]
    n = len(labels)
    with RecordIOWriter(tmp_path / "train.rec") as w:
        if header0:
            w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1], np.float32)), b""))
        for key, (label, data) in enumerate(zip(labels, payloads), start=1):
            w.write(key, pack(IRHeader(0, float(label), key), data))
    offsets = {int(k): int(o) for k, o in
               (line.split() for line in (tmp_path / "train.idx").read_text().splitlines())}
    return tmp_path / "train.rec", offsets


def test_rec_undecodable_image_skipped_or_error_with_offset(tmp_path):
    rec, offs = _rec(tmp_path, payloads=[_img(0), b"garbage-not-an-image", _img(2)])
    ds = RecordDataset(rec, input_size=8)
    with pytest.warns(CorruptSampleWarning, match=f"record 2 \\(byte offset {offs[2]}\\)"):
        _, label, index = ds[1]
    assert (label, index) == (0, 0) and ds.skipped == 1  # same identity first
    strict = RecordDataset(rec, input_size=8, on_corrupt="error")
    with pytest.raises(DataError, match=f"train.rec record 2 \\(byte offset {offs[2]}\\)"):
        strict[1]


def test_rec_bad_magic_and_truncation_name_file_and_offset(tmp_path):
    rec, offs = _rec(tmp_path)
    blob = bytearray(rec.read_bytes())
    blob[offs[2]:offs[2] + 4] = struct.pack("<I", 0xDEADBEEF)
    rec.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=f"train.rec: bad magic 0xdeadbeef at byte offset {offs[2]}"):
        RecordDataset(rec, on_corrupt="error")
    with pytest.warns(CorruptSampleWarning, match=f"left out 1 unreadable.*byte offset {offs[2]}"):
        ds = RecordDataset(rec, input_size=8)
    assert ds.dropped == [2] and ds.image_keys.tolist() == [1, 3] and len(ds) == 2

    (tmp_path / "t").mkdir()
    rec, offs = _rec(tmp_path / "t")
    rec.write_bytes(rec.read_bytes()[:offs[3] + 20])  # the last record cut short
    for on_corrupt in ("error", "skip"):  # cut short is never skipped silently
        with pytest.raises(DataError, match=f"train.rec: the file is cut short: image record 3 "
                                            f"\\(byte offset {offs[3]}\\) runs past its end"):
            RecordDataset(rec, on_corrupt=on_corrupt)
    with pytest.warns(UserWarning, match="cut short; using the readable part"):
        ds = RecordDataset(rec, accept_truncated=True)
    assert ds.image_keys.tolist() == [1, 2] and ds.truncated[0] == 1


def test_rec_impossible_header0_is_refused_without_allocating(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec") as w:
        w.write(0, pack(IRHeader(2, np.array([3e38, 3e38], np.float32)), b""))
        w.write(1, pack(IRHeader(0, 0.0, 1), _img(1)))
    with pytest.raises(DataError, match="header record 0 announces"):
        RecordDataset(tmp_path / "train.rec")


def test_rec_smaller_than_a_header_block(tmp_path):
    """A single 32-byte record (header, no image): labels are read without indexing past the end."""
    (tmp_path / "train.rec").write_bytes(struct.pack("<II", MAGIC, 24) + struct.pack("<IfQQ", 0, 0.0, 0, 0))
    (tmp_path / "train.idx").write_text("0\t0\n")
    ds = RecordDataset(tmp_path / "train.rec", input_size=8)
    assert ds.labels.tolist() == [0]
    with pytest.warns(CorruptSampleWarning), pytest.raises(DataError, match="gives up"):
        ds[0]


def test_rec_impossible_label_is_named(tmp_path):
    rec, offs = _rec(tmp_path, labels=(0, float("nan"), 1))
    with pytest.raises(DataError, match=f"record 2 \\(byte offset {offs[2]}\\) has impossible label nan"):
        RecordDataset(rec, on_corrupt="error")
    rec, _ = _rec(tmp_path, labels=(0, -4, 1))
    with pytest.raises(DataError, match="negative identity label -4"):
        RecordDataset(rec, on_corrupt="error")


def test_rec_non_contiguous_labels_warn_or_remap(tmp_path):
    rec, _ = _rec(tmp_path, labels=(2, 7, 7))
    with pytest.warns(UserWarning, match=r"not contiguous: 6 of 0\.\.7 unused \(e\.g\. 0, 1, 3, 4, 5\)"):
        ds = RecordDataset(rec)
    assert ds.labels.tolist() == [2, 7, 7] and ds.num_classes == 8 and ds.label_map is None
    remapped = RecordDataset(rec, remap_labels=True)
    assert remapped.labels.tolist() == [0, 1, 1] and remapped.num_classes == 2
    assert remapped.label_map.tolist() == [2, 7]
