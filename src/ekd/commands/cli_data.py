"""``ekd data check|pack|unpack|info|make-bin``: InsightFace data files without mxnet (wiring +
file summaries).

* ``ekd data pack FOLDER OUT`` -- ``OUT.rec``, ``OUT.idx`` and ``property`` from an identity folder
  (:func:`ekd.data.rec_folder.pack_folder`; ``OUT`` may also be ``train.rec`` or a folder).
* ``ekd data unpack REC OUT`` -- the identity folder ``OUT/<label>/<key>.jpg`` back from a ``.rec``
  (:func:`ekd.data.rec_folder.unpack_rec`; image bytes as stored).
* ``ekd data info FILE`` -- summary of a ``.rec`` (or its folder / ``.idx``) or a ``.bin``.
* ``ekd data make-bin PAIRS OUT`` -- a verification ``.bin`` from a ``path1 path2 label`` list.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np


#: Mean red minus mean blue (0-255) at the face centre beyond which the order is called.
COLOUR_MARGIN = 8.0


def guess_colour_order(images: list[np.ndarray]) -> str:
    """Heuristic on ``uint8 [H, W, 3]`` aligned faces: skin is redder than blue in RGB.

    Only the central region of each crop (the face; backgrounds can have any colour) is used,
    and no order is claimed when red and blue are within :data:`COLOUR_MARGIN` of each other.
    """
    if not images:
        return "unknown (no images)"

    def centre(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        return img[h // 4: h - h // 4, w // 4: w - w // 4].reshape(-1, 3).mean(axis=0)

    r, g, b = (float(v) for v in np.mean([centre(i) for i in images], axis=0))
    if abs(r - b) < 1.0 and abs(r - g) < 1.0:
        return "grayscale (R = G = B)"
    means = f"face centre mean channel 0 = {r:.1f}, channel 2 = {b:.1f}; a heuristic"
    if r - b > COLOUR_MARGIN:
        return f"looks RGB ({means})"
    if b - r > COLOUR_MARGIN:
        return (f"possibly BGR ({means}): faces bluer than red usually mean the images were "
                "encoded from BGR arrays; check a few with ekd data unpack")
    return f"undetermined ({means})"


def _samples(n: int, k: int = 64) -> list[int]:
    return np.unique(np.linspace(0, n - 1, min(k, n)).astype(int)).tolist()


def recordio_info(path: str | os.PathLike[str]) -> dict:
    """Summary of a ``.rec``: records, images, identities, image size, colour order guess."""
    from ekd.data.record_dataset import RecordDataset

    ds = RecordDataset(path)
    imgs = [ds.image(i) for i in _samples(len(ds))]
    return {"file": str(ds.reader.path), "records": len(ds.reader), "images": len(ds),
            "identities": int(np.unique(ds.labels).size), "num_classes": ds.num_classes,
            "header0": list(ds.header0) if ds.header0 else None,
            "image_size": list(imgs[0].shape[:2]), "colour_order": guess_colour_order(imgs),
            "decoded_as": "RGB (PIL, as mx.image.imdecode)"}


def _format_of(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return str(img.format)
    except Exception:  # noqa: BLE001 - undecodable images are counted, not fatal here
        return "undecodable"


def bin_info(path: str | os.PathLike[str]) -> dict:
    """Summary of a ``.bin``: pairs, genuine pairs, images, size, encodings, colour order guess."""
    from ekd.data.verification_bin import BinDataset

    ds = BinDataset(path)
    imgs = [ds.image(i) for i in _samples(len(ds))]
    formats: dict[str, int] = {}
    for b in ds.bins:
        f = _format_of(b)
        formats[f] = formats.get(f, 0) + 1
    return {"file": str(path), "pairs": int(ds.issame.size), "genuine": int(ds.issame.sum()),
            "images": len(ds), "image_size": list(imgs[0].shape[:2]), "encodings": formats,
            "colour_order": guess_colour_order(imgs), "decoded_as": "RGB (PIL, as mx.image.imdecode)"}


def _cmd_pack(args: argparse.Namespace) -> int:
    from ekd.data.rec_folder import pack_folder
    from ekd.data.recordio import rec_paths
    from ekd.output_paths import prepare_output_file

    out = Path(args.out)
    if out.is_dir() or str(args.out).endswith(("/", "\\")):
        out = out / "train.rec"
    prepare_output_file(rec_paths(out)[0], "OUT")
    print(json.dumps(pack_folder(args.folder, out, on_corrupt=args.on_corrupt, progress=True), indent=1))
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    from ekd.data.rec_folder import unpack_rec

    print(json.dumps(unpack_rec(args.rec, args.out, on_corrupt=args.on_corrupt, progress=True),
                     indent=1))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ekd.errors import DataError

    path = Path(args.file)
    if path.suffix == ".bin":
        info = bin_info(path)
    elif path.suffix in (".rec", ".idx") or path.is_dir():
        info = recordio_info(path)
    else:
        raise DataError(f"{path}: expected a .rec, .idx, .bin file or a folder holding train.rec")
    print(json.dumps(info, indent=1))
    return 0


def _cmd_make_bin(args: argparse.Namespace) -> int:
    from ekd.data.verification_bin import make_bin
    from ekd.eval.protocols import read_pair_list
    from ekd.output_paths import prepare_output_file

    prepare_output_file(args.out, "OUT")
    pairs = read_pair_list(Path(args.pairs), Path(args.root) if args.root else None)
    print(json.dumps(make_bin(pairs, args.out), indent=1))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from ekd.data.check import check_folder

    report = check_folder(args.folder, decode=not args.no_decode, progress=True)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return 0 if report.ok else 1


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data`` with its ``check``, ``pack``, ``unpack``, ``info`` and ``make-bin`` subcommands."""
    p = subparsers.add_parser("data", help="check identity folders; pack/unpack/inspect .rec and .bin",
                              description="Check identity folders; pack, unpack and inspect "
                              "InsightFace .rec and .bin files.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND",
                           title="commands")
    q = sub.add_parser("check", help="unreadable, empty and duplicate files in a folder")
    q.add_argument("folder", help="folder/<identity>/<image>")
    q.add_argument("--no-decode", action="store_true", help="hash only (faster)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=_cmd_check)
    q = sub.add_parser("pack", help="identity folder -> InsightFace .rec/.idx/property")
    q.add_argument("folder", help="folder/<identity>/<image>")
    q.add_argument("out", help="output .rec path, prefix or folder (train.rec inside)")
    q.add_argument("--on-corrupt", choices=("error", "skip"), default="error",
                   help="unreadable images (as 'ekd data check' finds them): stop (default) or "
                        "leave them out, listed in the summary")
    q.set_defaults(func=_cmd_pack)
    q = sub.add_parser("unpack", help=".rec -> identity folder OUT/<label>/<key>.jpg "
                       "(image bytes as stored)")
    q.add_argument("rec", help=".rec path, prefix or folder holding train.rec")
    q.add_argument("out", help="output folder (created; must be empty)")
    q.add_argument("--on-corrupt", choices=("skip", "error"), default="skip",
                   help="unreadable records: leave out with a warning (default) or stop")
    q.set_defaults(func=_cmd_unpack)
    q = sub.add_parser("info", help="summarise a .rec or .bin file")
    q.add_argument("file", help=".rec / .idx / folder with train.rec, or .bin")
    q.set_defaults(func=_cmd_info)
    q = sub.add_parser("make-bin", help="pair list 'path1 path2 label' -> verification .bin")
    q.add_argument("pairs", help="pair list")
    q.add_argument("out", help="output .bin")
    q.add_argument("--root", help="folder the pair list's paths are relative to (default: its folder)")
    q.set_defaults(func=_cmd_make_bin)
