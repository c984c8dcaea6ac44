"""Single-process training loop (CPU or one GPU): margin softmax + distillers.

Per step (EKD, Sec. 4.1): the student embeds the whole batch; the margin cross-entropy sees the
random part of the batch (``train.ce_on: random``, the authors' split) or all of it; every
configured distiller sees the whole batch with the frozen teacher's embeddings, plus the extras it
``requires`` (logits, the teacher's class centres, the student's head); methods that train the
student on another classifier (``replaces_ce``: ProxylessKD, MarginDistillation, AdaDistill) drop
the margin cross-entropy term. The total loss is the sum of all named terms, each logged
separately.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON object per logged
step and per epoch), ``checkpoints/last.pt`` (written atomically every epoch) and ``model.pt``
(the final student, loadable by ``ekd eval`` or as a teacher).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ekd.config import Config, DistillerConfig, save_config, to_dict
from ekd.data import ImageFolderDataset, make_synthetic_benchmark
from ekd.data.sampler import BalancedBatchSampler
from ekd.distill import EXTRAS, Distiller, build_distiller, distiller_params
from ekd.engine.checkpoint import FORMAT, VERSION, save_atomic
from ekd.engine.optim import build_optimizer, build_scheduler
from ekd.engine.teacher import LoadedModel, load_teacher
from ekd.errors import ConfigError, EkdError
from ekd.heads import build_head
from ekd.models import build_backbone

log = logging.getLogger("ekd.train")


def resolve_device(name: str) -> torch.device:
    """``auto`` = the first CUDA device when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: invalid device {name!r}: {exc}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_train_set(cfg: Config) -> ImageFolderDataset:
    """The training identity folder: ``data.root`` or the generated synthetic set."""
    if cfg.data.kind == "synthetic":
        s = cfg.data.synthetic
        paths = make_synthetic_benchmark(Path(s.cache_dir), s.train_identities, s.train_images,
                                         s.eval_identities, s.eval_images, s.image_size,
                                         s.num_pairs, s.seed)
        root = paths["train"]
    else:
        root = Path(cfg.data.root)  # type: ignore[arg-type]
    return ImageFolderDataset(root, input_size=cfg.data.input_size, train=True)


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    seconds: float
    final_terms: dict


class Trainer:
    """Builds every component from a :class:`Config` and runs the epochs."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        seed_everything(cfg.train.seed)
        self.run_dir = Path(cfg.train.output_dir)
        self.dataset = build_train_set(cfg)
        sc = cfg.sampler
        self.sampler = BalancedBatchSampler(self.dataset.labels, sc.random_size, sc.identities_per_batch,
                                            sc.samples_per_identity, seed=cfg.train.seed)
        if cfg.train.max_steps_per_epoch:
            self.sampler.batches_per_epoch = min(self.sampler.batches_per_epoch,
                                                 cfg.train.max_steps_per_epoch)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler,
                                 num_workers=cfg.data.num_workers,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=cfg.data.num_workers > 0)
        mc = cfg.model
        self.student = build_backbone(mc.backbone, embedding_size=mc.embedding_size,
                                      input_size=cfg.data.input_size, dropout=mc.dropout).to(self.device)
        self.head = build_head(cfg.head.kind, mc.embedding_size, self.dataset.num_classes,
                               cfg.head.scale, cfg.head.margin).to(self.device)
        self.teacher: LoadedModel | None = None
        if cfg.teacher.kind == "checkpoint":
            self.teacher = load_teacher(cfg.teacher.path, cfg.teacher.backbone,  # type: ignore[arg-type]
                                        cfg.teacher.embedding_size, input_size=cfg.data.input_size,
                                        device=self.device)
        self.distillers = nn.ModuleList(self._build_distiller(d) for d in cfg.distill).to(self.device)
        self.teacher_centers = self._check_extras()
        # methods that train the student on another classifier (ProxylessKD, AdaDistill, ...)
        self.ce_replaced = any(getattr(d, "replaces_ce", False) for d in self.distillers)
        steps_per_epoch = len(self.sampler)
        self.total_steps = steps_per_epoch * cfg.train.epochs
        oc = cfg.optim
        self.optimizer = build_optimizer([self.student, self.head, self.distillers], oc.lr,
                                         oc.momentum, oc.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         int(round(oc.warmup_epochs * steps_per_epoch)), oc.scheduler,
                                         [int(m * steps_per_epoch) for m in oc.milestones], oc.gamma)
        self.epoch = 0
        self.step = 0

    # -- distiller inputs -------------------------------------------------------------------
    def _build_distiller(self, d: DistillerConfig) -> Distiller:
        """Build one configured distiller; widths and class count are filled in when its
        ``__init__`` accepts ``student_dim``/``teacher_dim``/``num_classes`` and the config
        does not set them."""
        known = {"student_dim": self.cfg.model.embedding_size,
                 "teacher_dim": self.teacher.embedding_size if self.teacher else None,
                 "num_classes": self.dataset.num_classes}
        accepted = distiller_params(d.name)
        auto = {k: v for k, v in known.items() if k in accepted and k not in d.params and v is not None}
        return build_distiller(d.name, d.weight, **auto, **d.params)

    def _check_extras(self) -> torch.Tensor | None:
        """Refuse at start what the trainer cannot provide; returns the teacher's class centres
        when some distiller needs the teacher's classifier."""
        centers = None
        for d in self.distillers:
            unknown = sorted(d.requires - EXTRAS)
            if unknown:
                raise ConfigError(f"distiller '{d.name}' requires {', '.join(unknown)}, which the "
                                  f"trainer does not provide (it provides {', '.join(sorted(EXTRAS))})")
            if not d.requires & {"teacher_logits", "teacher_centers"}:
                continue
            assert self.teacher is not None
            state = self.teacher.head_state
            if not state or "weight" not in state:
                raise ConfigError(
                    f"distiller '{d.name}' needs the teacher's classifier (class centres), but the "
                    f"teacher file {self.cfg.teacher.path} has none (e.g. an arcface_torch "
                    "backbone.pth); use an ekd checkpoint trained with its margin head, or a "
                    "distiller that needs only embeddings")
            weight = state["weight"]
            if tuple(weight.shape) != (self.dataset.num_classes, self.teacher.embedding_size):
                raise ConfigError(
                    f"distiller '{d.name}': the classifier of teacher {self.cfg.teacher.path} has "
                    f"shape {tuple(weight.shape)}, expected ({self.dataset.num_classes} classes of "
                    f"the training data, {self.teacher.embedding_size}); the teacher must be "
                    "trained on the same identities")
            centers = weight.detach().float().to(self.device)
        return centers

    def distiller_extras(self, emb: torch.Tensor, teacher_emb: torch.Tensor) -> dict[str, object]:
        """The extra inputs some configured distiller requires (and only those)."""
        needed = set().union(*(d.requires for d in self.distillers))
        extras: dict[str, object] = {}
        if "student_logits" in needed:  # margin-free s * cos against the student's own centres
            extras["student_logits"] = self.head.cosine(emb) * self.head.scale
        if "teacher_logits" in needed:
            with torch.no_grad():
                cos = F.linear(F.normalize(teacher_emb.float()), F.normalize(self.teacher_centers))
                extras["teacher_logits"] = cos.clamp(-1, 1) * self.head.scale
        if "teacher_centers" in needed:
            extras["teacher_centers"] = self.teacher_centers
        if "student_head" in needed:
            extras["student_head"] = self.head
        if "random_size" in needed:
            extras["random_size"] = self.cfg.sampler.random_size
        return extras

    # -- one step -------------------------------------------------------------------------
    def compute_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """All named loss terms of one batch (margin CE + every distiller)."""
        emb = self.student(images)
        n_ce = self.cfg.sampler.random_size if self.cfg.train.ce_on == "random" else len(labels)
        terms: dict[str, torch.Tensor] = {}
        if not self.ce_replaced:
            terms["ce"] = F.cross_entropy(self.head(emb[:n_ce], labels[:n_ce]), labels[:n_ce])
        if len(self.distillers):
            assert self.teacher is not None
            with torch.no_grad():
                teacher_emb = self.teacher.model(images)
            extras = self.distiller_extras(emb, teacher_emb)
            for i, distiller in enumerate(self.distillers):
                given = {k: extras[k] for k in distiller.requires}
                for name, value in distiller(emb, teacher_emb, labels, **given).items():
                    key = name if name not in terms else f"{name}_{i}"
                    terms[key] = value
        return terms

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        terms = self.compute_terms(images, labels)
        total = sum(terms.values())
        if not torch.isfinite(total):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            raise EkdError(f"non-finite loss at epoch {self.epoch} step {self.step}: "
                           f"term(s) {', '.join(bad)} = "
                           + ", ".join(f"{k}={terms[k].item()}" for k in bad)
                           + "; lower optim.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["loss"] = float(total.detach())
        return out

    # -- epochs ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        start = time.perf_counter()
        last: dict = {}
        with open(self.run_dir / "metrics.jsonl", "a") as metrics:
            for epoch in range(self.epoch, cfg.train.epochs):
                self.epoch = epoch
                last = self._run_epoch(metrics)
                self.save_checkpoint(self.run_dir / "checkpoints" / "last.pt")
        model_path = self.save_checkpoint(self.run_dir / "model.pt", training_state=False)
        seconds = time.perf_counter() - start
        log.info("finished %d epochs in %.1f s; student saved to %s", cfg.train.epochs, seconds, model_path)
        return TrainResult(self.run_dir, model_path, seconds, last)

    def _run_epoch(self, metrics) -> dict:
        cfg = self.cfg
        self.student.train()
        self.head.train()
        self.sampler.set_epoch(self.epoch)
        sums: dict[str, float] = {}
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                   disable=not cfg.train.progress, leave=False, dynamic_ncols=True)
        for images, labels, _ in bar:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            terms = self.train_step(images, labels)
            seen += len(labels)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix({**{k: f"{v:.3g}" for k, v in terms.items()}, "lr": f"{lr:.3g}",
                             "img/s": f"{rate:.0f}"})
            if self.step % cfg.train.log_every == 0:
                metrics.write(json.dumps({"epoch": self.epoch, "step": self.step, "lr": lr,
                                          "images_per_s": rate, **terms}) + "\n")
        n = max(len(self.loader), 1)
        summary = {k: v / n for k, v in sums.items()}
        elapsed = time.perf_counter() - t0
        metrics.write(json.dumps({"epoch": self.epoch, "step": self.step, "epoch_end": True,
                                  "seconds": elapsed, "images_per_s": seen / max(elapsed, 1e-9),
                                  **summary}) + "\n")
        metrics.flush()
        log.info("epoch %d/%d  %s  (%.0f img/s)", self.epoch + 1, cfg.train.epochs,
                 "  ".join(f"{k}={v:.4f}" for k, v in summary.items()), seen / max(elapsed, 1e-9))
        if not all(math.isfinite(v) for v in summary.values()):
            raise EkdError(f"non-finite epoch mean loss at epoch {self.epoch}: {summary}")
        return summary

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, path: Path, training_state: bool = True) -> Path:
        """Model + head (+ optimiser, scheduler, distiller buffers, epoch when training)."""
        obj = {
            "format": FORMAT, "version": VERSION,
            "model_meta": {"backbone": self.cfg.model.backbone,
                           "embedding_size": self.cfg.model.embedding_size,
                           "input_size": self.cfg.data.input_size,
                           "num_classes": self.dataset.num_classes},
            "model": self.student.state_dict(),
            "head": self.head.state_dict(),
            "config": to_dict(self.cfg),
        }
        if training_state:
            obj.update({"optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "distillers": self.distillers.state_dict(),
                        "sampler": self.sampler.state_dict(),
                        "epoch": self.epoch + 1, "step": self.step})
        return save_atomic(obj, path)


def train(cfg: Config) -> TrainResult:
    """Train a student (or a teacher, without distillers) as configured."""
    return Trainer(cfg).fit()


