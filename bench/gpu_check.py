"""GPU check: every CUDA path of ekd once, on small shapes, then one GPU-profile cell timed.

Rows (each independent: a failure is recorded with its error and the next row runs):

- fp32 reference on the CPU (the first training step's loss terms every other row is compared to);
- fp32 eager on CUDA, bf16 autocast, fp16 autocast + grad scaler, ``channels_last``,
  ``torch.compile`` (``train.amp``/``channels_last``/``compile`` of ekd's trainer);
- ``data.preload`` (the training set decoded once into a tensor on the device);
- Partial FC (``head.sample_rate: 0.5``) with a classifier-based distiller on its class shard
  (proxylesskd, teacher centres = mean cached embedding): the sharded-centres path;
- NCCL under ``torchrun`` (``ekd train`` in a process group of min(2, GPUs) processes; on a
  one-GPU machine a group of one);
- evaluation on the device (:func:`ekd.eval.flip_embed.extract_embeddings`, as the KD table's cells);
- ONNX export from a CUDA model (:func:`ekd.deploy.onnx_export.export_onnx`), checked with
  onnxruntime against the model.

Each training row builds a :class:`ekd.engine.trainer.Trainer` from a config like the KD table's
T2 cells (MobileFaceNet, ArcFace, EKD (ours) with an embedding-cache teacher) on a stand-in
identity folder (random JPEGs, same layout as ``train/``), computes the loss terms of the first
batch (``max |diff|`` against the CPU fp32 reference; the first step is the same batch and the
same weights everywhere), then trains a few steps: step time, images/s, data-wait share, peak
CUDA memory.

Then the GPU profile (``bench/kd_profiles.py``) is timed with its own cell configs
(``bench/kd_table.py``, :class:`Table`): one epoch of T1 (IResNet-50), of a no-KD student, of a
student with the live T1 teacher and of a student with the cached T2 teacher, on a stand-in set
of ``train/``'s size (748 identities, 12,316 images) or on ``--faces``. From these and the
measured evaluation cost, the time of the whole ``--profile gpu`` table (:func:`plan_key`) is
projected, and the ``GPU_EPOCHS`` that fits T1 and its key rows into 9 minutes is printed
(``GPU_EPOCHS`` itself is not changed here).

Writes ``gpu_check.md`` and ``gpu_check.json`` (device, driver, torch, CUDA versions) to
``--out`` (default ``bench/results``). ``--cpu-dry-run`` runs the same script on the CPU with tiny
shapes (CUDA-only rows "skipped: no CUDA", the GPU profile reduced as ``kd_table.py --smoke``)
and writes to ``outputs/gpu_check_dry_run`` unless ``--out`` says otherwise.

Usage::

    python -m bench.gpu_check                    # on a CUDA machine (docs/gpu.md)
    python -m bench.gpu_check --cpu-dry-run --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np


REPO = Path(__file__).resolve().parents[1]
TABLE_TARGET_S = 540.0  # T1 + the T1 key rows on one H200-class GPU (issue: 9 minutes)
SKIPPED_NO_CUDA = "skipped: no CUDA"
TRAIN_SET = (748, 12_316)  # identities, images of the shared train/ (faces README)
EVAL_SET = (10_238, 6_420, 1_680)  # protocol images, LFW all-pairs images and identities
STEP_KEYS = {"epoch", "step", "lr", "images_per_s", "data_wait", "epoch_end", "seconds", "skipped_steps"}


@dataclass(frozen=True)
class Shapes:
    """Sizes of the check rows."""

    input_size: int
    random_size: int
    identities_per_batch: int
    samples_per_identity: int
    steps: int
    identities: int
    images_per_identity: int
    eval_images: int
    onnx_batch: int


GPU_SHAPES = Shapes(112, 64, 16, 4, 8, 48, 8, 512, 16)
DRY_SHAPES = Shapes(32, 8, 2, 2, 1, 6, 4, 16, 2)


@dataclass
class Row:
    """One checked path: status ``pass``, ``fail`` or ``skipped: ...``, its figures and error."""

    name: str
    status: str = "pass"
    figures: dict = field(default_factory=dict)
    error: str | None = None
    note: str = ""


@dataclass
class Context:
    """What the rows share: device, shapes, work folder, stand-in data, the CPU reference."""

    device: str
    shapes: Shapes
    work: Path
    faces: Path | None = None  # stand-in faces of the check rows (train/ + T2 cache)
    t2_cache: Path | None = None
    reference: dict = field(default_factory=dict)  # first-step loss terms, CPU fp32
    reference_model: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


# -- stand-in data --------------------------------------------------------------------------
def make_standin_faces(root: Path, identities: int, images: int, size: int = 112,
                       embedding_size: int = 128, seed: int = 0) -> Path:
    """``root/train/<identity>/<n>.jpg`` (grayscale JPEGs, ``images`` in all, identity-dependent
    patterns) and ``root/teacher_dlib_r29/train.npz`` (random unit embeddings, as the shared
    teacher file): the layout the KD table reads, for timing without the real faces."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    per = [images // identities + (i < images % identities) for i in range(identities)]
    paths = []
    for ident, count in enumerate(per):
        base = rng.integers(40, 215, (8, 8)).astype(np.float32)
        pattern = np.kron(base, np.ones((size // 8 + 1, size // 8 + 1)))[:size, :size]
        folder = root / "train" / f"id-{ident:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(count):
            pixels = np.clip(pattern + rng.normal(0, 12, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(folder / f"{n:04d}.jpg", quality=90)
            paths.append(f"id-{ident:04d}/{n:04d}.jpg")
    emb = rng.standard_normal((len(paths), embedding_size)).astype(np.float32)
    (root / "teacher_dlib_r29").mkdir(parents=True, exist_ok=True)
    np.savez(root / "teacher_dlib_r29" / "train.npz", paths=np.array(paths), emb=emb,
             emb_flip=emb + 0.1 * rng.standard_normal(emb.shape).astype(np.float32))
    return root


def t2_cache_for(faces: Path, cache: Path) -> Path:
    """The T2 embedding cache of ``faces/train`` at ``cache/teacher_t2`` (imported from
    ``faces/teacher_dlib_r29/train.npz`` as ``kd_table.py`` does, unless already there)."""
    from ekd.data import ImageFolderDataset
    from ekd.teachers.cache_builder import import_npz

    target = cache / "teacher_t2"
    if not (target / "manifest.json").is_file():
        import_npz(faces / "teacher_dlib_r29" / "train.npz", ImageFolderDataset(faces / "train"), target)
    return target


# -- training with ekd's trainer --------------------------------------------------------------
def check_tree(ctx: Context, **train: object) -> dict:
    """A T2-like cell config on the stand-in faces at the check shapes (fp32, NCHW, eager)."""
    from bench.kd_profiles import EKD_OURS, GPU

    s = ctx.shapes
    return {
        "data": {"kind": "folder", "root": str(ctx.faces / "train"), "input_size": s.input_size},
        "sampler": {"random_size": s.random_size, "identities_per_batch": s.identities_per_batch,
                    "samples_per_identity": s.samples_per_identity},
        "model": {"backbone": "mobilefacenet", "embedding_size": 128},
        "head": dict(GPU.head),
        "teacher": {"kind": "cache", "path": str(ctx.t2_cache), "centers": "mean_embedding"},
        "distill": [copy.deepcopy(EKD_OURS)],
        "optim": dict(GPU.optim),
        # two epochs on a GPU: the second one's step time is free of warm-up (cuDNN, compilation)
        "train": {"epochs": 2 if ctx.cuda else 1, "device": ctx.device, "seed": 0, "ce_on": "all", "progress": False,
                  "log_every": 1, "amp": "none", "max_steps_per_epoch": s.steps, "channels_last": False,
                  "compile": False, "tensorboard": False, "diagnostics": False, **train},
    }


def first_step_terms(trainer) -> dict[str, float]:  # noqa: ANN001 - ekd.engine.trainer.Trainer
    """The loss terms of the batch the trainer's first step sees, with its initial weights."""
    import torch

    images, labels, indices = next(iter(trainer.loader))
    images = images.to(trainer.device)
    if trainer.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    images, flipped = trainer.mirror(images)  # the flips of step 1 (seeded by epoch and batch)
    terms = trainer.compute_terms(images, labels.to(trainer.device), indices, flipped)
    out = {k: float(v.detach()) for k, v in terms.items()}
    out["loss"] = sum(out.values())
    return out


def read_metrics(run_dir: Path) -> tuple[list[dict], dict]:
    """(step rows of the last epoch, its epoch-end row) of a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    end = [r for r in rows if "epoch_end" in r][-1]
    return [r for r in rows if "epoch_end" not in r and r["epoch"] == end["epoch"]], end


def max_abs_diff(a: dict[str, float], b: dict[str, float]) -> float | None:
    keys = sorted(set(a) & set(b))
    return max(abs(a[k] - b[k]) for k in keys) if keys else None


def relative(diff: float | None, reference: dict[str, float]) -> float | None:
    """``diff`` over max(1, |reference loss|)."""
    return None if diff is None else diff / max(1.0, abs(reference.get("loss", 0.0)))


def train_figures(ctx: Context, name: str, tree: dict, reference: dict | None = None,
                  inspect: Callable | None = None) -> dict:
    """Build ekd's Trainer from ``tree``, take the first batch's loss terms, train one epoch of
    the configured steps; step time, images/s, data wait, peak CUDA memory, max |diff| of the
    first-step terms against ``reference`` (the CPU fp32 terms by default)."""
    import torch

    from ekd.config import Config, from_dict, validate
    from ekd.engine.trainer import Trainer

    tree = copy.deepcopy(tree)
    run_dir = ctx.work / "runs" / "".join(c if c.isalnum() else "_" for c in name)
    tree["train"]["output_dir"] = str(run_dir)
    cfg = from_dict(Config, tree)
    validate(cfg)
    cuda = cfg.train.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with Trainer(cfg) as trainer:
        terms = first_step_terms(trainer)
        extra = inspect(trainer) if inspect else {}
        result = trainer.fit()
    wall = time.perf_counter() - start
    steps, end = read_metrics(run_dir)
    n = max(len(steps), 1)  # optimisation steps of the last epoch (steps skipped by fp16 not counted)
    figures = {"step_ms": 1000 * end["seconds"] / n, "images_per_s": end["images_per_s"],
               "data_wait": end["data_wait"], "skipped_steps": end.get("skipped_steps", 0),
               "steps": len(steps), "wall_s": wall, "epoch_s": end["seconds"], "first_step_terms": terms,
               "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, **extra}
    ref = ctx.reference if reference is None else reference
    if ref and (cuda or reference is not None):
        figures["max_abs_diff"] = max_abs_diff(terms, ref)
        figures["rel_diff"] = relative(figures["max_abs_diff"], ref)
    figures["model_path"] = str(result.model_path)
    return figures


# -- the rows ---------------------------------------------------------------------------------
def row_reference(ctx: Context) -> dict:
    tree = check_tree(ctx, device="cpu", epochs=1, max_steps_per_epoch=min(2, ctx.shapes.steps))
    figures = train_figures(ctx, "cpu fp32 reference", tree, reference={})
    ctx.reference = figures["first_step_terms"]
    ctx.reference_model = Path(figures["model_path"])
    return figures


def row_cuda_fp32(ctx: Context) -> dict:
    return train_figures(ctx, "cuda fp32", check_tree(ctx))


def row_bf16(ctx: Context) -> dict:
    return train_figures(ctx, "bf16 autocast", check_tree(ctx, amp="bf16"))


def row_fp16(ctx: Context) -> dict:
    return train_figures(ctx, "fp16 autocast", check_tree(ctx, amp="fp16"),
                         inspect=lambda t: {"grad_scaler_enabled": t.scaler.is_enabled()})


def row_channels_last(ctx: Context) -> dict:
    return train_figures(ctx, "channels_last", check_tree(ctx, channels_last=True))


def row_compile(ctx: Context) -> dict:
    return train_figures(ctx, "torch.compile", check_tree(ctx, compile=True, amp="bf16", channels_last=True))


def row_preload(ctx: Context) -> dict:
    tree = check_tree(ctx)
    tree["data"]["preload"] = True
    return train_figures(ctx, "preload", tree, inspect=lambda t: {"loader": type(t.loader).__name__})


def partial_fc_tree(ctx: Context, device: str) -> dict:
    from bench.kd_profiles import method_distill

    tree = check_tree(ctx, device=device)
    tree["head"]["sample_rate"] = 0.5
    tree["distill"] = method_distill("proxylesskd", "T2")
    return tree


def row_partial_fc(ctx: Context) -> dict:
    """Partial FC at sample rate 0.5 with proxylesskd on the class shard. No CPU reference: the
    negatives are drawn with the device's RNG. Fails unless the head is sharded and the teacher
    centres are the shard's rows."""
    def sharding(trainer) -> dict:  # noqa: ANN001
        shard = trainer.class_shard
        centres = trainer.teacher_centers
        if shard is None or not trainer.partial_fc:
            raise RuntimeError("the trainer did not use Partial FC with a class shard")
        if centres is None or centres.shape[0] != shard.size or centres.device.type != trainer.device.type:
            raise RuntimeError(f"teacher centres {None if centres is None else tuple(centres.shape)} are not "
                               f"the shard's {shard.size} rows on {trainer.device}")
        return {"partial_fc": True, "class_shard": [shard.start, shard.end, shard.num_sample],
                "teacher_centres_rows": int(centres.shape[0])}

    return train_figures(ctx, "partial fc", partial_fc_tree(ctx, ctx.device), reference={}, inspect=sharding)


NCCL_ALL_REDUCE = """
import os, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
x = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
dist.all_reduce(x)
assert x[0].item() == sum(range(1, dist.get_world_size() + 1)), x
dist.destroy_process_group()
"""


def torchrun(ctx: Context, world: int, args: list[str], log_name: str) -> float:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node=world ARGS``; seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    (ctx.work / f"{log_name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun ({log_name}) exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    return time.perf_counter() - start


def row_nccl(ctx: Context) -> dict:
    """``ekd train`` under torchrun on min(2, GPUs) processes (the trainer joins an NCCL group
    when there are several), and an NCCL all_reduce in a group of the same size."""
    import torch
    import yaml

    world = min(2, torch.cuda.device_count())
    run_dir = ctx.work / "runs" / "nccl"
    tree = check_tree(ctx)
    tree["train"]["output_dir"] = str(run_dir)
    config = ctx.work / "nccl.yaml"
    config.write_text(yaml.safe_dump(tree))
    wall = torchrun(ctx, world, ["-m", "ekd", "train", str(config)], "nccl_train")
    script = ctx.work / "nccl_all_reduce.py"
    script.write_text(NCCL_ALL_REDUCE)
    torchrun(ctx, world, [str(script)], "nccl_all_reduce")
    steps, end = read_metrics(run_dir)
    figures = {"world_size": world, "wall_s": wall, "steps": len(steps),
               "step_ms": 1000 * end["seconds"] / max(len(steps), 1), "images_per_s": end["images_per_s"],
               "data_wait": end["data_wait"], "nccl_all_reduce": "pass"}
    if world == 1:
        figures["note"] = ("one GPU: world size 1, where the trainer joins no process group "
                           "(ekd.utils.distributed); NCCL checked by a 1-process all_reduce only")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        first = next((r for r in rows if r.get("step") == 1 and "epoch_end" not in r), None)
        if first is not None:  # rank 0 of one sees the single-process batch and flips
            figures["max_abs_diff"] = max_abs_diff({k: v for k, v in first.items() if k in ctx.reference},
                                                   ctx.reference)
            figures["rel_diff"] = relative(figures["max_abs_diff"], ctx.reference)
    else:
        figures["note"] = f"NCCL group of {world} in the trainer (DDP, Partial FC, gathers)"
    return figures


def eval_images(ctx: Context, n: int) -> "torch.Tensor":  # noqa: F821
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, ctx.shapes.input_size, ctx.shapes.input_size, generator=gen) * 2 - 1


def row_evaluation(ctx: Context) -> dict:
    """Embeddings (with the mirror image) of the reference model on the device vs on the CPU."""
    import torch

    from ekd.eval.flip_embed import extract_embeddings
    from ekd.models.loading import load_model

    model = load_model(ctx.reference_model).model.eval()
    images = eval_images(ctx, ctx.shapes.eval_images)
    batches = lambda: (images[i:i + 256] for i in range(0, len(images), 256))  # noqa: E731
    cpu = extract_embeddings(model, batches(), device="cpu")
    model.to(ctx.device)
    extract_embeddings(model, batches(), device=ctx.device)  # warm-up (cuDNN autotuning)
    if ctx.cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    got = extract_embeddings(model, batches(), device=ctx.device)
    seconds = time.perf_counter() - start
    figures = {"images": len(images), "images_per_s": len(images) / seconds}
    if ctx.cuda:
        figures["max_abs_diff"] = figures["rel_diff"] = float(np.abs(got - cpu).max())
    return figures


def row_onnx(ctx: Context) -> dict:
    """Export the reference model from the device; onnxruntime (CPU) vs the model on the device."""
    from ekd.deploy.onnx_export import export_onnx, onnx_parity
    from ekd.models.loading import load_model

    model = load_model(ctx.reference_model).model.eval().to(ctx.device)
    out = ctx.work / "model.onnx"
    start = time.perf_counter()
    export_onnx(model, out, backbone="mobilefacenet", input_size=ctx.shapes.input_size)
    seconds = time.perf_counter() - start
    diff = onnx_parity(model, out, eval_images(ctx, ctx.shapes.onnx_batch))
    return {"export_s": seconds, "max_abs_diff": diff, "rel_diff": diff, "model_device": str(next(model.parameters()).device),
            "onnx_mib": out.stat().st_size / 2**20}


class RowSpec(NamedTuple):
    """A checked path: its row function, whether it needs CUDA, what its diff compares, and the
    largest relative diff that passes (training rows: max |diff| of the first-step loss terms over
    max(1, |loss|); embedding rows: max |diff| of unit embeddings)."""

    name: str
    run: Callable[[Context], dict]
    cuda_only: bool
    compared: str
    tolerance: float | None = None
    needs: tuple[str, ...] = ()  # Python packages of an optional extra the row needs


def missing_packages(spec: RowSpec) -> list[str]:
    """The packages ``spec`` needs that this environment lacks."""
    import importlib.util

    return [m for m in spec.needs if importlib.util.find_spec(m) is None]


FP32 = 2e-2  # TF32 convolutions (cuDNN's default) and another summation order
LOW = 1e-1  # bf16 / fp16 autocast
ROWS: list[RowSpec] = [
    RowSpec("fp32 reference (CPU)", row_reference, False, "the reference"),
    RowSpec("fp32 eager (CUDA)", row_cuda_fp32, True, "first-step loss terms vs CPU fp32", FP32),
    RowSpec("bf16 autocast", row_bf16, True, "first-step loss terms vs CPU fp32", LOW),
    RowSpec("fp16 autocast + grad scaler", row_fp16, True, "first-step loss terms vs CPU fp32", LOW),
    RowSpec("channels_last", row_channels_last, False, "first-step loss terms vs CPU fp32 (NCHW)", FP32),
    RowSpec("torch.compile (bf16, channels_last)", row_compile, True, "first-step loss terms vs CPU fp32", LOW),
    RowSpec("preloaded training set on the device", row_preload, False,
            "first-step loss terms vs CPU fp32 (DataLoader)", FP32),
    RowSpec("Partial FC + sharded centres (proxylesskd)", row_partial_fc, False,
            "none: negatives are drawn with the device's RNG; checks the shard and finite terms"),
    RowSpec("NCCL under torchrun", row_nccl, True, "rank 0's logged first step vs CPU fp32 (world size 1 only)", FP32),
    RowSpec("evaluation on the device", row_evaluation, False, "unit embeddings vs CPU", FP32),
    RowSpec("ONNX export from a CUDA model", row_onnx, False, "onnxruntime vs the model (unit embeddings)", FP32,
            ("onnx", "onnxruntime")),
]


def judge(figures: dict, tolerance: float | None) -> str | None:
    """Why a row that ran fails on its figures (non-finite loss terms, a diff above
    ``tolerance``), or None."""
    terms = figures.get("first_step_terms") or {}
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        return f"non-finite first-step loss terms: {bad}"
    rel = figures.get("rel_diff")
    if tolerance is not None and rel is not None and not rel <= tolerance:
        return f"relative diff {rel:.3g} above the tolerance {tolerance:g} (max |diff| {figures.get('max_abs_diff')})"
    return None


def run_rows(ctx: Context, log: Callable[[str], None],
             on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Every row in order; a failing row records its error and the next one runs. ``on_row``
    gets the rows so far after each one (the report is rewritten, so a run stopped by a time
    limit leaves what it checked)."""
    rows = []
    for spec in ROWS:
        row = Row(spec.name, note=spec.compared)
        if spec.cuda_only and not ctx.cuda:
            row.status = SKIPPED_NO_CUDA
        elif missing_packages(spec):
            row.status = f"skipped: {', '.join(missing_packages(spec))} not installed (pip install 'ekd[onnx]')"
        elif spec.name != ROWS[0].name and ctx.reference_model is None:
            row.status, row.error = "fail", "the CPU fp32 reference row failed; nothing to compare with"
        else:
            log(f"row: {spec.name}")
            try:
                row.figures = spec.run(ctx)
                row.error = judge(row.figures, spec.tolerance)
                row.status = "pass" if row.error is None else "fail"
            except Exception as exc:  # noqa: BLE001 - recorded in the row; the other paths still run
                row.status, row.error = "fail", f"{type(exc).__name__}: {exc}"
                log(traceback.format_exc())
        log(f"  {row.status}{'' if row.error is None else ' - ' + row.error}")
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


# -- the GPU profile: one cell timed, the table projected ------------------------------------------
def timing_profile(cuda: bool):  # noqa: ANN201 - kd_profiles.Profile
    """The GPU profile; for the dry run its smoke version (``kd_table.py --smoke``) at one step
    of 8 images."""
    from bench.kd_profiles import GPU
    from bench.kd_table import smoke

    if cuda:
        return GPU
    return dataclasses.replace(smoke(GPU), steps_per_epoch=1, random_size=4, identities_per_batch=2,
                               samples_per_identity=2)


def import_seconds() -> float:
    """Seconds a fresh Python takes to import ekd's trainer (each table cell is a subprocess)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ekd.engine.trainer"], check=True, env=env, cwd=REPO)
    return time.perf_counter() - start


def eval_seconds(ctx: Context, model_path: Path, input_size: int, counts: tuple[int, int, int]) -> dict:
    """A cell's evaluation cost: embedding the protocol images on the device (measured with the
    timed student), LFW all-pairs scoring (measured on random embeddings of the protocol's size)
    and the bootstrap (median of the committed ``cpu2`` cells, CPU-bound and size-independent)."""
    import torch

    from ekd.eval.flip_embed import extract_embeddings
    from ekd.eval.metrics import tpr_at_fpr
    from ekd.eval.protocols import all_pairs_scores
    from ekd.models.loading import load_model

    n_images, n_all, n_ids = counts
    model = load_model(model_path).model.eval().to(ctx.device)
    gen = torch.Generator().manual_seed(2)
    images = (torch.rand(n_images, 3, input_size, input_size, generator=gen) * 255).to(torch.uint8)
    batches = lambda: (images[i:i + 256].float() / 127.5 - 1 for i in range(0, n_images, 256))  # noqa: E731
    extract_embeddings(model, (images[:256].float() / 127.5 - 1,), device=ctx.device)  # warm-up
    start = time.perf_counter()
    emb = extract_embeddings(model, batches(), device=ctx.device)
    embed_s = time.perf_counter() - start
    labels = np.arange(n_all) % n_ids
    start = time.perf_counter()
    scores, same = all_pairs_scores(emb[np.arange(n_all) % len(emb)], labels)
    tpr_at_fpr(scores, same, (1e-3, 1e-4, 1e-5))
    score_s = time.perf_counter() - start
    committed = [json.loads(f.read_text()).get("bootstrap_seconds")
                 for f in (REPO / "bench" / "results" / "kd_table" / "cpu2").glob("*.json")
                 if not f.name.endswith(".boot.json")]
    committed = [s for s in committed if isinstance(s, (int, float))]
    boot_s = statistics.median(committed) if committed else 0.0
    return {"embed_s": embed_s, "scoring_s": score_s, "bootstrap_s": boot_s,
            "bootstrap_source": f"median of {len(committed)} committed cpu2 cells" if committed else "none committed",
            "total_s": embed_s + score_s + boot_s}


T1_CELL = "T1 teacher (IResNet-50)"
NO_KD_CELL = "student, no KD"
T1_STUDENT_CELL = "student + live T1 teacher (EKD ours)"
T2_STUDENT_CELL = "student + cached T2 teacher (EKD ours)"


def time_cells(ctx: Context, faces: Path, faces_label: str, cache: Path | None,
               log: Callable[[str], None], on_cell: Callable[[dict], None] | None = None) -> dict:
    """One epoch of each kind of GPU-profile cell, with the configs of ``kd_table.Table``; the
    runs go to the scratch folder (never into a table cache). ``on_cell`` gets the timing so far
    after each cell."""
    from bench.kd_profiles import Cell
    from bench.kd_table import Table

    profile = timing_profile(ctx.cuda)
    table = Table(profile, faces, ctx.work / "table_cache", ctx.work / "table_results")
    t2 = t2_cache_for(faces, cache if cache is not None else ctx.work / "table_cache")
    cells: dict[str, dict] = {}
    timing = {"profile": profile.name, "epochs_in_profile": profile.epochs, "faces": faces_label, "cells": cells}
    trees = {T1_CELL: table.t1_tree(), NO_KD_CELL: table.config_tree(Cell("T1", "no KD", 0)),
             T1_STUDENT_CELL: table.config_tree(Cell("T1", "EKD (ours)", 0)),
             T2_STUDENT_CELL: table.config_tree(Cell("T2", "EKD (ours)", 0))}
    trees[T2_STUDENT_CELL]["teacher"]["path"] = str(t2)
    models: dict[str, Path] = {}
    for label, tree in trees.items():
        tree["train"].update({"epochs": 1, "tensorboard": False})
        if label == T1_STUDENT_CELL:
            if T1_CELL not in models:
                cells[label] = {"status": "fail", "error": "no T1 model (its cell failed)"}
                continue
            tree["teacher"]["path"] = str(models[T1_CELL])
        log(f"cell: {label}")
        try:
            figures = train_figures(ctx, f"cell {label}", tree, reference={})
            models[label] = Path(figures.pop("model_path"))
            figures.pop("first_step_terms")
            figures["setup_s"] = figures["wall_s"] - figures["epoch_s"]
            cells[label] = {"status": "pass", **figures}
        except Exception as exc:  # noqa: BLE001 - recorded; the other cells still run
            cells[label] = {"status": "fail", "error": f"{type(exc).__name__}: {exc}"}
            log(traceback.format_exc())
        log(f"  {cells[label]['status']}")
        if on_cell is not None:
            on_cell(timing)
    timing["import_s"] = import_seconds()
    if T2_STUDENT_CELL in models:
        counts = EVAL_SET if ctx.cuda else (32, 24, 6)
        timing["eval"] = eval_seconds(ctx, models[T2_STUDENT_CELL], profile.input_size, counts)
    return timing


def project(timing: dict, epochs: int) -> dict | None:
    """Seconds of T1 + its key rows and of the whole ``--profile gpu`` table at ``epochs``."""
    from bench.kd_profiles import GPU, plan_key

    cells = timing["cells"]
    if not cells or any(c.get("status") != "pass" for c in cells.values()) or "eval" not in timing:
        return None
    fixed = timing["import_s"] + timing["eval"]["total_s"]

    def seconds(label: str) -> float:
        c = cells[label]
        return fixed + c["setup_s"] + epochs * c["epoch_s"]

    def kind(cell) -> str:  # noqa: ANN001 - kd_profiles.Cell
        if cell.method == "no KD":
            return NO_KD_CELL
        return T1_STUDENT_CELL if cell.teacher == "T1" else T2_STUDENT_CELL

    key = plan_key(GPU, lambda c: None)
    t1 = seconds(T1_CELL)
    t1_rows = sum(seconds(kind(c)) for c in key if c.teacher == "T1")
    t2_rows = sum(seconds(kind(c)) for c in key if c.teacher == "T2")
    return {"epochs": epochs, "t1_s": t1, "t1_key_rows_s": t1_rows, "t2_key_rows_s": t2_rows,
            "t1_and_t1_rows_s": t1 + t1_rows, "table_s": t1 + t1_rows + t2_rows, "cells": len(key) + 1}


def recommend_epochs(timing: dict, target_s: float = TABLE_TARGET_S, part: str = "t1_and_t1_rows_s") -> int | None:
    """The largest epoch count whose ``part`` of the projection (T1 + T1 key rows by default,
    ``table_s`` for the whole table) takes at most ``target_s``."""
    one, two = project(timing, 1), project(timing, 2)
    if one is None:
        return None
    per_epoch = two[part] - one[part]
    fixed = one[part] - per_epoch
    return max(0, math.floor((target_s - fixed) / per_epoch)) if per_epoch > 0 else None


# -- report -------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import torch

    from bench.kd_cells import git

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "git_commit": git("rev-parse", "HEAD"),
           "device": "cpu (dry run)" if device == "cpu" else torch.cuda.get_device_name(0),
           "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0, "driver": None, "nccl": None}
    if device == "cuda":
        version = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as exc:
            env["driver"] = f"unknown (nvidia-smi: {exc})"
    return env


def bundle_parts(bundle: Path) -> dict[str, float]:
    """MiB of each ``bench/gpu_bundle.py`` part present under ``bundle`` (by its part.json)."""
    parts = {}
    for manifest in sorted(bundle.glob("part*/part.json")):
        parts[manifest.parent.name] = json.loads(manifest.read_text())["bytes"] / 2**20
    return parts


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_report(out: Path, result: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    env = result["environment"]
    lines = [f"# GPU check{' (CPU dry run)' if result['dry_run'] else ''}", ""]
    if not result["complete"]:
        lines += ["**Incomplete**: written while running; the run stopped before its end "
                  f"(after {result['seconds']:.0f} s).", ""]
    lines += [
             f"Written by `{result['command']}` (bench/gpu_check.py).", "",
             f"- Device: {env['device']} ({env['gpus']} GPU(s)); driver {env['driver'] or '—'}",
             f"- torch {env['torch']}, CUDA {env['cuda'] or '—'}, cuDNN {env['cudnn'] or '—'}, NCCL {env['nccl'] or '—'}",
             f"- Python {env['python']}, {env['platform']}, {env['cpu_count']} CPUs; git {env['git_commit']}",
             f"- Check shapes: {result['shapes']}",
             "- Bundle parts on this machine (bench/gpu_bundle.py): "
             + (", ".join(f"{k} {v:.1f} MiB" for k, v in result["bundle_parts"].items()) or "none"), "",
             "| path | status | step ms | images/s | peak MiB | max abs diff | compared | error or note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = r["figures"]
        lines.append(f"| {r['name']} | {r['status']} | {_fmt(f.get('step_ms'))} | {_fmt(f.get('images_per_s'))} | "
                     f"{_fmt(f.get('peak_mib'))} | {_fmt(f.get('max_abs_diff'), 2)} | {r['note']} | "
                     f"{(r['error'] or f.get('note') or '').replace('|', '/')[:300]} |")
    timing = result.get("timing") or {}
    lines += ["", f"## GPU profile: one epoch of each kind of cell ({timing.get('profile', '—')}, "
              f"{timing.get('faces', '—')} data)", ""]
    if timing.get("error"):
        lines += [f"Cell timing failed: {timing['error']}", ""]
    lines += ["| cell | status | epoch s | setup s | images/s | data wait | peak MiB |", "|---|---|---|---|---|---|---|"]
    for label, c in (timing.get("cells") or {}).items():
        lines.append(f"| {label} | {c['status']}{' - ' + c['error'] if c.get('error') else ''} | {_fmt(c.get('epoch_s'))} | "
                     f"{_fmt(c.get('setup_s'))} | {_fmt(c.get('images_per_s'))} | {_fmt(c.get('data_wait'))} | "
                     f"{_fmt(c.get('peak_mib'))} |")
    ev = timing.get("eval")
    if ev:
        lines += ["", f"Per cell: Python start {_fmt(timing['import_s'])} s; evaluation {_fmt(ev['total_s'])} s "
                  f"(embedding {_fmt(ev['embed_s'])} s, all-pairs scoring {_fmt(ev['scoring_s'])} s, bootstrap "
                  f"{_fmt(ev['bootstrap_s'])} s: {ev['bootstrap_source']})."]
    lines += ["", "## Projection of `python -m bench.kd_table --profile gpu` (plan_key, one seed)", ""]
    proj = result.get("projection")
    if proj:
        lines += ["| epochs | T1 s | T1 key rows s | T1 + T1 rows min | T2 key rows s | whole table min |",
                  "|---|---|---|---|---|---|"]
        for p in proj:
            lines.append(f"| {p['epochs']} | {p['t1_s']:.0f} | {p['t1_key_rows_s']:.0f} | "
                         f"{p['t1_and_t1_rows_s'] / 60:.1f} | {p['t2_key_rows_s']:.0f} | {p['table_s'] / 60:.1f} |")
        lines += ["", f"**GPU_EPOCHS recommendation: {result['recommended_epochs']}** (largest epoch count with T1 + "
                  f"the T1 key rows within {TABLE_TARGET_S / 60:.0f} min on this device; `bench/kd_profiles.py` has "
                  f"GPU_EPOCHS = {result['gpu_epochs']}, not changed by this script). The whole table (T2 rows "
                  f"too) would fit in {TABLE_TARGET_S / 60:.0f} min at {result['whole_table_epochs']} epochs."]
        rec = result["recommended_epochs"]
        if rec is not None:
            verdict = ("fits: keep it, or raise it only with a convergence measurement" if rec >= result["gpu_epochs"]
                       else f"does not fit: lower it to {rec}")
            lines += ["", f"GPU_EPOCHS = {result['gpu_epochs']} {verdict}."]
        if result["dry_run"]:
            lines += ["", "Dry run: these numbers come from CPU runs of the smoke profile and say nothing about a GPU."]
    else:
        lines.append("Not projected: a cell timing failed (see above).")
    md, js = out / "gpu_check.md", out / "gpu_check.json"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps(result, indent=1, default=str))
    return md, js


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="run on the CPU with tiny shapes")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for gpu_check.md/.json (default bench/results; dry run: outputs/gpu_check_dry_run)")
    ap.add_argument("--faces", type=Path, default=None,
                    help="faces folder for the cell timing (train/ and teacher_dlib_r29/train.npz or a T2 "
                         "cache in --cache); default: a stand-in of train/'s size")
    ap.add_argument("--cache", type=Path, default=None, help="a KD-table cache holding teacher_t2/ (read only)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--skip-cells", action="store_true", help="only the rows, no GPU-profile timing")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_dry_run else "cuda"
    out = args.out or (REPO / ("outputs/gpu_check_dry_run" if args.cpu_dry_run else "bench/results"))
    from bench.kd_profiles import GPU_EPOCHS

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        logfile = open(work / "gpu_check.log", "a")

        def log(text: str) -> None:
            print(text, flush=True)
            logfile.write(text + "\n")

        shapes = DRY_SHAPES if args.cpu_dry_run else GPU_SHAPES
        start = time.perf_counter()
        result = {"dry_run": args.cpu_dry_run, "complete": False,
                  "command": "python -m bench.gpu_check" + (" --cpu-dry-run" if args.cpu_dry_run else ""),
                  "environment": environment(device), "shapes": dataclasses.asdict(shapes),
                  "bundle_parts": bundle_parts(REPO / ".gpu_bundle"), "rows": [], "timing": None,
                  "projection": None, "recommended_epochs": None, "whole_table_epochs": None,
                  "gpu_epochs": GPU_EPOCHS, "target_s": TABLE_TARGET_S, "seconds": None}

        def save(**changes: object) -> tuple[Path, Path]:
            result.update(changes, seconds=time.perf_counter() - start)
            return write_report(out, result)

        standin = make_standin_faces(work / "check_faces", shapes.identities, shapes.identities * shapes.images_per_identity)
        ctx = Context(device, shapes, work, standin, t2_cache_for(standin, work / "check_cache"))
        rows = run_rows(ctx, log, on_row=lambda done: save(rows=[dataclasses.asdict(r) for r in done]))
        if not args.skip_cells:
            if args.faces is not None:
                faces, label = args.faces, "given (--faces)"
            elif args.cpu_dry_run:
                faces, label = standin, "tiny stand-in"
            else:
                log(f"writing a stand-in train/ of {TRAIN_SET[1]} images")
                faces, label = make_standin_faces(work / "cell_faces", *TRAIN_SET), "stand-in of train/'s size"
            try:
                timing = time_cells(ctx, faces, label, args.cache, log, on_cell=lambda t: save(timing=t))
            except Exception as exc:  # noqa: BLE001 - e.g. no T2 cache for --faces: the rows' report is still written
                log(traceback.format_exc())
                timing = {"error": f"{type(exc).__name__}: {exc}", "cells": {}}
            recommended = recommend_epochs(timing)
            projection = None
            if project(timing, 1) is not None:
                epochs = sorted({1, GPU_EPOCHS} | ({recommended} if recommended else set()))
                projection = [project(timing, e) for e in epochs]
            save(timing=timing, projection=projection, recommended_epochs=recommended,
                 whole_table_epochs=recommend_epochs(timing, part="table_s"))
        md, js = save(complete=True)
        logfile.close()
    failed = [r.name for r in rows if r.status == "fail"]
    recommended = result["recommended_epochs"]
    print(f"wrote {md} and {js}; {len(failed)} row(s) failed{': ' + ', '.join(failed) if failed else ''}"
          + (f"; GPU_EPOCHS recommendation: {recommended}" if recommended is not None else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
