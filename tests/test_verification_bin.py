"""Verification .bin: round trip, Python 2 / protocol 2 pickles, hostile pickles refused, make-bin,
evaluation identical to the same pairs read from files."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ekd.commands.cli import main
from ekd.commands.cli_data import bin_info
from ekd.data.verification_bin import BinDataset, load_bin, read_bin, write_bin
from ekd.errors import DataError
from ekd.eval.evaluate import evaluate_bin, evaluate_pairs
from ekd.eval.protocols import read_pair_list


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest single-threaded on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoded(seed: int, fmt: str = "PNG", size: int = 16) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.normal(120, 40, (size, size, 3)) + [40, 0, -40], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue(), arr


def test_round_trip_and_decode(tmp_path):
    imgs = [encoded(i) for i in range(6)]
    out = write_bin([b for b, _ in imgs], [True, False, True], tmp_path / "x.bin")
    bins, issame = load_bin(out)
    assert bins == [b for b, _ in imgs] and issame.tolist() == [True, False, True]
    arrays, same = read_bin(out)
    assert arrays.shape == (6, 16, 16, 3) and same.tolist() == [True, False, True]
    np.testing.assert_array_equal(arrays[4], imgs[4][1])
    bgr, _ = read_bin(out, color="bgr")
    np.testing.assert_array_equal(bgr[4], imgs[4][1][..., ::-1])
    ds = BinDataset(out, input_size=8)
    assert len(ds) == 6 and ds[0].shape == (3, 8, 8)
    info = bin_info(out)
    assert info["pairs"] == 3 and info["genuine"] == 2 and info["encodings"] == {"PNG": 6}
    assert info["colour_order"].startswith("looks RGB")


def test_python2_and_protocol2_pickles(tmp_path):
    data, arr = encoded(1, "JPEG")
    p2 = tmp_path / "p2.bin"  # Python 3 bytes at protocol 2 go through _codecs.encode
    p2.write_bytes(pickle.dumps(([data, data, data, data], [True, False]), protocol=2))
    assert load_bin(p2)[0][0] == data
    assert b"_codecs" in p2.read_bytes()
    # Python 2 style: PROTO 2, list of SHORT_BINSTRING (str = bytes), list of NEWTRUE/NEWFALSE
    s = b"\x80\x02(]q\x00(" + b"".join(b"U" + bytes([3]) + b"abc" for _ in range(4))
    s += b"e]q\x01(\x88\x89et."  # APPENDS, list [True, False], TUPLE of marks, STOP
    py2 = tmp_path / "py2.bin"
    py2.write_bytes(s)
    bins, issame = load_bin(py2)
    assert bins == [b"abc"] * 4 and issame.tolist() == [True, False]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_hostile_pickles_execute_nothing(tmp_path, protocol):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([_Evil(), b"x"], [True]), protocol=protocol))
    with pytest.raises(DataError, match="not allowed"):
        load_bin(evil)
    hand = tmp_path / "hand.bin"  # GLOBAL os.system + REDUCE, written by hand
    hand.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(DataError, match="os.system"):
        load_bin(hand)
    for payload in (b"cbuiltins\neval\n(S'1+1'\ntR.",  # eval
                    b"c__builtin__\nbytes\n(I10000000000\ntR.",  # allowed name, wrong use
                    b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",
                    b"\x80\x02cbuiltins\ngetattr\nq\x00."):
        hand.write_bytes(payload)
        with pytest.raises(DataError):
            load_bin(hand)
    assert not marker.exists()


def test_malformed_bins(tmp_path):
    f = tmp_path / "bad.bin"
    for obj, msg in ((([b"a"], [True]), "1 images for 1 pairs"), ({"a": 1}, "expected a pickled"),
                     (([b"a", 3], [True]), "image 1 is a int"), (([b"a", b"b"], ["yes"]), "booleans")):
        f.write_bytes(pickle.dumps(obj))
        with pytest.raises(DataError, match=msg):
            load_bin(f)
    f.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="bad.bin"):
        load_bin(f)
    with pytest.raises(DataError, match="not found"):
        load_bin(tmp_path / "missing.bin")
    write_bin([b"notanimage", b"x"], [True], f)
    with pytest.raises(DataError, match="image 0"):
        BinDataset(f).image(0)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pair_folder(tmp_path, n_pairs: int = 20):
    lines = []
    for i in range(n_pairs):
        for j in (0, 1):
            b, _ = encoded(100 * i + j + (0 if i % 2 else 1000 * j), "PNG")
            (tmp_path / f"{i}_{j}.png").write_bytes(b)
        lines.append(f"{i}_0.png {i}_1.png {i % 2}")
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.txt"


def test_make_bin_cli_and_evaluation_matches_files(tmp_path, capsys):
    pairs = pair_folder(tmp_path)
    assert main(["data", "make-bin", str(pairs), str(tmp_path / "set.bin")]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made == {"bin": str(tmp_path / "set.bin"), "pairs": 20, "genuine": 10, "images": 40}
    assert main(["data", "info", str(tmp_path / "set.bin")]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 20
    model = Tiny()
    from_bin = evaluate_bin(model, tmp_path / "set.bin", input_size=16, batch_size=7)
    from_files = evaluate_pairs(model, read_pair_list(pairs), input_size=16, batch_size=7)
    for key in ("accuracy", "accuracy_std", "auc", "tpr@1e-1"):
        assert from_bin[key] == pytest.approx(from_files[key], abs=1e-12)
    assert "RGB" in from_bin["protocol"]
    bad = tmp_path / "bad.txt"
    bad.write_text("0_0.png missing.png 1\n")
    assert main(["data", "make-bin", str(bad), str(tmp_path / "b.bin")]) == 2
    assert "missing.png" in capsys.readouterr().err
