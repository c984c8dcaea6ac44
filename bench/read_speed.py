"""Data speed: RecordIO vs image folder vs a preloaded set, and the data-wait share of training.

Three measurements on the real faces' ``train/`` (``--faces``, first ``--identities``
identities, packed into a ``.rec`` with ``ekd.data.rec_folder.pack_folder``, images byte for byte):

1. ``dataset[i]`` (read, decode, normalised tensor), single process, file and random order.
2. Images/s through the training loader exactly as the trainer builds it
   (:func:`ekd.engine.build.build_train_loader`: EKD's balanced batch sampler, the DataLoader's
   collate, then the trainer's per-sample mirror), for the image folder, the ``.rec`` and the
   preloaded set (``data.preload``), with 0, 1 and 2 workers, at 32, 56 and 112 px. For the
   preloaded set the workers only decode it once (``preload_s``).
3. The share of a CPU MobileFaceNet training step (32 px, ``--steps`` steps) spent waiting for
   data (``data_wait`` of the trainer's ``metrics.jsonl``), with and without preloading.

Usage: ``python -m bench.read_speed [--faces ../shared/data/faces] [--identities 100]``;
writes ``bench/results/read_speed.{md,json}``. Without the faces folder it uses random JPEGs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ekd.config import load_config
from ekd.data import ImageFolderDataset
from ekd.data.rec_folder import pack_folder
from ekd.data.record_dataset import RecordDataset
from ekd.data.resident import ResidentBatches
from ekd.data.sampler import BalancedBatchSampler
from ekd.data.transforms import mirror_batch
from ekd.engine.build import build_train_loader
from ekd.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SIZES, WORKERS = (32, 56, 112), (0, 1, 2)
BATCH = dict(random_size=64, identities_per_batch=16, samples_per_identity=4)  # 128, the default


def make_folder(tmp: Path, faces: Path, identities: int) -> tuple[Path, str]:
    src = faces / "train"
    out = tmp / "folder"
    if src.is_dir():
        for d in sorted(p for p in src.iterdir() if p.is_dir())[:identities]:
            shutil.copytree(d, out / d.name)
        return out, (f"real faces (faces/train, first {identities} identities, grayscale JPEG "
                     "112x112)")
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


def dataset_speed(folder: Path, rec_dir: Path, repeats: int) -> list[dict]:
    folder_ds, rec_ds = ImageFolderDataset(folder), RecordDataset(rec_dir)
    assert np.array_equal(folder_ds.labels, rec_ds.labels)
    n = len(rec_ds)
    orders = {"file order": np.arange(n), "random order": np.random.default_rng(1).permutation(n)}
    paths, keys = [p for p, _ in folder_ds.samples], rec_ds.image_keys
    raw_f = time_items(lambda i: Path(paths[i]).read_bytes(), orders["random order"], repeats)
    raw_r = time_items(lambda i: rec_ds.reader.read(keys[i]), orders["random order"], repeats)
    rows = [{"order": "random order, read only (no decode)", "folder_img_s": round(raw_f),
             "recordio_img_s": round(raw_r), "ratio": round(raw_r / raw_f, 2)}]
    for name, order in orders.items():
        f = time_items(folder_ds.__getitem__, order, repeats)
        r = time_items(rec_ds.__getitem__, order, repeats)
        rows.append({"order": name, "folder_img_s": round(f), "recordio_img_s": round(r),
                     "ratio": round(r / f, 2)})
    return rows


def loader_speed(kind: str, workers: int, size: int, folder: Path, rec_dir: Path, batches: int) -> dict:
    """Images/s of ``batches`` batches through the trainer's loader (+ mirror), after one
    untimed batch (worker start-up); a preloaded set also reports its decode time."""
    cfg = load_config(None, ["data.kind=folder", f"data.root={folder}", f"data.input_size={size}",
                             f"data.num_workers={workers}", f"data.preload={kind == 'preload'}",
                             "train.device=cpu"])
    ds = RecordDataset(rec_dir, input_size=size) if kind == "rec" else ImageFolderDataset(folder, size)
    sampler = BalancedBatchSampler(ds.labels, **BATCH, seed=0, batches_per_epoch=batches + 1)
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, ds, sampler, torch.device("cpu"), progress=False)
    preload_s = time.perf_counter() - t0 if isinstance(loader, ResidentBatches) else None
    seen, it = 0, iter(loader)
    first = time.perf_counter()
    next(it)
    start = time.perf_counter()
    for b, (images, labels, _) in enumerate(it):
        images, _ = mirror_batch(images.to("cpu"), b)
        seen += len(labels)
    elapsed = time.perf_counter() - start
    del it, loader
    return {"kind": kind, "workers": workers, "input_size": size, "img_s": round(seen / elapsed),
            "first_batch_s": round(start - first, 2),
            "preload_s": None if preload_s is None else round(preload_s, 2),
            "preload_img_s": None if preload_s is None else round(len(ds) / preload_s)}


def train_wait(folder: Path, out: Path, preload: bool, steps: int) -> dict:
    """data_wait of a CPU MobileFaceNet epoch of ``steps`` steps at 32 px (trainer defaults:
    512-d embedding, batch 64 random + 16 x 4)."""
    run = out / ("preload" if preload else "folder")
    cfg = load_config(None, ["data.kind=folder", f"data.root={folder}", "data.input_size=32",
                             f"data.preload={preload}", "data.num_workers=0", "train.epochs=1",
                             f"train.max_steps_per_epoch={steps}", "train.device=cpu",
                             "train.progress=false", f"train.output_dir={run}", "train.log_every=1000"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - t0
    trainer.fit()
    end = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    return {"data": "preload" if preload else "folder, 0 workers", "steps": steps,
            "data_wait": round(end["data_wait"], 4), "step_s": round(end["seconds"] / steps, 3),
            "setup_s": round(setup, 2)}


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "read_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Data speed: image folder, RecordIO, preloaded set", "",
             f"Data: {result['source']}; {result['images']} images, {result['identities']} identities, "
             f".rec {result['rec_size_mb']} MB (packed in {result['pack_seconds']} s).", "",
             f"**How measured.** {result['note']}", "",
             "## Training loader: images/s (sampler + collate + mirror)", "",
             "Batches of 128 (64 random + 16 identities x 4) through `build_train_loader`, as the trainer "
             f"reads them, then mirrored; {result['batches']} batches after one untimed batch. "
             "Preloaded: workers only decode the set once (decode rate in brackets); its batch rate "
             "does not depend on them, so its spread down a column is the machine's noise.", ""]
    rows = result["loader"]
    for size in SIZES:
        lines += [f"**{size} px**", "", "| workers | folder | rec | rec / folder | preload (decode img/s) |",
                  "|---|---|---|---|---|"]
        for w in WORKERS:
            get = {r["kind"]: r for r in rows if r["input_size"] == size and r["workers"] == w}
            f, r, p = get["folder"], get["rec"], get["preload"]
            lines.append(f"| {w} | {f['img_s']} | {r['img_s']} | {r['img_s'] / f['img_s']:.2f} | "
                         f"{p['img_s']} ({p['preload_img_s']}) |")
        lines.append("")
    lines += ["## Data-wait share of a CPU training step", "",
              "MobileFaceNet (512-d), 32 px, batch 128, CPU, 1 torch thread; `data_wait` of the epoch row "
              "of `metrics.jsonl` (time from the end of one step until the next batch is there, over the "
              "step time).", "", "| data | steps | data_wait | s/step |", "|---|---|---|---|"]
    lines += [f"| {r['data']} | {r['steps']} | {100 * r['data_wait']:.1f}% | {r['step_s']} |"
              for r in result["train"]]
    lines += ["", "## `dataset[i]`: read + decode", "",
              "| order | image folder (img/s) | RecordIO (img/s) | RecordIO / folder |", "|---|---|---|---|"]
    lines += [f"| {r['order']} | {r['folder_img_s']} | {r['recordio_img_s']} | {r['ratio']} |"
              for r in result["dataset"]]
    lines += ["", f"Single process, 1 torch thread, best of {result['repeats']} passes (warm page cache); "
              "each item is read + JPEG decode + normalised tensor (first row: bytes only).", "",
              "Run: `python -m bench.read_speed` (a few minutes)."]
    (out / "read_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", default=str(REPO.parent / "shared" / "data" / "faces"),
                    help="real faces folder holding train/ (default ../shared/data/faces)")
    ap.add_argument("--identities", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12, help="timed loader batches per setting")
    ap.add_argument("--steps", type=int, default=20, help="training steps per data-wait run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder, source = make_folder(tmp, Path(args.faces), args.identities)
        t0 = time.perf_counter()
        info = pack_folder(folder, tmp / "rec" / "train.rec")
        pack_s = time.perf_counter() - t0
        dataset_rows = dataset_speed(folder, tmp / "rec", args.repeats)
        loader_rows = []
        for size in SIZES:
            for workers in WORKERS:
                for kind in ("folder", "rec", "preload"):
                    loader_rows.append(loader_speed(kind, workers, size, folder, tmp / "rec", args.batches))
                    print(loader_rows[-1], flush=True)
        train_rows = [train_wait(folder, tmp / "runs", preload, args.steps) for preload in (False, True)]
        rec_mb = (tmp / "rec" / "train.rec").stat().st_size / 2**20
    result = {"source": source, "images": info["images"], "identities": info["identities"],
              "rec_size_mb": round(rec_mb, 1), "pack_seconds": round(pack_s, 2),
              "batches": args.batches, "repeats": args.repeats, "loader": loader_rows,
              "train": train_rows, "dataset": dataset_rows, "torch_threads": 1,
              "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "machine": platform.machine(),
              "load_average_before": round(load_before, 2),
              "note": (f"One short run ({args.batches} batches a cell), page cache warm, load average "
                       f"{load_before:.2f} on {os.cpu_count()} CPUs when it started: cells vary by "
                       "tens of percent between runs; with 2 cores, 1-2 workers compete with the "
                       "main process.")}
    write_results(result, Path(args.out))


if __name__ == "__main__":
    main()
