"""``ekd demo``: the whole method on the built-in synthetic faces, no downloads.

1. Generate training identities and disjoint evaluation identities with a pair list.
2. Train a teacher (IResNet-18) with ArcFace.
3. Train a MobileFaceNet student without distillation, and one with EKD from that teacher, on
   the same data, sampler and schedule.
4. Evaluate all three (pair-list 10-fold accuracy, all-pairs TPR at FPR) and print a table.

Everything (data, run directories, ``results.md``, ``metrics.json``) goes into one folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ekd.config import Config, DistillerConfig, from_dict, validate
from ekd.engine.evaluation import evaluate_checkpoint, write_report
from ekd.engine.trainer import train

log = logging.getLogger("ekd.demo")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo; ``QUICK`` fits in about 2 minutes on 2 CPU cores."""

    train_identities: int
    train_images: int
    eval_identities: int
    eval_images: int
    image_size: int
    teacher_epochs: int
    student_epochs: int
    random_size: int
    identities_per_batch: int


FULL = DemoPlan(train_identities=120, train_images=14, eval_identities=60, eval_images=10,
                image_size=32, teacher_epochs=3, student_epochs=4, random_size=64,
                identities_per_batch=8)
QUICK = DemoPlan(train_identities=64, train_images=8, eval_identities=30, eval_images=8,
                 image_size=32, teacher_epochs=2, student_epochs=2, random_size=32,
                 identities_per_batch=8)


def demo_config(plan: DemoPlan, out: Path, name: str, backbone: str, epochs: int,
                device: str) -> Config:
    """A complete training config for one demo model."""
    cfg = from_dict(Config, {
        "data": {"kind": "synthetic", "input_size": plan.image_size,
                 "synthetic": {"train_identities": plan.train_identities,
                               "train_images": plan.train_images,
                               "eval_identities": plan.eval_identities,
                               "eval_images": plan.eval_images,
                               "num_pairs": 2000, "image_size": plan.image_size, "seed": 0,
                               "cache_dir": str(out / "data")}},
        "sampler": {"random_size": plan.random_size,
                    "identities_per_batch": plan.identities_per_batch, "samples_per_identity": 4},
        "model": {"backbone": backbone, "embedding_size": 128},
        "head": {"kind": "cosface", "scale": 32.0, "margin": 0.3},
        "optim": {"lr": 0.1, "scheduler": "cosine", "warmup_epochs": 0.5, "weight_decay": 5e-4},
        "train": {"epochs": epochs, "device": device, "seed": 0, "output_dir": str(out / name),
                  "log_every": 5},
    })
    return cfg


def run_demo(out: Path, quick: bool = False, device: str = "auto") -> dict:
    """Run the demo into ``out``; returns the evaluation results per model."""
    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    teacher_cfg = demo_config(plan, out, "teacher", "iresnet18", plan.teacher_epochs, device)
    teacher_cfg.train.ce_on = "all"  # the teacher learns from every sample of the batch
    log.info("training the teacher (IResNet-18, %d epochs)", plan.teacher_epochs)
    teacher = train(teacher_cfg)
    log.info("teacher saved to %s", teacher.model_path)

    plain_cfg = demo_config(plan, out, "student_nokd", "mobilefacenet", plan.student_epochs, device)
    log.info("training the student without distillation (MobileFaceNet, %d epochs)", plan.student_epochs)
    plain = train(plain_cfg)

    ekd_cfg = demo_config(plan, out, "student_ekd", "mobilefacenet", plan.student_epochs, device)
    ekd_cfg.teacher.kind, ekd_cfg.teacher.path = "checkpoint", str(teacher.model_path)
    ekd_cfg.distill = [DistillerConfig(name="ekd", weight=1.0)]
    validate(ekd_cfg)
    log.info("training the student with EKD")
    student = train(ekd_cfg)

    data = out / "data"
    sets = {"synthetic pairs": ("pairs", str(data / "pairs.txt"), str(data / "eval")),
            "synthetic all-pairs": ("folder", str(data / "eval"), None)}
    results = {}
    for label, run in (("teacher IResNet-18", teacher), ("student no KD", plain),
                       ("student EKD", student)):
        res = evaluate_checkpoint(run.model_path, sets, max_per_identity=10, device=device,
                                  progress=False)
        res["train_seconds"] = run.seconds
        results[label] = res
    table = write_report(results, out)
    total = time.perf_counter() - start
    (out / "timing.json").write_text(json.dumps({"total_seconds": total, "quick": quick}))
    print(f"\nEKD demo ({'quick' if quick else 'full'}), {total / 60:.1f} min; results in {out}\n")
    print(table)
    return results
