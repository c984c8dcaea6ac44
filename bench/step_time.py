"""Training step time: plain student vs EKD from an embedding cache vs EKD from a live teacher.

Three :class:`ekd.engine.trainer.Trainer` objects are built from configs, with the same student
(MobileFaceNet, same seed, so the same initial weights), the same data and the same batches
(``sampler.random_size`` random samples + ``sampler.identities_per_batch`` x 4):

- (a) ``plain``: the student trained with the margin cross-entropy only (no teacher);
- (b) ``cached``: + EKD, teacher embeddings read from an embedding cache by sample index and
  mirror flag (``teacher.kind: cache``): the teacher never runs;
- (c) ``live``: + EKD, teacher = a frozen IResNet-50 run on every batch
  (``teacher.kind: checkpoint``).

The IResNet-50 teacher has random weights (speed does not depend on them): it is saved as an ekd
checkpoint in a temporary folder, and the cache of (b) is built from that same model with
``ekd.teachers.cache_builder.build_cache`` (its manifest records the checkpoint's SHA-256, checked
through ``teacher.cache_teacher``). Data: a synthetic identity folder
(``ekd.data.generate_identity_folder``) in the same temporary folder.

What is timed: ``trainer.train_step(images, labels, indices, flipped)`` — student forward, margin
CE, teacher embeddings (cache lookup by index for (b), IResNet-50 forward for (c)), EKD, backward,
SGD step. Batches are taken from ``trainer.loader`` and mirrored with ``trainer.mirror`` *before*
timing (image loading and decoding are not timed), a few of them, reused cyclically. On CUDA the
device is synchronised around each step. Each variant runs 2 warm-up steps, then the variants are
timed in interleaved rounds (a, b, c, a, b, c, ...) so that load changes on a shared machine hit
all three alike; the result is the median over ``--steps`` rounds.

Usage::

    python -m bench.step_time [--input-size 56] [--batch 64] [--identities B/4] [--steps 10]
                              [--device auto] [--threads N] [--amp none] [--out bench/results]

Defaults depend on the device: 56 px and batch 64 on CPU, 112 px and batch 256 on CUDA.
Writes ``<out>/step_time_<device>.md`` and ``.json`` (device = ``cpu`` or ``cuda``).
Target (issue 5): cached distillation <= 1.10 x a plain student step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ekd.config import load_config
from ekd.data import generate_identity_folder
from ekd.engine.trainer import Trainer
from ekd.models import build_backbone
from ekd.models.loading import freeze
from ekd.teachers.cache import file_fingerprint
from ekd.teachers.cache_builder import build_cache
from ekd.utils.checkpoint_io import FORMAT, VERSION, save_atomic
from ekd.utils.device import resolve_device

OUT = Path(__file__).resolve().parent / "results"
EMB = 512  # student and teacher embedding size (the paper's setting)
WARMUP = 2
TARGET = 1.10
VARIANTS = ("plain", "cached", "live")
LABELS = {"plain": "(a) plain student (MobileFaceNet, CE only)",
          "cached": "(b) EKD, cached teacher (embedding cache, teacher never runs)",
          "live": "(c) EKD, live IResNet-50 teacher"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-size", type=int, default=None, help="default 56 on CPU, 112 on CUDA")
    p.add_argument("--batch", type=int, default=None,
                   help="random part of the batch (sampler.random_size); default 64 on CPU, 256 on CUDA")
    p.add_argument("--identities", type=int, default=None,
                   help="sampler.identities_per_batch (x 4 samples each); default batch // 4")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="train.amp (mixed precision; CUDA only)")
    p.add_argument("--out", type=Path, default=OUT, help="results folder (default bench/results)")
    return p.parse_args()


def base_overrides(root: Path, out: Path, size: int, random_size: int, identities: int,
                   device: str, amp: str) -> list[str]:
    return [
        "data.kind=folder", f"data.root={root}", f"data.input_size={size}", "data.num_workers=0",
        "model.backbone=mobilefacenet", f"model.embedding_size={EMB}",
        f"sampler.random_size={random_size}", f"sampler.identities_per_batch={identities}",
        "sampler.samples_per_identity=4", "optim.lr=0.01", "train.epochs=1000",
        "train.progress=false", f"train.device={device}", f"train.amp={amp}",
        "train.max_bad_steps=1000000", f"train.output_dir={out}",
    ]


def save_teacher(path: Path, size: int) -> torch.nn.Module:
    """A random-weight IResNet-50 saved in the ekd checkpoint format; returns the frozen model."""
    torch.manual_seed(1234)
    model = build_backbone("iresnet50", EMB, size)
    save_atomic({"format": FORMAT, "version": VERSION,
                 "model_meta": {"backbone": "iresnet50", "embedding_size": EMB, "input_size": size},
                 "model": model.state_dict()}, path)
    return freeze(model)


def prefetch(trainer: Trainer, count: int) -> list[tuple]:
    """``count`` batches from the trainer's loader, on its device and mirrored as in training."""
    batches = []
    trainer.sampler.set_epoch(0)
    for b, (images, labels, indices) in enumerate(trainer.loader):
        if b == count:
            break
        images = images.to(trainer.device)
        if trainer.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(trainer.device)
        trainer.state.batch_in_epoch = b
        images, flipped = trainer.mirror(images)
        batches.append((images, labels, indices, flipped))
    trainer.state.batch_in_epoch = 0
    return batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer: Trainer, batch: tuple) -> tuple[float, bool]:
    sync(trainer.device)
    start = time.perf_counter()
    terms = trainer.train_step(*batch)
    sync(trainer.device)
    return time.perf_counter() - start, terms is not None


def write_results(res: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step_time_{res['device_type']}"
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(res, indent=1) + "\n")
    med = res["median_s"]
    load0, load1 = res["load_average_start"], res["load_average_end"]
    shared = load0[0] > 0.5 or load1[0] > 0.5
    lines = [
        f"# Training step time: plain student vs EKD (cached teacher) vs EKD (live teacher), {res['device_type']}",
        "",
        f"Device: {res['device']}; torch {res['torch']}; {res['threads']} CPU threads "
        f"({res['cpu_count']} cores, {res['machine']}).",
        f"Load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
        f"at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}"
        + ("; **the machine was shared with other work during the run, so absolute times are noisy** "
           "(the three variants were timed in interleaved rounds so that load changes affect them alike)."
           if shared else "."),
        "",
        f"Batch: {res['random_size']} random + {res['identities_per_batch']} identities x 4 = "
        f"**{res['batch']} images**, {res['input_size']} x {res['input_size']} px, embedding {EMB}; "
        f"student MobileFaceNet, teacher IResNet-50 (random weights), distiller EKD (default params); "
        f"train.amp={res['amp']}.",
        f"Data: synthetic identity folder, {res['dataset']}.",
        f"Timed: `Trainer.train_step` only (batches pre-fetched and mirrored); {WARMUP} warm-up steps "
        f"per variant, then median of {res['steps']} interleaved rounds.",
        "",
        "| variant | median step | min | max | ratio to (a) |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        t = res["times_s"][v]
        ratio = "1.00" if v == "plain" else f"{med[v] / med['plain']:.2f}"
        lines.append(f"| {LABELS[v]} | {med[v] * 1e3:.1f} ms | {min(t) * 1e3:.1f} ms | "
                     f"{max(t) * 1e3:.1f} ms | {ratio} |")
    ok = "met" if res["ratio_cached_over_plain"] <= TARGET else "NOT met"
    lines += [
        "",
        f"- b/a (cached / plain) = **{res['ratio_cached_over_plain']:.3f}** "
        f"(target <= {TARGET:.2f}: {ok})",
        f"- c/a (live / plain) = **{res['ratio_live_over_plain']:.3f}**",
        f"- live teacher / cached teacher = {med['live'] / med['cached']:.2f}x",
    ]
    ta, tb = res["times_s"]["plain"], res["times_s"]["cached"]
    if min(tb) <= max(ta) and min(ta) <= max(tb):
        lines.append("- the step times of (a) and (b) overlap (min..max): their difference is within "
                     "the run-to-run spread; a ratio below 1 is noise, not a speed-up")
    skipped = {v: n for v, n in res["skipped_steps"].items() if n}
    if skipped:
        lines.append(f"- non-finite steps skipped by the NaN guard (still timed): {skipped}")
    lines += ["", f"Command: `{res['command']}`", ""]
    mpath.write_text("\n".join(lines))
    return mpath, jpath


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    size = args.input_size or (112 if gpu else 56)
    random_size = args.batch if args.batch is not None else (256 if gpu else 64)
    identities = args.identities if args.identities is not None else max(1, random_size // 4)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    load_start = os.getloadavg()
    # enough identities for P per batch and enough samples for the random part
    num_ids = max(40, 2 * identities, -(-random_size // 4))
    per_id = 8
    print(f"device {device}, {torch.get_num_threads()} threads, load {load_start[0]:.2f}; "
          f"batch {random_size} + {identities} x 4 at {size} px", flush=True)
    with tempfile.TemporaryDirectory(prefix="ekd_step_time_") as tmp:
        tmp = Path(tmp)
        root = generate_identity_folder(tmp / "train", num_identities=num_ids,
                                        images_per_identity=per_id, image_size=size, seed=3)
        ckpt = tmp / "teacher_r50.pt"
        teacher = save_teacher(ckpt, size)
        base = lambda name: base_overrides(root, tmp / name, size, random_size, identities,  # noqa: E731
                                           args.device, args.amp)
        plain = Trainer(load_config(None, base("plain")))
        t0 = time.perf_counter()
        cache = build_cache(teacher.to(plain.device), plain.dataset, tmp / "cache",
                            teacher_fp=file_fingerprint(ckpt), teacher_name="iresnet50 (random)",
                            device=plain.device, progress=False)
        print(f"teacher cache of {len(plain.dataset)} samples built in {time.perf_counter() - t0:.1f} s",
              flush=True)
        del teacher
        ekd = "distill=[{name: ekd}]"
        trainers = {
            "plain": plain,
            "cached": Trainer(load_config(None, base("cached") + [
                "teacher.kind=cache", f"teacher.path={cache}", f"teacher.cache_teacher={ckpt}", ekd])),
            "live": Trainer(load_config(None, base("live") + [
                "teacher.kind=checkpoint", f"teacher.path={ckpt}", ekd])),
        }
        for name, tr in trainers.items():
            assert tr.dataset.samples == plain.dataset.samples, name
        for name, tr in trainers.items():  # same seed -> same initial student
            sa, sb = plain.student.state_dict(), tr.student.state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        n_batches = min(len(plain.sampler), WARMUP + args.steps, 4)
        batches = {name: prefetch(tr, n_batches) for name, tr in trainers.items()}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        skipped = {v: 0 for v in VARIANTS}
        for name, tr in trainers.items():
            for i in range(WARMUP):
                dt, _ = timed_step(tr, batches[name][i % n_batches])
                print(f"warm-up {name} {i + 1}: {dt:.3f} s", flush=True)
        for i in range(args.steps):
            for name, tr in trainers.items():
                dt, ok = timed_step(tr, batches[name][(WARMUP + i) % n_batches])
                times[name].append(dt)
                skipped[name] += not ok
            print(f"round {i + 1}/{args.steps}: " + ", ".join(f"{v} {times[v][-1]:.3f} s" for v in VARIANTS),
                  flush=True)
        batch = len(batches["plain"][0][1])
    load_end = os.getloadavg()
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    res = {
        "device_type": device.type, "device": dev_name, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average_start": list(load_start), "load_average_end": list(load_end),
        "random_size": random_size, "identities_per_batch": identities, "batch": batch,
        "input_size": size, "embedding_size": EMB, "amp": args.amp, "steps": args.steps,
        "warmup": WARMUP, "dataset": f"{num_ids} identities x {per_id} images",
        "median_s": med, "times_s": times, "skipped_steps": skipped,
        "ratio_cached_over_plain": med["cached"] / med["plain"],
        "ratio_live_over_plain": med["live"] / med["plain"], "target_cached_over_plain": TARGET,
        "command": "python -m bench.step_time " + " ".join(sys.argv[1:]),
    }
    mpath, jpath = write_results(res, args.out)
    print(mpath.read_text())
    print(f"wrote {mpath} and {jpath}")


if __name__ == "__main__":
    main()
