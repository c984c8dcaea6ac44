"""The real-face KD table: teacher, no-KD student, every distiller and the EKD variants.

Data and protocols follow ``../shared/data/faces/README.md``: students train on ``train/``
(CelebA-299 + CFP identities 001-450) and are scored on LFW View-2 (10-fold accuracy), LFW
all-pairs (TPR at FPR 1e-3/1e-4/1e-5) and CFP fold 10 (FF, FP), see ``kd_table_eval.py``.

Teachers: **T2** is the shared pretrained dlib ResNet (128-d), used through an embedding cache
imported from ``teacher_dlib_r29/train.npz``; classifier-needing methods (kd, margin_distill,
proxylesskd) use the normalised mean teacher embedding of each identity as its class centre
(``teacher.centers: mean_embedding``). **T1** (GPU profile only) is an IResNet-50 trained here
on ``train/`` with ArcFace, as in the paper.

A *cell* is one (teacher, method, seed) training + evaluation. Its config is hashed (paths
replaced by placeholders) and the finished result is kept in ``<cache>/cells/<name>-<hash>/``,
so an interrupted table resumes where it stopped (a half-trained cell resumes from its last
epoch checkpoint) and a table can be completed over several sessions. Cells run as
subprocesses, ``--jobs`` at a time with ``--threads`` torch threads each.

Seeds: 3 for no-KD, EKD (authors), EKD (ours), AdaDistill, EKD + AdaDistill and for the two
best other distillers of the one-seed sweep (by LFW all-pairs TPR@1e-4, then LFW accuracy);
1 for the rest. The report (``kd_table_report.py``) writes ``docs/results/``.

Usage::

    python bench/kd_table.py                      # CPU profile (default), 2 jobs x 1 thread
    python bench/kd_table.py --profile gpu        # T1 + T2 at 112 px, paper schedule
    python bench/kd_table.py --report-only        # rewrite the report from finished cells

Options: ``--faces`` (default ``../shared/data/faces`` beside the repository), ``--cache``
(default ``$EKD_KD_TABLE_CACHE`` or ``~/.cache/ekd/kd_table``), ``--out`` (``docs/results``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HASH_VERSION = 1  # bump when the evaluation of a cell changes


@dataclass(frozen=True)
class Profile:
    """Schedule and scale of one table profile."""

    name: str
    teachers: tuple[str, ...]
    input_size: int
    epochs: int
    random_size: int
    identities_per_batch: int
    samples_per_identity: int
    head: dict
    optim: dict
    device: str
    jobs: int
    threads: int
    t1: dict = field(default_factory=dict)  # teacher T1 training (GPU profile)
    steps_per_epoch: int | None = None  # cap (smoke runs); None = whole epochs
    num_workers: int = 0  # data loader processes (not part of a cell's identity)


# CPU: 32 px, 2 epochs of 192 steps x 128 images (64 random + 16 identities x 4), CosFace
# s=32 m=0.2 on every sample, SGD 0.1 with a 0.3-epoch warm-up and cosine decay. Chosen so
# that the 30 cells fit in about 2 hours on 2 cores; see docs/benchmark.md.
CPU = Profile(name="cpu", teachers=("T2",), input_size=32, epochs=2, random_size=64,
              identities_per_batch=16, samples_per_identity=4,
              head={"kind": "cosface", "scale": 32.0, "margin": 0.2},
              optim={"lr": 0.1, "scheduler": "cosine", "warmup_epochs": 0.3, "weight_decay": 5e-4},
              device="cpu", jobs=2, threads=1)
# GPU: the paper's scale (112 px, ArcFace s=64 m=0.5, batch 128 random + 128 balanced).
GPU = Profile(name="gpu", teachers=("T1", "T2"), input_size=112, epochs=24, random_size=128,
              identities_per_batch=32, samples_per_identity=4,
              head={"kind": "arcface", "scale": 64.0, "margin": 0.5},
              optim={"lr": 0.1, "scheduler": "cosine", "warmup_epochs": 1.0, "weight_decay": 5e-4},
              device="cuda", jobs=1, threads=4, num_workers=8,
              t1={"backbone": "iresnet50", "embedding_size": 512, "epochs": 24})
PROFILES = {p.name: p for p in (CPU, GPU)}

# EKD (ours): bias-corrected threshold EMA, thresholds from a 4096-embedding cross-batch memory,
# and the weights the authors' 8-GPU runs effectively used. Their AllGather backward multiplies
# the gathered gradient by the world size (a correction meant for their distributed softmax), so
# with 8 GPUs the EKD gradient is 8x the single-process one: pos/neg weights 0.02/0.01 act as
# 0.16/0.08. Our trainer's gradient does not depend on the world size, so these weights mean the
# same on 1 CPU and on 8 GPUs.
EKD_OURS = {"name": "ekd", "weight": 1.0,
            "params": {"bias_correction": True, "memory_size": 4096, "pos_weight": 0.16, "neg_weight": 0.08}}
SEEDED = ("no KD", "EKD (authors)", "EKD (ours)", "AdaDistill", "EKD + AdaDistill")
OTHERS = ("fitnet", "kd", "darkrank", "sp", "cckd", "rkd", "cosine", "shrinkteanet",
          "triplet_distill", "margin_distill", "proxylesskd")
NEEDS_CENTERS = ("kd", "margin_distill", "proxylesskd")


def zoo_distill(name: str) -> list[dict]:
    """The ``distill`` section of ``configs/zoo/<name>.yaml`` (the zoo's recommended settings)."""
    from ekd.config import read_yaml

    return read_yaml(REPO / "configs" / "zoo" / f"{name}.yaml")["distill"]


def method_distill(method: str) -> list[dict]:
    if method == "no KD":
        return []
    if method == "EKD (authors)":
        return [{"name": "ekd", "weight": 1.0, "params": {}}]
    if method == "EKD (ours)":
        return [EKD_OURS]
    if method == "AdaDistill":
        return zoo_distill("adadistill")
    if method == "EKD + AdaDistill":
        return [EKD_OURS] + zoo_distill("adadistill")
    return zoo_distill(method)


@dataclass(frozen=True)
class Cell:
    teacher: str
    method: str
    seed: int

    @property
    def slug(self) -> str:
        m = "".join(c if c.isalnum() else "_" for c in self.method.lower()).strip("_")
        return f"{self.teacher}-{m}-s{self.seed}"


class Table:
    """Builds cell configs for a profile and runs/collects the cells in ``cache``."""

    def __init__(self, profile: Profile, faces: Path, cache: Path) -> None:
        self.profile, self.faces, self.cache = profile, faces.resolve(), cache.resolve()

    # -- configs ------------------------------------------------------------------------
    def teacher_section(self, teacher: str, method: str) -> dict:
        if method == "no KD":
            return {"kind": "none"}
        if teacher == "T2":
            return {"kind": "cache", "path": str(self.cache / "teacher_t2"),
                    "centers": "mean_embedding" if method in NEEDS_CENTERS else "classifier"}
        return {"kind": "checkpoint", "path": str(self.t1_dir() / "run" / "model.pt")}

    def config_tree(self, cell: Cell) -> dict:
        p = self.profile
        emb = 128 if cell.teacher == "T2" else p.t1.get("embedding_size", 512)
        return {
            "data": {"kind": "folder", "root": str(self.faces / "train"), "input_size": p.input_size,
                     "num_workers": p.num_workers},
            "sampler": {"random_size": p.random_size, "identities_per_batch": p.identities_per_batch,
                        "samples_per_identity": p.samples_per_identity},
            "model": {"backbone": "mobilefacenet", "embedding_size": emb},
            "head": dict(p.head),
            "teacher": self.teacher_section(cell.teacher, cell.method),
            "distill": method_distill(cell.method),
            "optim": dict(p.optim),
            "train": {"epochs": p.epochs, "device": p.device, "seed": cell.seed, "ce_on": "all",
                      "progress": False, "log_every": 20, "amp": "bf16" if p.device == "cuda" else "none",
                      "max_steps_per_epoch": p.steps_per_epoch},
        }

    def digest(self, tree: dict) -> str:
        """Hash of everything that changes a cell's result (not paths, not loader workers)."""
        tree = {**tree, "data": {k: v for k, v in tree["data"].items() if k != "num_workers"}}
        text = json.dumps({"v": HASH_VERSION, "cfg": tree}, sort_keys=True)
        text = text.replace(str(self.faces), "<faces>").replace(str(self.cache), "<cache>")
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def cell_dir(self, cell: Cell) -> Path:
        return self.cache / "cells" / f"{cell.slug}-{self.digest(self.config_tree(cell))}"

    def t1_tree(self) -> dict:
        tree = self.config_tree(Cell("T1", "no KD", 0))
        tree["model"] = {"backbone": self.profile.t1["backbone"],
                         "embedding_size": self.profile.t1["embedding_size"]}
        tree["train"]["epochs"] = self.profile.t1["epochs"]
        return tree

    def t1_dir(self) -> Path:
        return self.cache / "cells" / f"T1-teacher-{self.digest(self.t1_tree())}"

    # -- results ------------------------------------------------------------------------
    def result(self, cell: Cell) -> dict | None:
        file = self.cell_dir(cell) / "result.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def plan(self) -> list[Cell]:
        """Every cell of the table whose seeds are known now (phase 2 needs phase-1 results)."""
        cells = []
        for t in self.profile.teachers:
            cells += [Cell(t, m, s) for s in range(3) for m in SEEDED]
            cells += [Cell(t, m, 0) for m in OTHERS]
            best = self.best_others(t)
            if best:
                cells += [Cell(t, m, s) for m in best for s in (1, 2)]
        return sorted(cells, key=lambda c: (c.seed > 0 and c.method in OTHERS, c.seed, c.teacher))

    def best_others(self, teacher: str) -> list[str] | None:
        """The two best other distillers of the one-seed sweep (None until it is complete)."""
        scores = {}
        for m in OTHERS:
            r = self.result(Cell(teacher, m, 0))
            if r is None:
                return None
            scores[m] = (r["metrics"]["lfw_tpr@1e-4"] or 0.0, r["metrics"]["lfw_acc"])
        return sorted(OTHERS, key=lambda m: scores[m], reverse=True)[:2]

    # -- preparation ----------------------------------------------------------------------
    def prepare(self) -> None:
        """The T2 embedding cache and the decoded evaluation images (once)."""
        from ekd.data import ImageFolderDataset
        from ekd.engine.teacher_cache import import_npz

        self.cache.mkdir(parents=True, exist_ok=True)
        if "T2" in self.profile.teachers and not (self.cache / "teacher_t2" / "manifest.json").is_file():
            dataset = ImageFolderDataset(self.faces / "train", input_size=self.profile.input_size)
            import_npz(self.faces / "teacher_dlib_r29" / "train.npz", dataset, self.cache / "teacher_t2")
        from kd_table_eval import load_eval_images, load_protocols

        load_eval_images(load_protocols(self.faces), self.profile.input_size, self.cache)

    def pending(self) -> list[tuple[str, Path, dict, dict]]:
        """Cells still to run, as (name, folder, config tree, meta); T1 first when needed."""
        if self.profile.t1 and not (self.t1_dir() / "result.json").is_file():
            return [("T1-teacher", self.t1_dir(), self.t1_tree(), {"teacher": "T1", "method": "teacher", "seed": 0})]
        jobs = []
        for cell in self.plan():
            d = self.cell_dir(cell)
            if not (d / "result.json").is_file():
                jobs.append((cell.slug, d, self.config_tree(cell),
                             {"teacher": cell.teacher, "method": cell.method, "seed": cell.seed}))
        return jobs

    def write_cell(self, cell_dir: Path, tree: dict, meta: dict) -> None:
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "cell.json").write_text(json.dumps(
            {"config": tree, "meta": meta, "faces": str(self.faces), "cache": str(self.cache),
             "input_size": self.profile.input_size, "threads": self.profile.threads}, indent=1))


def run_cell(cell_dir: Path) -> None:
    """Train (resuming a half-done run) and evaluate one cell; writes ``result.json``."""
    import torch

    from ekd.config import from_dict, validate, Config
    from ekd.engine.teacher import load_model
    from ekd.engine.trainer import train
    from kd_table_eval import evaluate_student, load_eval_images, load_protocols

    spec = json.loads((cell_dir / "cell.json").read_text())
    torch.set_num_threads(int(spec["threads"]))
    tree = json.loads(json.dumps(spec["config"]))
    tree["train"].update({"output_dir": str(cell_dir / "run"), "resume": "auto"})
    cfg = from_dict(Config, tree)
    validate(cfg)
    start = time.perf_counter()
    trained = train(cfg)
    if trained.interrupted:
        raise SystemExit(f"{cell_dir}: interrupted; rerun to resume")
    train_s = time.perf_counter() - start
    faces, cache = Path(spec["faces"]), Path(spec["cache"])
    protocols = load_protocols(faces)
    paths, images = load_eval_images(protocols, spec["input_size"], cache)
    model = load_model(trained.model_path).model.eval()
    t0 = time.perf_counter()
    metrics = evaluate_student(model, protocols, paths, images)
    result = {**spec["meta"], "metrics": metrics, "train_seconds": train_s,
              "eval_seconds": time.perf_counter() - t0, "final_terms": trained.final_terms}
    tmp = cell_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, cell_dir / "result.json")


def run_all(table: Table, jobs: int) -> float:
    """Run every missing cell, ``jobs`` at a time, re-planning as results arrive."""
    from tqdm import tqdm

    running: dict[str, tuple[subprocess.Popen, str, float]] = {}
    failed: set[str] = set()
    bar = tqdm(desc=f"KD table ({table.profile.name})", unit="cell", dynamic_ncols=True)
    start = time.perf_counter()
    while True:
        pending = [job for job in table.pending() if str(job[1]) not in running and str(job[1]) not in failed]
        plan = table.plan()
        done = sum(1 for c in plan if table.result(c))
        if (bar.total, bar.n) != (len(plan), done):
            bar.total, bar.n = len(plan), done
            bar.refresh()
        while pending and len(running) < jobs:
            slug, d, tree, meta = pending.pop(0)
            table.write_cell(d, tree, meta)
            env = {**os.environ, "OMP_NUM_THREADS": str(table.profile.threads)}
            with open(d / "log.txt", "a") as log:  # the child keeps its own handle
                proc = subprocess.Popen([sys.executable, __file__, "--run-cell", str(d)], stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running[str(d)] = (proc, slug, time.perf_counter())
            bar.set_postfix_str(", ".join(v[1] for v in running.values()))
        if not running:
            break
        time.sleep(5)
        for key, (proc, slug, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                if proc.returncode != 0:
                    failed.add(key)
                    tqdm.write(f"cell {slug} failed (exit {proc.returncode}); see {key}/log.txt")
                else:
                    tqdm.write(f"cell {slug} done in {(time.perf_counter() - t0) / 60:.1f} min")
    bar.close()
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) failed: " + ", ".join(sorted(failed)))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "EKD_KD_TABLE_CACHE", Path.home() / ".cache" / "ekd" / "kd_table")))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    ap.add_argument("--jobs", type=int, default=None, help="cells at a time (profile default)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report")
    ap.add_argument("--run-cell", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.run_cell:
        run_cell(args.run_cell)
        return 0
    if not (args.faces / "teacher_dlib_r29").is_dir():
        print(f"real faces not found at {args.faces} (see --faces): nothing to do")
        return 0
    profile = PROFILES[args.profile]
    table = Table(profile, args.faces, args.cache)
    wall = 0.0
    if not args.report_only:
        table.prepare()
        wall = run_all(table, args.jobs or profile.jobs)
    from kd_table_report import write_report

    out = write_report(table, args.out, wall, ["python", *sys.argv])
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
