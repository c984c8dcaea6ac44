"""RecordIO: files built byte by byte from the dmlc/MXNet format description, our writer's framing,
InsightFace's header record 0, errors with byte offsets, and a folder round trip."""

from __future__ import annotations

import io
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ekd.commands.cli import main
from ekd.commands.cli_data import recordio_info
from ekd.data import ImageFolderDataset
from ekd.data.rec_folder import pack_folder
from ekd.data.record_dataset import RecordDataset
from ekd.data.recordio import IRHeader, RecordIOReader, encode_record, pack, unpack
from ekd.errors import DataError

MAGIC = 0xCED7230A
MAGIC_LE = struct.pack("<I", MAGIC)


def part(cflag: int, payload: bytes) -> bytes:
    """magic, lrec = cflag << 29 | length, payload, zero padding to 4 bytes (dmlc recordio.h)."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(payload)) + payload + b"\0" * (-len(payload) % 4)


def irheader(flag: int, label: float, rid: int = 0, rid2: int = 0) -> bytes:
    return struct.pack("<IfQQ", flag, label, rid, rid2)  # MXNet's 24-byte 'IfQQ' header


def png(seed: int, size: tuple[int, int] = (20, 16)) -> tuple[bytes, np.ndarray]:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), arr


def write_files(tmp_path, records: list[bytes], with_idx: bool = True):
    """records are already framed parts; the .idx lists 'key\\toffset' for keys 0, 1, ..."""
    rec = tmp_path / "train.rec"
    blob, lines, off = b"", [], 0
    for key, r in enumerate(records):
        lines.append(f"{key}\t{off}\n")
        blob += r
        off += len(r)
    rec.write_bytes(blob)
    if with_idx:
        (tmp_path / "train.idx").write_text("".join(lines))
    return rec


def insightface_file(tmp_path):
    """Header record 0 (flag 2, [3, 5]), image 1 (scalar label 0), image 2 (array label [1, 7],
    split in 3 parts by two aligned magic numbers), identity records 3, 4."""
    img1, arr1 = png(1)
    img2, arr2 = png(2)
    body2 = irheader(2, 0.0, 2) + struct.pack("<2f", 1.0, 7.0) + img2
    body2 += b"\0" * (-len(body2) % 4)
    i1 = len(body2)  # aligned position of the first magic
    data2 = body2 + MAGIC_LE + b"midl" + MAGIC_LE + b"end"
    records = [
        part(0, irheader(2, 0.0) + struct.pack("<2f", 3.0, 5.0)),
        part(0, irheader(0, 0.0, 1) + img1),
        part(1, data2[:i1]) + part(2, b"midl") + part(3, b"end"),
        part(0, irheader(2, 0.0, 3) + struct.pack("<2f", 1.0, 2.0)),
        part(0, irheader(2, 0.0, 4) + struct.pack("<2f", 2.0, 3.0)),
    ]
    return write_files(tmp_path, records), (arr1, arr2), data2


def test_handbuilt_insightface_file(tmp_path):
    rec, (arr1, arr2), data2 = insightface_file(tmp_path)
    ds = RecordDataset(rec, input_size=16)
    assert ds.header0 == (3, 5)
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1] and ds.num_classes == 2
    assert ds.identity_ranges == {3: (1, 2), 4: (2, 3)}
    np.testing.assert_array_equal(ds.image(0), arr1)
    np.testing.assert_array_equal(ds.image(1), arr2)
    assert ds.reader.read(2) == data2  # parts joined, magic re-inserted
    header, _ = unpack(ds.reader.read(2))
    assert header.flag == 2 and header.label.tolist() == [1.0, 7.0] and header.id == 2
    x, label, index = ds[1]
    assert x.shape == (3, 16, 16) and label == 1 and index == 1


def test_writer_framing_matches_format(tmp_path):
    _, _, data2 = insightface_file(tmp_path)
    i1 = data2.index(MAGIC_LE)
    expected = part(1, data2[:i1]) + part(2, b"midl") + part(3, b"end")
    assert encode_record(data2) == expected
    assert encode_record(b"abcde") == part(0, b"abcde")
    # a magic at an unaligned position is data, not a split point
    assert encode_record(b"xy" + MAGIC_LE + b"zz") == part(0, b"xy" + MAGIC_LE + b"zz")
    assert encode_record(MAGIC_LE) == part(1, b"") + part(3, b"")


def test_pack_unpack_labels():
    assert pack(IRHeader(0, 3.0, 7, 1), b"img") == irheader(0, 3.0, 7, 1) + b"img"
    h, payload = unpack(pack(IRHeader(0, 3.0), b"img"))
    assert h.flag == 0 and h.label == 3.0 and payload == b"img"
    h, payload = unpack(pack(IRHeader(0, np.array([4.0, 9.0])), b"x"))
    assert h.flag == 2 and h.label.tolist() == [4.0, 9.0] and payload == b"x"
    with pytest.raises(DataError, match="24-byte"):
        unpack(b"short")
    with pytest.raises(DataError, match="3 float32 labels"):
        unpack(irheader(3, 0.0) + b"\0" * 4)


def test_file_without_header0_and_without_idx(tmp_path):
    imgs = [png(i) for i in range(3)]
    records = [part(0, irheader(0, float(lab), k) + b) for k, ((b, _), lab) in
               enumerate(zip(imgs, [5, 2, 5]))]
    rec = write_files(tmp_path, records, with_idx=False)
    ds = RecordDataset(rec)
    assert ds.header0 is None and len(ds) == 3
    assert ds.labels.tolist() == [5, 2, 5] and ds.num_classes == 6
    np.testing.assert_array_equal(ds.image(2), imgs[2][1])
    np.testing.assert_array_equal(RecordDataset(rec, color="bgr").image(2), imgs[2][1][..., ::-1])


def test_scan_without_idx_skips_padding_of_odd_lengths(tmp_path):
    """Records of length 1, 2 and 3 mod 4 are followed by 3, 2 and 1 zero bytes of padding; a
    sequential scan (no .idx) must step over them to find the next magic number."""
    imgs = [png(i) for i in range(4)]
    payloads = []
    for k, (b, _) in enumerate(imgs):
        body = irheader(0, float(k), k) + b
        extra = (k + 1 - len(body)) % 4  # total length = k + 1 (mod 4): 1, 2, 3, 0
        payloads.append(body + b"\xff" * extra)  # trailing bytes after the PNG's IEND chunk
    assert sorted(len(p) % 4 for p in payloads) == [0, 1, 2, 3]
    rec = write_files(tmp_path, [part(0, p) for p in payloads], with_idx=False)
    ds = RecordDataset(rec)
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 2, 3]
    assert [ds.reader.read(k) for k in range(4)] == payloads
    for k in range(4):
        np.testing.assert_array_equal(ds.image(k), imgs[k][1])


def test_sparse_keys_and_header_split_by_magic(tmp_path):
    (b0, a0), (b1, a1) = png(7), png(8)
    data1 = struct.pack("<IfII", 0, 4.0, MAGIC, 0) + struct.pack("<Q", 0) + b1  # id = magic
    records = [part(0, irheader(0, 3.0) + b0), part(1, data1[:8]) + part(3, data1[12:])]
    rec = write_files(tmp_path, records)
    lines = (tmp_path / "train.idx").read_text().splitlines()
    (tmp_path / "train.idx").write_text(f"30\t{lines[0].split()[1]}\n20\t{lines[1].split()[1]}\n")
    ds = RecordDataset(rec)  # record 0 absent: every key is an image
    assert ds.image_keys.tolist() == [30, 20] and ds.labels.tolist() == [3, 4]
    np.testing.assert_array_equal(ds.image(1), a1)
    assert ds.reader.read(20) == data1 and ds.reader.offset(25) is None


def test_errors_name_file_and_offset(tmp_path):
    rec, _, _ = insightface_file(tmp_path)
    blob = bytearray(rec.read_bytes())
    off = int((tmp_path / "train.idx").read_text().splitlines()[1].split()[1])
    blob[off] ^= 0xFF
    rec.write_bytes(bytes(blob))
    reader = RecordIOReader(rec)
    with pytest.raises(DataError, match=f"bad magic .* byte offset {off}"):
        reader.read(1)
    with pytest.raises(DataError, match="no record with key 99"):
        reader.read(99)
    # a continuation part where a record must start
    cont = tmp_path / "c"
    cont.mkdir()
    write_files(cont, [part(2, b"abcd")])
    with pytest.raises(DataError, match="flag 2 at byte offset 0"):
        RecordIOReader(cont / "train.rec").read(0)
    # truncated data
    trunc = tmp_path / "t"
    trunc.mkdir()
    write_files(trunc, [part(0, b"x" * 40)[:20]])
    with pytest.raises(DataError, match="announces 40 bytes"):
        RecordIOReader(trunc / "train.rec").read(0)
    (trunc / "train.idx").write_text("0 zero\n")
    with pytest.raises(DataError, match=r"train.idx:1"):
        RecordIOReader(trunc / "train.rec")
    with pytest.raises(DataError, match="not found"):
        RecordIOReader(tmp_path / "nope.rec")


def make_folder(root, ids=3, per=(2, 3, 1)):
    expected = {}
    for i in range(ids):
        d = root / f"id{i}"
        d.mkdir(parents=True)
        for j in range(per[i]):
            arr = np.random.default_rng(10 * i + j).integers(0, 256, (24, 24, 3), dtype=np.uint8)
            fmt = "PNG" if j % 2 == 0 else "JPEG"
            path = d / f"{j}.{'png' if fmt == 'PNG' else 'jpg'}"
            Image.fromarray(arr).save(path, format=fmt)
            expected[str(path)] = path.read_bytes()
    return expected


def test_pack_folder_round_trip(tmp_path):
    files = make_folder(tmp_path / "faces")
    info = pack_folder(tmp_path / "faces", tmp_path / "out" / "train.rec")
    assert info["images"] == 6 and info["identities"] == 3 and info["image_size"] == [24, 24]
    assert (tmp_path / "out" / "property").read_text().strip() == "3,24,24"
    folder = ImageFolderDataset(tmp_path / "faces", input_size=24)
    ds = RecordDataset(tmp_path / "out", input_size=24)
    assert ds.header0 == (7, 10) and ds.num_classes == folder.num_classes == 3
    np.testing.assert_array_equal(ds.labels, folder.labels)
    assert ds.identity_ranges == {7: (1, 3), 8: (3, 6), 9: (6, 7)}
    for i in range(len(ds)):
        a, b = ds[i], folder[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
        assert unpack(ds.reader.read(i + 1))[1] == files[folder.samples[i][0]]  # bytes unchanged
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers re-map the file
    assert torch.equal(clone[3][0], ds[3][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    x, y, idx = next(iter(loader))
    assert x.shape == (4, 3, 24, 24) and y.tolist() == folder.labels[:4].tolist()
    summary = recordio_info(tmp_path / "out" / "train.rec")
    assert summary["images"] == 6 and summary["identities"] == 3 and summary["records"] == 10


def test_cli_pack_and_info(tmp_path, capsys):
    make_folder(tmp_path / "faces")
    assert main(["data", "pack", str(tmp_path / "faces"), str(tmp_path / "ms1m")]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert packed["images"] == 6 and (tmp_path / "ms1m.rec").is_file()
    assert main(["data", "info", str(tmp_path / "ms1m.rec")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["identities"] == 3 and info["image_size"] == [24, 24] and "colour_order" in info
    assert main(["data", "info", str(tmp_path / "nothing.txt")]) == 2
    assert "expected a .rec" in capsys.readouterr().err
