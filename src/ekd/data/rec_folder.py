"""Identity folder <-> InsightFace ``.rec``: ``ekd data pack`` and ``ekd data unpack``.

:func:`pack_folder` writes the InsightFace layout (header record 0, images ``1..N`` with scalar
labels, one ``[start, end)`` record per identity, ``property``); :func:`unpack_rec` writes a
``.rec`` back as ``OUT/<label>/<key>.<ext>``. Both store image bytes as they are (no re-encoding)
when they are JPEG or PNG, so pack -> unpack -> pack reproduces the ``.rec`` byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ekd.data.check import check_folder
from ekd.data.folder import ImageFolderDataset
from ekd.data.record_dataset import RecordDataset, property_path
from ekd.data.recordio import IRHeader, RecordIOWriter, pack, rec_paths, unpack
from ekd.data.robust import check_on_corrupt
from ekd.data.transforms import decode_image, decode_pil
from ekd.errors import DataError

__all__ = ["pack_folder", "property_path", "unpack_rec"]


def pack_folder(folder: str | os.PathLike[str], out: str | os.PathLike[str],
                on_corrupt: str = "error", progress: bool = False) -> dict:
    """Write ``out.rec/.idx`` and :func:`property_path` from ``folder/<identity>/<image>``
    (InsightFace layout: header record 0, images ``1..N`` with scalar labels, then one
    ``[start, end)`` record per identity). Image files are stored byte for byte (no
    re-encoding). The folder is first checked as ``ekd data check`` does: an unreadable image
    is an error naming it (``on_corrupt="error"``) or left out (``"skip"``, listed in the
    summary); the other findings are listed in the summary as ``warnings``. ``progress``: a bar
    over the images.
    """
    check_on_corrupt(on_corrupt)
    report = check_folder(folder, progress=progress)
    unreadable = {str(Path(folder) / rel) for rel, _ in report.unreadable}
    if unreadable and on_corrupt == "error":
        rel, reason = report.unreadable[0]
        raise DataError(f"{folder}: {len(unreadable)} unreadable image(s), e.g. {reason} "
                        f"({Path(folder) / rel}); run 'ekd data check {folder}', fix or remove "
                        "them, or pack without them with --on-corrupt skip")
    ds = ImageFolderDataset(folder)
    samples = [(path, label) for path, label in ds.samples if str(path) not in unreadable]
    rec, _ = rec_paths(out)
    n, c = len(samples), ds.num_classes
    if n + c + 1 > 1 << 24:
        raise DataError(f"{folder}: {n} images + {c} identities exceed the float32 labels' 2**24")
    ranges: list[list[int]] = [[0, 0] for _ in range(c)]
    with RecordIOWriter(rec) as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + c], np.float32)), b""))
        samples = tqdm(samples, desc=f"packing {rec.name}", unit="img", disable=not progress)
        for key, (path, label) in enumerate(samples, start=1):
            data = Path(path).read_bytes()
            if key == 1:
                size = decode_image(data, where=path).shape[:2]
            if ranges[label][0] == 0:
                ranges[label][0] = key
            ranges[label][1] = key + 1
            w.write(key, pack(IRHeader(0, float(label), key, 0), data))
        for i, (a, b) in enumerate(ranges):
            w.write(n + 1 + i, pack(IRHeader(2, np.array([a, b], np.float32), n + 1 + i), b""))
    prop = property_path(rec)
    prop.write_text(f"{c},{size[0]},{size[1]}\n")
    warnings = [line.strip() for line in report.format().splitlines()[1:]
                if "unreadable" not in line and line.startswith("  ") and not line.startswith("    ")]
    return {"rec": str(rec), "property": str(prop), "images": n, "identities": c,
            "image_size": [int(size[0]), int(size[1])],
            "left_out": sorted(str(Path(p).relative_to(folder)) for p in unreadable),
            "warnings": warnings}


def _extension(data: bytes) -> str | None:
    """``.jpg`` / ``.png`` from the stored bytes' signature, None for other encodings."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return None


def unpack_rec(rec: str | os.PathLike[str], out: str | os.PathLike[str],
               on_corrupt: str = "skip", progress: bool = False) -> dict:
    """Write every image record of ``rec`` as ``out/<label>/<key>.jpg|.png``.

    Folder and file names are zero-padded numbers, so that :class:`ImageFolderDataset` (sorted
    names) sees the labels and the image order of the ``.rec``. JPEG/PNG bytes are written as
    stored; other encodings are decoded and written as PNG (lossless). Labels keep their values:
    a ``.rec`` with unused labels repacks with contiguous ones. Unreadable records are left out
    with a warning (``on_corrupt="skip"``) or raise (``"error"``); ``out`` must not hold images.
    ``progress``: a bar over the records.
    """
    ds = RecordDataset(rec, on_corrupt=on_corrupt)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: the output folder exists and is not empty")
    lw = len(str(int(ds.labels.max())))
    kw = len(str(int(ds.image_keys.max())))
    written, reencoded, skipped = 0, 0, len(ds.dropped)
    records = tqdm(zip(ds.image_keys.tolist(), ds.labels.tolist()), total=len(ds.image_keys),
                   desc=f"unpacking {ds.reader.path.name}", unit="img", disable=not progress)
    for key, label in records:
        label = int(ds.label_map[label]) if ds.label_map is not None else label
        where = f"{ds.reader.path} record {key} (byte offset {ds.reader.offset(key)})"
        try:
            _, payload = unpack(ds.reader.read(key), where)
            ext, img = _extension(payload), None
            if ext is None:
                img, ext = decode_pil(payload, where=where), ".png"
        except DataError:
            if on_corrupt == "error":
                raise
            skipped += 1
            continue
        folder = out / f"{label:0{lw}d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{key:0{kw}d}{ext}"
        if img is None:
            target.write_bytes(payload)
        else:
            img.save(target)
            reencoded += 1
        written += 1
    return {"folder": str(out), "images": written, "identities": int(np.unique(ds.labels).size),
            "reencoded_as_png": reencoded, "skipped": skipped}
