"""Read + decode speed: InsightFace RecordIO (``.rec``/``.idx``) vs the image-folder dataset.

Packs an identity folder with ``ekd.data.rec_folder.pack_folder`` (images stored byte for byte)
and times ``dataset[i]`` (read, decode to RGB, convert to a normalised tensor) over the same
images in file order and in a random order, single process. The folder is the real faces'
``train/`` beside the repository (``../shared/data/faces/train``, first ``--identities``
identities) when present, else a synthetic folder of random 112x112 JPEGs.

Usage: ``python bench/read_speed.py [--identities 150] [--repeats 3]``; writes
``bench/results/read_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ekd.data import ImageFolderDataset
from ekd.data.rec_folder import pack_folder
from ekd.data.record_dataset import RecordDataset

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "data" / "faces"


def make_folder(tmp: Path, identities: int) -> tuple[Path, str]:
    src = FACES / "train"
    out = tmp / "folder"
    if src.is_dir():
        for d in sorted(p for p in src.iterdir() if p.is_dir())[:identities]:
            shutil.copytree(d, out / d.name)
        return out, (f"real faces (../shared/data/faces/train, first {identities} identities, "
                     "grayscale JPEG 112x112)")
    rng = np.random.default_rng(0)
    for i in range(identities):
        (out / f"id{i:04d}").mkdir(parents=True)
        for j in range(16):
            arr = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
            img = Image.fromarray(arr).resize((112, 112), Image.BICUBIC)
            img.save(out / f"id{i:04d}" / f"{j:02d}.jpg", quality=90)
    return out, f"synthetic ({identities} identities x 16 random RGB JPEG 112x112)"


def time_items(get, order: np.ndarray, repeats: int) -> float:  # noqa: ANN001
    """Best items/s over ``repeats`` passes of ``get(i)`` for ``i`` in ``order``."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in order:
            get(int(i))
        best = max(best, len(order) / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder, source = make_folder(tmp, args.identities)
        t0 = time.perf_counter()
        info = pack_folder(folder, tmp / "rec" / "train.rec")
        pack_s = time.perf_counter() - t0
        folder_ds = ImageFolderDataset(folder)
        rec_ds = RecordDataset(tmp / "rec")
        assert np.array_equal(folder_ds.labels, rec_ds.labels)
        n = len(rec_ds)
        orders = {"file order": np.arange(n), "random order": np.random.default_rng(1).permutation(n)}
        rows = []
        paths = [p for p, _ in folder_ds.samples]
        keys = rec_ds.image_keys
        raw_f = time_items(lambda i: Path(paths[i]).read_bytes(), orders["random order"],
                           args.repeats)
        raw_r = time_items(lambda i: rec_ds.reader.read(keys[i]), orders["random order"],
                           args.repeats)
        rows.append({"order": "random order, read only (no decode)", "folder_img_s": round(raw_f),
                     "recordio_img_s": round(raw_r), "ratio": round(raw_r / raw_f, 2)})
        for name, order in orders.items():
            f = time_items(folder_ds.__getitem__, order, args.repeats)
            r = time_items(rec_ds.__getitem__, order, args.repeats)
            rows.append({"order": name, "folder_img_s": round(f), "recordio_img_s": round(r),
                         "ratio": round(r / f, 2)})
        rec_mb = (tmp / "rec" / "train.rec").stat().st_size / 2**20
    result = {"source": source, "images": n, "identities": info["identities"],
              "rec_size_mb": round(rec_mb, 1), "pack_seconds": round(pack_s, 2), "rows": rows,
              "repeats": args.repeats, "torch_threads": 1, "python": platform.python_version(),
              "machine": platform.machine(), "note": "single process, page cache warm after "
              "the first pass (best of repeats); item = read + decode + tensor"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "read_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# RecordIO vs image folder: read + decode speed", "",
             f"Data: {source}; {n} images, {info['identities']} identities, .rec "
             f"{rec_mb:.1f} MB (packed in {pack_s:.2f} s).", "",
             "| order | image folder (img/s) | RecordIO (img/s) | RecordIO / folder |",
             "|---|---|---|---|"]
    lines += [f"| {r['order']} | {r['folder_img_s']} | {r['recordio_img_s']} | {r['ratio']} |"
              for r in rows]
    lines += ["", f"Single process, 1 torch thread, best of {args.repeats} passes (warm page "
              "cache); each item is read + JPEG decode + normalised tensor, as the trainer "
              "consumes it (first row: bytes only). Run: `python bench/read_speed.py`."]
    (out / "read_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
