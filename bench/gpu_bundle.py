"""What travels to a GPU machine: the real faces the ``--profile gpu`` KD table reads, packed.

A device call gets the checkout plus the paths it carries, 64 MiB in all, and the faces folder
(``../shared/data/faces``) is not among them. ``pack`` writes, into an ignored folder, only what
the GPU table reads, with image bytes unchanged (no re-encoding), in parts that each travel in
one call beside the checkout:

- ``part1/``: ``train/`` as one InsightFace ``train.rec``/``.idx``/``property`` (``ekd data
  pack``, :func:`ekd.data.rec_folder.pack_folder`) and ``train_paths.txt``, the file names of
  its records, so that the identity folder comes back file for file.
- ``part2/``: the evaluation images (LFW all-pairs images and View-2 pairs' images, CFP fold 10)
  as ``eval.rec``/``.idx`` + ``eval_paths.txt``; ``lfw/pairs.txt``, CFP's pair lists and fold-10
  split files; ``teacher_dlib_r29/{lfw,cfp}.npz`` cut to the packed images (same order); the T2
  embedding cache of ``train/`` (``teacher_t2/``, what ``kd_table.py`` imports from
  ``teacher_dlib_r29/train.npz``: float16 unit vectors and float32 norms).
- ``part3/`` (``--with-t3``): ``teacher_dlib_r29_view32/`` (T3), ``train.npz`` whole, ``lfw``
  and ``cfp`` cut as above. The GPU profile does not use T3.

``restore`` (on the GPU machine, once parts 1 and 2 are there) writes the faces layout the
table reads (``--faces``) and puts the T2 cache where the table looks for it (``--cache``)::

    python -m bench.gpu_bundle pack --faces ../shared/data/faces --out .gpu_bundle
    python -m bench.gpu_bundle restore --bundle .gpu_bundle --faces .gpu_faces --cache .gpu_cache
    python -m bench.kd_table --profile gpu --faces .gpu_faces --cache .gpu_cache --budget 420

Each part has ``part.json`` (its files, sizes, SHA-256); ``restore`` checks them. ``pack`` also
writes ``bundle.json`` and prints each part's size plus the checkout's, against the 64 MiB limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
TRAVEL_LIMIT_MIB = 64.0  # the device call's working tree + carried paths
CFP_FOLD = 10
TEACHERS = {"T2": "teacher_dlib_r29", "T3": "teacher_dlib_r29_view32"}


# -- what the GPU table reads ---------------------------------------------------------------
def lfw_needed(faces: Path) -> list[str]:
    """LFW images the table's protocols read (``lfw/...`` paths, in the teacher file's order):
    the all-pairs selection of ``kd_protocols`` and every View-2 pair's images."""
    from bench.kd_protocols import load_protocols

    protocols = load_protocols(faces)
    wanted = {os.path.normpath(p) for p in (*protocols.all_pairs_paths, *protocols.lfw_pairs.paths1,
                                            *protocols.lfw_pairs.paths2)}
    paths = [str(p) for p in np.load(faces / TEACHERS["T2"] / "lfw.npz")["paths"]]
    kept = [p for p in paths if os.path.normpath(faces / "lfw" / p) in wanted]
    missing = wanted - {os.path.normpath(faces / "lfw" / p) for p in kept}
    if missing:  # a View-2 image without a teacher embedding: packed all the same
        kept += sorted(os.path.relpath(p, faces / "lfw").replace(os.sep, "/") for p in missing)
    return [f"lfw/{p}" for p in kept]


def cfp_files(faces: Path) -> tuple[list[str], list[str]]:
    """(images, protocol files) of CFP fold ``CFP_FOLD``, as ``cfp/...`` paths."""
    from ekd.eval.cfp import read_cfp_pairs

    images: dict[str, None] = {}
    for split in ("FF", "FP"):
        pairs = read_cfp_pairs(faces / "cfp", split, folds=(CFP_FOLD,))
        for p in (*pairs.paths1, *pairs.paths2):
            images.setdefault(os.path.relpath(p, faces).replace(os.sep, "/"), None)
    proto = ["cfp/Protocol/Pair_list_F.txt", "cfp/Protocol/Pair_list_P.txt"]
    proto += [f"cfp/Protocol/Split/{s}/{CFP_FOLD:02d}/{k}.txt" for s in ("FF", "FP") for k in ("same", "diff")]
    return list(images), proto


def cut_npz(src: Path, dst: Path, keep: set[str]) -> int:
    """``src`` (``paths``/``emb``/``emb_flip``) with only the rows whose path is in ``keep``, in
    their order; returns the rows written."""
    data = np.load(src, allow_pickle=False)
    rows = np.array([i for i, p in enumerate(data["paths"]) if str(p) in keep], dtype=np.int64)
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **{k: data[k][rows] for k in ("paths", "emb", "emb_flip")})
    return int(rows.size)


# -- packing ------------------------------------------------------------------------------
def pack_files(root: Path, relpaths: list[str], out: Path) -> None:
    """Files ``root/<relpath>`` as records ``1..N`` of ``out.rec/.idx`` (bytes as they are) and
    ``out_paths.txt`` naming them in that order."""
    from ekd.data.recordio import IRHeader, RecordIOWriter, pack

    with RecordIOWriter(out.with_suffix(".rec")) as writer:
        for key, rel in enumerate(relpaths, start=1):
            writer.write(key, pack(IRHeader(0, 0.0, key, 0), (root / rel).read_bytes()))
    out.with_name(out.name + "_paths.txt").write_text("".join(f"{p}\n" for p in relpaths))


def unpack_files(rec: Path, dest: Path, prefix: str = "") -> int:
    """Write every record of ``rec`` to ``dest/<prefix><name>`` (names from ``*_paths.txt``)."""
    from ekd.data.recordio import RecordIOReader, unpack

    names = rec.with_name(rec.stem + "_paths.txt").read_text().splitlines()
    reader = RecordIOReader(rec)
    for key, name in enumerate(names, start=1):
        _, data = unpack(reader.read(key), f"{rec} record {key}")
        target = dest / f"{prefix}{name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return len(names)


def sha256(file: Path) -> str:
    """SHA-256 of a file's bytes (ekd's teacher-file fingerprint)."""
    from ekd.teachers.cache import file_fingerprint

    return file_fingerprint(file)


def write_part_manifest(part: Path, role: str) -> dict:
    files = sorted(p for p in part.rglob("*") if p.is_file() and p.name != "part.json")
    entries = {str(p.relative_to(part)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    manifest = {"part": part.name, "role": role, "files": entries,
                "bytes": sum(e["bytes"] for e in entries.values())}
    (part / "part.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def checkout_bytes(repo: Path = REPO) -> int | None:
    """Bytes of what a device call sends from ``repo``: tracked and untracked, not ignored files
    (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=repo, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((repo / f).stat().st_size for f in out.decode().split("\0") if f and (repo / f).is_file())


def pack_bundle(faces: Path, out: Path, with_t3: bool = False) -> dict:
    """Write the bundle's parts under ``out`` (which must not hold one already); returns the
    summary also written to ``out/bundle.json``."""
    from ekd.data import ImageFolderDataset
    from ekd.data.rec_folder import pack_folder
    from ekd.errors import DataError
    from ekd.teachers.cache_builder import import_npz

    faces, out = Path(faces), Path(out)
    need = ["train", "lfw/pairs.txt", "cfp/Protocol", f"{TEACHERS['T2']}/train.npz",
            f"{TEACHERS['T2']}/lfw.npz", f"{TEACHERS['T2']}/cfp.npz"]
    need += [f"{TEACHERS['T3']}/{s}.npz" for s in ("train", "lfw", "cfp")] if with_t3 else []
    absent = [n for n in need if not (faces / n).exists()]
    if absent:
        raise DataError(f"{faces}: not a faces folder for the GPU table; missing {', '.join(absent)}")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty (remove it to pack again)")
    parts: dict[str, dict] = {}

    part = out / "part1"
    part.mkdir(parents=True)
    info = pack_folder(faces / "train", part / "train.rec")
    dataset = ImageFolderDataset(faces / "train")
    names = [os.path.relpath(p, faces / "train").replace(os.sep, "/") for p, _ in dataset.samples]
    (part / "train_paths.txt").write_text("".join(f"{n}\n" for n in names))
    parts["part1"] = write_part_manifest(part, "train/ (InsightFace .rec)")
    parts["part1"]["train"] = info

    part = out / "part2"
    part.mkdir(parents=True)
    lfw = lfw_needed(faces)
    cfp_images, cfp_proto = cfp_files(faces)
    pack_files(faces, lfw + cfp_images, part / "eval")
    for rel in ["lfw/pairs.txt", *cfp_proto]:
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(faces / rel, part / rel)
    rows = {}
    keep = {"lfw": {p[len("lfw/"):] for p in lfw}, "cfp": {p[len("cfp/"):] for p in cfp_images}}
    for name, kept in keep.items():
        rows[name] = cut_npz(faces / TEACHERS["T2"] / f"{name}.npz", part / TEACHERS["T2"] / f"{name}.npz", kept)
    import_npz(faces / TEACHERS["T2"] / "train.npz", dataset, part / "teacher_t2")
    parts["part2"] = write_part_manifest(part, "evaluation images, protocols, T2 embeddings and cache")
    parts["part2"].update({"lfw_images": len(lfw), "cfp_images": len(cfp_images), "teacher_rows": rows})

    if with_t3:
        part = out / "part3"
        part.mkdir(parents=True)
        (part / TEACHERS["T3"]).mkdir()
        shutil.copyfile(faces / TEACHERS["T3"] / "train.npz", part / TEACHERS["T3"] / "train.npz")
        for name, kept in keep.items():
            cut_npz(faces / TEACHERS["T3"] / f"{name}.npz", part / TEACHERS["T3"] / f"{name}.npz", kept)
        parts["part3"] = write_part_manifest(part, "T3 embeddings (not read by the GPU profile)")

    checkout = checkout_bytes()
    summary = {"faces": faces.name, "checkout_bytes": checkout, "limit_mib": TRAVEL_LIMIT_MIB,
               "parts": {k: {"role": v["role"], "bytes": v["bytes"], "mib": round(v["bytes"] / MIB, 2),
                             "with_checkout_mib": (round((v["bytes"] + checkout) / MIB, 2)
                                                   if checkout is not None else None)}
                         for k, v in parts.items()},
               "details": {k: {kk: vv for kk, vv in v.items() if kk not in ("files", "role", "bytes", "part")}
                           for k, v in parts.items()}}
    summary["total_bytes"] = sum(v["bytes"] for v in parts.values())
    (out / "bundle.json").write_text(json.dumps(summary, indent=1))
    return summary


# -- restoring ----------------------------------------------------------------------------
def check_part(part: Path) -> dict:
    """The part's manifest, after checking every file's size and SHA-256."""
    from ekd.errors import DataError

    file = part / "part.json"
    if not file.is_file():
        raise DataError(f"{part}: no part.json; carry {part} in the device call (see docs/gpu.md)")
    manifest = json.loads(file.read_text())
    for rel, entry in manifest["files"].items():
        p = part / rel
        if not p.is_file() or p.stat().st_size != entry["bytes"] or sha256(p) != entry["sha256"]:
            raise DataError(f"{p}: missing or changed since packing (expected {entry['bytes']} bytes)")
    return manifest


def restore_bundle(bundle: Path, faces: Path, cache: Path) -> dict:
    """Write the faces layout under ``faces`` and the T2 cache under ``cache/teacher_t2`` from
    ``bundle/part1`` and ``bundle/part2`` (and ``part3`` when present)."""
    from ekd.errors import DataError

    bundle, faces, cache = Path(bundle), Path(faces), Path(cache)
    absent = [p for p in ("part1", "part2") if not (bundle / p / "part.json").is_file()]
    if absent:
        raise DataError(f"{bundle}: {', '.join(absent)} not here. Each device call carries one part "
                        "and a warm machine keeps the earlier one; a fresh machine needs both again "
                        "(docs/gpu.md)")
    for p in sorted(bundle.glob("part*")):
        check_part(p)
    done = {"train_images": unpack_files(bundle / "part1" / "train.rec", faces / "train"),
            "eval_images": unpack_files(bundle / "part2" / "eval.rec", faces)}
    for part in sorted(bundle.glob("part[23]")):
        for src in part.rglob("*"):
            rel = src.relative_to(part)
            if src.is_file() and rel.parts[0] not in ("teacher_t2",) and src.suffix not in (".rec", ".idx") \
                    and src.name not in ("part.json", "eval_paths.txt"):
                (faces / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, faces / rel)
    target = cache / "teacher_t2"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle / "part2" / "teacher_t2", target)
    done.update({"faces": str(faces), "t2_cache": str(target)})
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack what the GPU table reads into parts")
    p.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    p.add_argument("--out", type=Path, default=REPO / ".gpu_bundle")
    p.add_argument("--with-t3", action="store_true", help="also part3: T3 embeddings")
    p = sub.add_parser("restore", help="rebuild the faces folder and the T2 cache from the parts")
    p.add_argument("--bundle", type=Path, default=REPO / ".gpu_bundle")
    p.add_argument("--faces", type=Path, default=REPO / ".gpu_faces")
    p.add_argument("--cache", type=Path, default=REPO / ".gpu_cache")
    args = ap.parse_args(argv)
    from ekd.errors import EkdError

    try:
        if args.command == "pack":
            summary = pack_bundle(args.faces, args.out, args.with_t3)
            for name, part in summary["parts"].items():
                total = part["with_checkout_mib"]
                verdict = "" if total is None else (" (fits)" if total <= TRAVEL_LIMIT_MIB else " (DOES NOT FIT)")
                print(f"{name}: {part['mib']:.2f} MiB, with the checkout {total} MiB of "
                      f"{TRAVEL_LIMIT_MIB:g}{verdict} - {part['role']}")
            print(f"bundle written to {args.out} ({summary['total_bytes'] / MIB:.2f} MiB)")
        else:
            print(json.dumps(restore_bundle(args.bundle, args.faces, args.cache), indent=1))
    except EkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
