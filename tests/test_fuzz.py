"""Property-based fuzzing of every reader of user files: arbitrary (and mutated valid) bytes or
text give a result or an :class:`~ekd.errors.EkdError`, never a foreign exception or a hang.

Each call runs under a 10 s alarm (a hang fails the test). Examples are kept modest so the file
runs in well under a minute on two shared cores.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import signal
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ekd.config import Config, _CHOICES, from_dict, load_config, validate
from ekd.data.record_dataset import RecordDataset
from ekd.data.recordio import IRHeader, RecordIOReader, RecordIOWriter, pack
from ekd.data.verification_bin import load_bin
from ekd.errors import EkdError
from ekd.eval.cfp import read_cfp_list, read_cfp_pairs
from ekd.eval.protocols import read_lfw_pairs, read_pair_list
from ekd.utils.checkpoint_io import load_file

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001
    raise Hang("no result within 10 s")


def ours_or_result(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
    """Run ``fn``; our own errors are fine, anything else (or a hang) fails the test."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except EkdError:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ------------------------------------------------------------------------------------ RecordIO

def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _valid_rec() -> tuple[bytes, bytes]:
    """An InsightFace-layout file: header 0, three images, two identity records."""
    with workdir() as d:
        with RecordIOWriter(d / "train.rec") as w:
            w.write(0, pack(IRHeader(2, np.array([4, 6], np.float32)), b""))
            for key, label in ((1, 0), (2, 0), (3, 1)):
                w.write(key, pack(IRHeader(0, float(label), key), _png(key)))
            w.write(4, pack(IRHeader(2, np.array([1, 3], np.float32), 4), b""))
            w.write(5, pack(IRHeader(2, np.array([3, 4], np.float32), 5), b""))
        return (d / "train.rec").read_bytes(), (d / "train.idx").read_bytes()


VALID_REC, VALID_IDX = _valid_rec()


def _exercise_rec(rec: bytes, idx: bytes | None) -> None:
    with workdir() as d:
        (d / "train.rec").write_bytes(rec)
        if idx is not None:
            (d / "train.idx").write_bytes(idx)
        reader = ours_or_result(RecordIOReader, d / "train.rec")
        if reader is not None:
            for key in reader.keys[:8].tolist():
                ours_or_result(reader.read, key)
        for mode in ("skip", "error"):
            ds = ours_or_result(RecordDataset, d / "train.rec", input_size=8, on_corrupt=mode)
            if ds is not None:
                assert len(ds) >= 1 and (ds.labels >= 0).all()
                for i in range(min(len(ds), 4)):
                    ours_or_result(ds.__getitem__, i)


@FUZZ
@given(rec=st.binary(max_size=300), idx=st.one_of(st.none(), st.binary(max_size=80)))
def test_recordio_arbitrary_bytes(rec, idx):
    _exercise_rec(rec, idx)


@st.composite
def mutated(draw, data: bytes):  # noqa: ANN001
    """``data`` with a few bytes overwritten (often in the 8-byte part headers) and maybe cut."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(out) - 1))
        out[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del out[draw(st.integers(0, len(out))):]
    return bytes(out)


@st.composite
def idx_text(draw):  # noqa: ANN001
    """Plausible ``key<TAB>offset`` lines: keys/offsets near and far from the real ones."""
    num = st.one_of(st.integers(-3, 8), st.integers(0, 400), st.integers(0, 2**64),
                    st.sampled_from([2**63 - 1, 2**63 - 36, 2**63, 2**64]))
    lines = draw(st.lists(st.tuples(num, num, st.sampled_from(["\t", " ", "  ", "\t\t"])),
                          max_size=8))
    return "".join(f"{k}{sep}{o}\n" for k, o, sep in lines).encode()


@FUZZ
@given(rec=mutated(VALID_REC), idx=st.one_of(mutated(VALID_IDX), idx_text()))
def test_recordio_mutated_valid_file(rec, idx):
    _exercise_rec(rec, idx)


F32 = st.floats(allow_nan=True, allow_infinity=True, width=32)


@FUZZ
@given(label=st.one_of(F32, st.sampled_from([16777215.0, 16777216.0, 9e6, -1.0, 2.5])),
       header=st.one_of(st.tuples(F32, F32), st.just((3.0, 5.0))), flag0=st.integers(0, 3),
       ranges=st.one_of(st.tuples(F32, F32),
                        st.sampled_from([(float("inf"), 1.0), (float("nan"), 2.0), (1.0, 2.0)])))
def test_recordio_impossible_labels_and_header0(label, header, flag0, ranges):
    """Record 0 (InsightFace header or not), image labels and identity records with any value."""
    with workdir() as d:
        with RecordIOWriter(d / "train.rec") as w:
            arr = np.asarray(header[:max(flag0, 1)], np.float32)
            w.write(0, pack(IRHeader(flag0, arr if flag0 else 0.0), b""))
            w.write(1, pack(IRHeader(0, label, 1), _png(1)))
            w.write(2, pack(IRHeader(0, 0.0, 2), _png(2)))
            for key in (3, 4):
                w.write(key, pack(IRHeader(2, np.asarray(ranges, np.float32), key), b""))
        _exercise_rec((d / "train.rec").read_bytes(), (d / "train.idx").read_bytes())


# ------------------------------------------------------------------------------- pair lists

TOKENS = st.sampled_from(["a.jpg", "b.png", "1", "0", "true", "False", "-3", "#", "x" * 300,
                          "\x00", "..", "/", "9" * 5000, "name", "1,2", "\u0663", "\u00b2", "\t", " "])
NOISE = st.lists(TOKENS, max_size=5).map(" ".join)
PATHS = st.one_of(st.sampled_from(["a.jpg", "b.png"]),
                  st.sampled_from(["missing.jpg", "x" * 300, "z\x00.jpg", "/abs/none.jpg"]))


def _lines(line, noise: bool = True):  # noqa: ANN001
    """Well-formed lines, maybe with one noise line inserted, joined by newlines."""
    body = st.lists(line, min_size=1, max_size=6)
    if noise:
        body = st.tuples(body, st.lists(NOISE, max_size=1), st.integers(0, 6)).map(
            lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])
    return body.map("\n".join)


PAIR_LINE = st.tuples(PATHS, PATHS, st.sampled_from(["1", "0", "TRUE", "false", "2", "1 # c"])).map(" ".join)
NUM = st.one_of(st.integers(1, 2), st.integers(-2, 10**6)).map(str)
NAME = st.one_of(st.sampled_from(["ann", "bob"]), st.sampled_from(["x" * 300, "c\x00", "zed"]))


@st.composite
def lfw_text(draw):  # noqa: ANN001
    """A header and n genuine + n impostor lines (counts sometimes off, images sometimes absent)."""
    n = draw(st.integers(1, 3))
    genuine = [f"{draw(NAME)} {draw(NUM)} {draw(NUM)}" for _ in range(n)]
    impostor = [f"{draw(NAME)} {draw(NUM)} {draw(NAME)} {draw(NUM)}" for _ in range(n)]
    header = draw(st.sampled_from([f"1 {n}", f"1\t{n}", f"{n}", f"2 {n}", "0 1", "a b", ""]))
    return "\n".join([header] + genuine + impostor + draw(st.lists(NOISE, max_size=1)))


LFW = lfw_text()
TEXT = st.one_of(st.text(max_size=100), _lines(NOISE, noise=False))


@FUZZ
@given(pairs=st.one_of(_lines(PAIR_LINE), TEXT), lfw=st.one_of(LFW, TEXT),
       raw=st.one_of(st.none(), st.binary(max_size=60)))
def test_pair_list_parsers(pairs, lfw, raw):
    with workdir() as d:
        for rel in ("a.jpg", "b.png", "ann/ann_0001.jpg", "ann/ann_0002.jpg", "bob/bob_0001.jpg"):
            (d / rel).parent.mkdir(exist_ok=True)
            (d / rel).write_bytes(b"")
        (d / "pairs.txt").write_bytes(raw if raw is not None else pairs.encode("utf-8"))
        (d / "lfw.txt").write_bytes(raw if raw is not None else lfw.encode("utf-8"))
        for missing in ("error", "skip"):
            out = ours_or_result(read_pair_list, d / "pairs.txt", missing=missing)
            assert out is None or len(out) >= 1
            out = ours_or_result(read_lfw_pairs, d / "lfw.txt", d, missing=missing)
            assert out is None or len(out) >= 1


CFP_LIST = _lines(st.tuples(NUM, PATHS).map(" ".join))
CFP_FOLD = _lines(st.tuples(NUM, NUM).map(",".join))


@FUZZ
@given(flist=st.one_of(CFP_LIST, TEXT), plist=st.one_of(CFP_LIST, TEXT), same=st.one_of(CFP_FOLD, TEXT),
       diff=st.one_of(CFP_FOLD, TEXT), split=st.sampled_from(["FF", "FP", "fp", "XX"]))
def test_cfp_readers(flist, plist, same, diff, split):
    with workdir() as d:
        proto = d / "Protocol"
        fold = proto / "Split" / split.upper() / "01"
        fold.mkdir(parents=True)
        (proto / "a.jpg").write_bytes(b"")
        (proto / "Pair_list_F.txt").write_text(flist, encoding="utf-8")
        (proto / "Pair_list_P.txt").write_text(plist, encoding="utf-8")
        (fold / "same.txt").write_text(same, encoding="utf-8")
        (fold / "diff.txt").write_text(diff, encoding="utf-8")
        ours_or_result(read_cfp_list, proto / "Pair_list_F.txt")
        for missing in ("ignore", "skip", "error"):
            out = ours_or_result(read_cfp_pairs, d, split, missing=missing)
            assert out is None or len(out) >= 1


# ---------------------------------------------------------------------------------- configs

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True), st.text(max_size=8))
ANY = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=3),
                                                st.dictionaries(st.text(max_size=8), c, max_size=3)),
                   max_leaves=10)
FIELDS = {"data": ["kind", "root", "input_size", "num_workers", "on_corrupt", "synthetic"],
          "sampler": ["random_size", "identities_per_batch", "samples_per_identity"],
          "model": ["backbone", "embedding_size", "dropout", "width"], "head": ["kind", "scale", "margin"],
          "teacher": ["kind", "path", "backbone", "embedding_size"],
          "optim": ["lr", "momentum", "milestones", "warmup_epochs", "scheduler", "gamma"],
          "train": ["epochs", "device", "ce_on", "log_every", "max_steps_per_epoch"],
          "eval": ["pairs", "max_per_identity", "batch_size"]}
CHOICE_VALUES = st.sampled_from(sorted({v for c in _CHOICES.values() for v in c}
                                       | {"ekd", "rkd", "nope", "iresnet18", "cuda:0"}))
NEAR = st.one_of(SCALARS, CHOICE_VALUES, st.integers(-2, 200), st.lists(SCALARS, max_size=3))
SECTIONS = st.fixed_dictionaries({}, optional={
    s: st.dictionaries(st.sampled_from(keys + ["bogus"]), NEAR, max_size=4) for s, keys in FIELDS.items()
} | {"distill": st.lists(st.fixed_dictionaries({}, optional={
    "name": CHOICE_VALUES, "weight": NEAR, "params": st.dictionaries(st.text(max_size=6), NEAR, max_size=2)}),
    max_size=2)})


@FUZZ
@given(tree=st.one_of(ANY, SECTIONS))
def test_config_structures(tree):
    cfg = ours_or_result(from_dict, Config, tree) if isinstance(tree, dict) else None
    if cfg is not None:
        ours_or_result(validate, cfg)
    ours_or_result(load_config, None, base=tree if isinstance(tree, dict) else {"data": tree})


@FUZZ
@given(text=st.one_of(st.text(max_size=200), SECTIONS.map(yaml.safe_dump),
                      st.sampled_from(["a: 2001-02-30", "!!python/object:os.system {}", "[" * 400,
                                       "a: &x [1]\nb: *x", "? [a]\n: 1", "data: !!binary eA=="])))
def test_config_yaml_text(text):
    with workdir() as d:
        (d / "c.yaml").write_text(text, encoding="utf-8")
        ours_or_result(load_config, d / "c.yaml")


@FUZZ
@given(sets=st.lists(st.tuples(st.sampled_from([f"{s}.{k}" for s, ks in FIELDS.items() for k in ks]
                                               + ["distill.0.weight", "distill", "x", "", "a..b"]),
                               st.one_of(st.text(max_size=12), st.sampled_from(["[1, 2]", "{a: 1}",
                                          "2001-02-30", ".nan", "-1", "[" * 300])))
                     .map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4))
def test_config_overrides(sets):
    ours_or_result(load_config, None, sets)


# ------------------------------------------------------------------------- .bin, checkpoints

VALID_BIN = pickle.dumps(([_png(1), _png(2)], [True]), protocol=2)


HUGE_LENGTHS = [op + struct.pack("<Q", n) for op in (b"\x80\x04\x8e", b"\x80\x05\x96", b"\x80\x04\x95")
                for n in (2**63, 2**40, 2**62)]  # BINBYTES8 / BYTEARRAY8 / FRAME of absurd sizes


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), mutated(VALID_BIN), st.sampled_from(HUGE_LENGTHS)))
def test_verification_bin_bytes(data):
    with workdir() as d:
        (d / "x.bin").write_bytes(data)
        ours_or_result(load_bin, d / "x.bin")


def _valid_checkpoint() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "format": "ekd-checkpoint"}, buf)
    return buf.getvalue()


@settings(FUZZ, max_examples=60)
@given(data=st.one_of(st.binary(max_size=200), mutated(_valid_checkpoint())))
def test_checkpoint_bytes(data):
    with workdir() as d:
        (d / "c.pt").write_bytes(data)
        ours_or_result(load_file, d / "c.pt")


def test_alarm_catches_a_hang():
    """The hang guard itself works (so a hang in the readers would fail, not stall)."""
    import time

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        with pytest.raises(Hang):
            time.sleep(2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
