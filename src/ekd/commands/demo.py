"""``ekd demo``: the whole method on the built-in synthetic faces, no downloads.

1. Generate the teacher's training identities (the students' are the first ``train_identities``
   of them, in their own folder), disjoint evaluation identities and a pair list.
2. Train the teacher with CosFace alongside the no-KD students (they do not need it), then embed
   the students' images with it once (a teacher cache, as ``ekd teacher-cache``), so the EKD
   students never run the teacher.
3. Train the distilled students of each method of the plan (``DemoPlan.methods``, keys of
   :data:`DEMO_METHODS`: EKD, cosine matching and AdaDistill at the cpu3 table's settings) on the
   same data, sampler and schedule as the no-KD ones, two seeds each; on a CPU two models at a
   time, each in its own process with its share of the cores (:mod:`ekd.commands.side_by_side`).
4. Evaluate every model (pair-list 10-fold accuracy, all-pairs TPR at FPR), print the per-run
   table and, per method, the comparison: mean of the seeds, share of the teacher - no-KD gap
   closed per metric, and whether the method - no-KD difference exceeds the seed spread
   (:mod:`ekd.commands.demo_report`).

Everything (data, run directories, ``plan.json``, ``results.md``, ``metrics.json``) goes into one
folder. ``docs/results/demo_synthetic.md`` has the measured runs, the convergence check of plan
``FULL``'s students and the plans tried before it (``bench/demo_convergence.py``,
``bench/demo_plans.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ekd.commands.demo_report import (ALL_PAIRS, PAIRS, comparison_table, comparisons_from_results,
                                    summary)
from ekd.commands.eval_report import evaluate_checkpoint, write_report
from ekd.commands.side_by_side import train_side_by_side
from ekd.config import Config, DistillerConfig, from_dict, validate
from ekd.data.synthetic_benchmark import make_synthetic_benchmark
from ekd.errors import EkdError
from ekd.teachers.cache_builder import cache_for_data

log = logging.getLogger("ekd.demo")

#: EKD with the options of docs/methods.md: bias-corrected threshold EMA, thresholds from a
#: cross-batch memory (the batch alone has too few negatives for FPR 1e-3 and below), and the
#: weights the authors' 8-GPU runs effectively used.
DEMO_EKD = {"bias_correction": True, "memory_size": 2048, "pos_weight": 0.16, "neg_weight": 0.08}
#: EKD (ours) of the cpu3 table, a teacher that sees the student's input as the demo's does: its
#: validation split found no option that helps there (docs/results/kd_tuning_cpu3.md), so the
#: preset is the authors' loss with its defaults.
CPU3_EKD: dict = {}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo; ``QUICK`` is a smoke run of every step (well under a minute)."""

    train_identities: int
    train_images: int
    eval_identities: int
    eval_images: int
    image_size: int
    teacher_epochs: int
    student_epochs: int
    random_size: int
    identities_per_batch: int
    num_pairs: int
    teacher_backbone: str = "iresnet18"
    teacher_width: float = 1.0
    student_width: float = 1.0
    seeds: tuple[int, ...] = (0, 1)
    ekd: dict = field(default_factory=lambda: dict(DEMO_EKD))
    #: identities the teacher trains on: the students' ``train_identities`` first, then more
    #: (None: the students' own); the evaluation identities come after all of them.
    teacher_identities: int | None = None
    preload: bool = False  # data.preload for every model
    #: the distillation methods trained beside no KD, keys of :data:`DEMO_METHODS`, in table order
    methods: tuple[str, ...] = ("ekd",)

    @property
    def teacher_ids(self) -> int:
        return self.teacher_identities or self.train_identities

    @property
    def students_subset(self) -> bool:
        """True when the students train on fewer identities than the teacher."""
        return self.teacher_ids > self.train_identities

    @property
    def teacher_label(self) -> str:
        return f"teacher {network_name(self.teacher_backbone, self.teacher_width)}"

    @property
    def student_name(self) -> str:
        return network_name("mobilefacenet", self.student_width)


def network_name(backbone: str, width: float) -> str:
    name = {"mobilefacenet": "MobileFaceNet", "iresnet18": "IResNet-18"}.get(backbone, backbone)
    return name if width == 1.0 else f"{name} x{width:g}"


#: Plan G of ``bench/demo_plans.py`` (docs/results/demo_synthetic.md): a MobileFaceNet x0.5
#: teacher on 480 identities, quarter-width students on the first 60 of them (the synthetic task
#: is data-limited: a teacher on the students' own identities is no better than they are); cosine
#: and AdaDistill students, the methods the cpu3 table (a teacher that sees the student's input,
#: as here) found ahead of no KD, beside EKD with cpu3's preset (:data:`CPU3_EKD`).
FULL = DemoPlan(train_identities=60, train_images=16, eval_identities=120, eval_images=10,
                image_size=32, teacher_epochs=8, student_epochs=24, random_size=32,
                identities_per_batch=8, num_pairs=6000, teacher_backbone="mobilefacenet",
                teacher_width=0.5, student_width=0.25, teacher_identities=480, preload=True,
                ekd=dict(CPU3_EKD), methods=("cosine", "adadistill", "ekd"))
QUICK = DemoPlan(train_identities=24, train_images=6, eval_identities=12, eval_images=4,
                 image_size=32, teacher_epochs=1, student_epochs=1, random_size=16,
                 identities_per_batch=4, num_pairs=200, teacher_backbone="mobilefacenet",
                 teacher_width=0.5, student_width=0.25, teacher_identities=48, preload=True,
                 ekd=FULL.ekd, methods=FULL.methods)

NOKD = "student no KD"


def ekd_section(plan: DemoPlan) -> list[DistillerConfig]:
    """EKD with the plan's options (``FULL``: :data:`CPU3_EKD`; earlier plans :data:`DEMO_EKD`)."""
    return [DistillerConfig(name="ekd", weight=1.0, params=dict(plan.ekd))]


def cosine_section(plan: DemoPlan) -> list[DistillerConfig]:  # noqa: ARG001 - same for every plan
    """Cosine embedding matching at the weight the cpu3 validation grid chose (10)."""
    return [DistillerConfig(name="cosine", weight=10.0)]


def adadistill_section(plan: DemoPlan) -> list[DistillerConfig]:  # noqa: ARG001 - same for every plan
    """AdaDistill with the authors' settings (configs/zoo/adadistill.yaml, as the cpu3 table):
    ArcFace s = 64, m = 0.45 on teacher-distilled class centres, replacing the student's CE."""
    return [DistillerConfig(name="adadistill", weight=1.0,
                            params={"kind": "arcface", "scale": 64.0, "margin": 0.45,
                                    "hard_weighting": True, "replace_ce": True, "duplicates": "last"})]


#: Methods the demo can train beside no KD: key -> (name in its tables, its ``distill`` section).
DEMO_METHODS = {"ekd": ("EKD", ekd_section), "cosine": ("cosine", cosine_section),
                "adadistill": ("AdaDistill", adadistill_section)}


def method_label(method: str) -> str:
    """The run label of a method's students (``student EKD``)."""
    return f"student {DEMO_METHODS[method][0]}"


def demo_config(plan: DemoPlan, out: Path, name: str, backbone: str, epochs: int,
                device: str, seed: int = 0, width: float = 1.0, students: bool = False) -> Config:
    """A complete training config for one demo model; ``students``: on the students' training
    identities (:func:`students_root` when they are a subset of the teacher's)."""
    data: dict = {"kind": "synthetic", "input_size": plan.image_size, "preload": plan.preload,
                  "synthetic": {"train_identities": plan.teacher_ids,
                                "train_images": plan.train_images,
                                "eval_identities": plan.eval_identities,
                                "eval_images": plan.eval_images,
                                "num_pairs": plan.num_pairs, "image_size": plan.image_size,
                                "seed": 0, "cache_dir": str(out / "data")}}
    if students and plan.students_subset:
        data = {"kind": "folder", "root": str(students_root(plan, out)),
                "input_size": plan.image_size, "preload": plan.preload}
    cfg = from_dict(Config, {
        "data": data,
        "sampler": {"random_size": plan.random_size,
                    "identities_per_batch": plan.identities_per_batch, "samples_per_identity": 4},
        "model": {"backbone": backbone, "embedding_size": 128, "width": width},
        "head": {"kind": "cosface", "scale": 32.0, "margin": 0.2},
        "optim": {"lr": 0.1, "scheduler": "cosine", "warmup_epochs": 0.5, "weight_decay": 5e-4},
        "train": {"epochs": epochs, "device": device, "seed": seed, "output_dir": str(out / name),
                  "overwrite": True,  # the demo trains every model again on a rerun
                  "ce_on": "all", "log_every": 25, "progress": False},
    })
    return cfg


def students_root(plan: DemoPlan, out: Path) -> Path:
    """The students' training folder: the synthetic training folder, or, when the teacher has
    more identities, ``data/train_students`` with the first ``train_identities`` of them."""
    data = Path(out) / "data"
    return data / ("train_students" if plan.students_subset else "train")


def prepare_data(plan: DemoPlan, out: Path, progress: bool = False) -> Path:
    """Generate the demo's data (:func:`make_synthetic_benchmark` with the teacher's identities,
    and the students' subset: a copy of the teacher's first identity folders) before any
    training, so that models trained at once find it; returns :func:`students_root`."""
    make_synthetic_benchmark(Path(out) / "data", plan.teacher_ids, plan.train_images,
                             plan.eval_identities, plan.eval_images, plan.image_size,
                             plan.num_pairs, seed=0, progress=progress)
    root = students_root(plan, out)
    if plan.students_subset:
        done = root.with_suffix(".done")  # data/train_students.done: what the folder holds
        params = json.dumps([plan.train_identities, plan.train_images, plan.image_size])
        if not (done.is_file() and done.read_text() == params and root.is_dir()):
            done.unlink(missing_ok=True)
            shutil.rmtree(root, ignore_errors=True)
            teacher_ids = sorted(d for d in (Path(out) / "data" / "train").iterdir() if d.is_dir())
            for folder in teacher_ids[:plan.train_identities]:
                shutil.copytree(folder, root / folder.name)
            done.write_text(params)
    return root


def teacher_config(plan: DemoPlan, out: Path, device: str, epochs: int | None = None,
                   name: str = "teacher", seed: int = 0) -> Config:
    """The config of the demo's teacher (on all ``teacher_ids`` identities)."""
    return demo_config(plan, out, name, plan.teacher_backbone, epochs or plan.teacher_epochs,
                       device, seed, plan.teacher_width)


def student_config(plan: DemoPlan, out: Path, method: str, seed: int, device: str,
                   epochs: int | None = None, name: str | None = None) -> Config:
    """The config of one demo student: ``method`` ``"nokd"`` or a key of :data:`DEMO_METHODS`
    (distilled from the teacher cache in ``out/teacher_cache``, made from ``out/teacher/model.pt``)."""
    if method != "nokd" and method not in DEMO_METHODS:
        raise EkdError(f"demo: unknown method {method!r}; valid: nokd, {', '.join(DEMO_METHODS)}")
    cfg = demo_config(plan, out, name or f"student_{method}_s{seed}", "mobilefacenet",
                      epochs or plan.student_epochs, device, seed, plan.student_width,
                      students=True)
    if method != "nokd":
        cfg.teacher.kind, cfg.teacher.path = "cache", str(out / "teacher_cache")
        cfg.teacher.cache_teacher = str(out / "teacher" / "model.pt")
        cfg.distill = DEMO_METHODS[method][1](plan)
    validate(cfg)
    return cfg


def epochs(n: int) -> str:
    """``1 epoch``, ``8 epochs``."""
    return f"{n} epoch" + ("" if n == 1 else "s")


def run_label(student: str, seed: int) -> str:
    return f"{student} (seed {seed})"


def default_jobs(device: str) -> int:
    """Students trained at once: one per core (at most 2) on a CPU, one at a time on a GPU."""
    if device not in ("auto", "cpu") or (device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def run_demo(out: Path, quick: bool = False, device: str = "auto", jobs: int | None = None,
             plan: DemoPlan | None = None) -> dict:
    """Run the demo into ``out``; returns the evaluation results per model and the comparison.
    ``jobs``: students trained at once (default :func:`default_jobs`); ``plan`` replaces
    ``FULL`` / ``QUICK`` (``bench/demo_plans.py`` measures candidate plans)."""
    plan = plan or (QUICK if quick else FULL)
    jobs = default_jobs(device) if jobs is None else jobs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps({"quick": quick, **asdict(plan)}, indent=1))
    start = time.perf_counter()

    log.info("step 1/4: synthetic faces for %d training and %d evaluation identities in %s",
             plan.teacher_ids, plan.eval_identities, out / "data")
    root = prepare_data(plan, out, progress=True)
    nokd = [student_config(plan, out, "nokd", seed, device) for seed in plan.seeds]
    log.info("step 2/4: training the %s (%d identities, %s) and the no-KD students (%s, "
             "%d identities, %s, seeds %s), %d at a time; each run logs every epoch",
             plan.teacher_label, plan.teacher_ids, epochs(plan.teacher_epochs), plan.student_name,
             plan.train_identities, epochs(plan.student_epochs), ", ".join(map(str, plan.seeds)),
             jobs)
    teacher, *nokd_runs = train_side_by_side([teacher_config(plan, out, device), *nokd], jobs)
    log.info("teacher saved to %s", teacher.model_path)
    log.info("embedding the students' training images with the teacher once (teacher cache)")
    cache_for_data(root, plan.image_size, out / "teacher_cache",
                   teacher=str(teacher.model_path), device=device, progress=True)
    names = ", ".join(DEMO_METHODS[m][0] for m in plan.methods)
    log.info("step 3/4: training the distilled students (%s; %s, seeds %s), %d at a time",
             names, epochs(plan.student_epochs), ", ".join(map(str, plan.seeds)), jobs)
    distilled = train_side_by_side([student_config(plan, out, m, seed, device)
                                    for m in plan.methods for seed in plan.seeds], jobs)
    runs = {plan.teacher_label: teacher}
    for seed, nokd_run in zip(plan.seeds, nokd_runs):
        runs[run_label(NOKD, seed)] = nokd_run
    for i, (m, seed) in enumerate((m, seed) for m in plan.methods for seed in plan.seeds):
        runs[run_label(method_label(m), seed)] = distilled[i]

    results, table, comparison = evaluate_and_compare(out, plan, runs, device)
    total = time.perf_counter() - start
    (out / "timing.json").write_text(json.dumps({"total_seconds": total, "quick": quick,
                                                 "jobs": jobs}))
    print(f"\nEKD demo ({'quick' if quick else 'full'}), {total / 60:.1f} min; results in {out}\n")
    print(table + "\n\nEach method vs no KD (gap closed = (method - no KD) / (teacher - no KD)):\n")
    print(comparison)
    return results


def eval_sets(out: Path) -> dict[str, tuple]:
    """The demo's two protocols on its evaluation identities, as ``evaluate_checkpoint`` takes them."""
    data = out / "data"
    return {PAIRS: ("pairs", str(data / "pairs.txt"), str(data / "eval")),
            ALL_PAIRS: ("folder", str(data / "eval"), None)}


def evaluate_and_compare(out: Path, plan: DemoPlan, runs: dict,
                         device: str = "auto") -> tuple[dict, str, str]:
    """Evaluate the demo's models (``runs``: label -> :class:`TrainResult`), write
    ``metrics.json``, ``results.md`` and ``comparison.json`` into ``out``; return the results,
    the per-run table and the EKD vs no-KD comparison."""
    sets = eval_sets(out)
    results = {}
    log.info("step 4/4: evaluating %d models on the pair list and all pairs", len(runs))
    for label, run in runs.items():
        log.info("evaluating %s", label)
        res = evaluate_checkpoint(run.model_path, sets, max_per_identity=plan.eval_images,
                                  device=device, progress=True, label=label)
        res["train_seconds"] = run.seconds
        results[label] = res
    table = write_report(results, out)
    sections, records = [], []
    for m in plan.methods:
        name = DEMO_METHODS[m][0]
        rows, skipped = comparisons_from_results(results[plan.teacher_label],
                                                 [results[run_label(NOKD, s)] for s in plan.seeds],
                                                 [results[run_label(method_label(m), s)] for s in plan.seeds],
                                                 method=name)
        text = comparison_table(rows) + "\n\n" + summary(rows)
        if skipped:
            text += ("\n\nNot compared (too few negative pairs for that FPR): " + ", ".join(skipped) + ".")
        sections.append(f"## {name} vs no KD\n\n{text}")
        records += [{"method": name, "metric": r.metric, "teacher": r.teacher, "nokd": r.nokd, "distilled": r.distilled,
                     "gap_closed": r.gap_closed, "spread": r.spread, "verdict": r.verdict} for r in rows]
    comparison = "\n\n".join(sections)
    (out / "comparison.json").write_text(json.dumps(records, indent=1))
    with open(out / "results.md", "a") as fh:
        fh.write("\n" + comparison + "\n")
    return results, table, comparison
