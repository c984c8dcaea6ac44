"""Training loop for CPU, one GPU or ``torchrun`` (DDP): margin softmax + distillers.

Per step (EKD, Sec. 4.1): the student embeds the batch; the margin cross-entropy sees the
random part of the batch (``train.ce_on: random``, the authors' split) or all of it; the
distillers see the *global* batch (student embeddings all-gathered differentiably, see
:mod:`ekd.utils.distributed`) with the frozen teacher's embeddings, plus the extras they
``requires``. Methods that train the student on another classifier (``replaces_ce``) drop the
margin cross-entropy. The total loss is the sum of all named terms, each logged separately.
Under Partial FC the classifier-based distillers get this rank's class shard (same range as the
head's) and complete their softmax across ranks; ``optim.clip_grad_norm`` clips the gradient
norm over all trained parameters after unscaling.

Images are mirrored here (per sample, p=0.5, torch RNG seeded per rank) rather than in the
dataset, so the mirror flags are known: an embedding cache returns the matching teacher
embedding. Batches come from a DataLoader or, with ``data.preload``, from the whole set held
on the device (:mod:`ekd.data.resident`); ``data_wait`` in ``metrics.jsonl`` is the share of
the step time spent waiting for them (rank 0).

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt`` (written
atomically every epoch and on Ctrl-C, with everything needed to resume exactly) and ``model.pt``;
with a ``val`` section also validation rows and ``checkpoints/best.pt``
(:mod:`ekd.engine.validation`), with TensorBoard ``tensorboard/`` (:mod:`ekd.engine.tensorboard_log`).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ekd.config import Config, TrainConfig, save_config
from ekd.data.sampler import BalancedBatchSampler
from ekd.data.transforms import mirror_batch
from ekd.distill import CLASS_EXTRAS, supports_class_shard
from ekd.utils import distributed
from ekd.engine.build import build_train_loader, build_train_set, compiled_forward
from ekd.engine.auto_weight import AutoWeights
from ekd.engine.diagnostics import anchor_fprs, distiller_diagnostics, set_recording, term_gradient_norms
from ekd.engine.distill_inputs import build_distillers, check_sharding, distiller_extras, teacher_centers_for
from ekd.engine.guard import (DivergenceGuard, GuardVerdict, TrainingStopped, batch_pair_auc, decide, kept_checkpoint,
                              prepare_checkpoint)
from ekd.engine.optim import build_optimizer, build_scheduler, clip_grad_norm
from ekd.engine.preflight import check_against_registries
from ekd.engine.run_folder import claim_run_folder, continue_metrics
from ekd.engine.state import MetricsLog, TrainState, load_training_state, save_training_checkpoint
from ekd.engine.tensorboard_log import open_tensorboard
from ekd.engine.validation import build_validator, format_values
from ekd.errors import ConfigError, EkdError
from ekd.heads import build_training_head
from ekd.heads.partial_fc import gather_global_batch
from ekd.models import build_backbone
from ekd.teachers import build_teacher
from ekd.utils.device import resolve_device, seed_everything

log = logging.getLogger("ekd.train")
#: Seconds between progress lines in the log when the progress bar is off.
HEARTBEAT_S = 30.0


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    seconds: float
    final_terms: dict
    interrupted: bool = False
    checkpoint_path: Path | None = None  # checkpoints/last.pt: resumable


class Trainer:
    """Builds every component from a :class:`Config` and runs the epochs."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        check_against_registries(cfg)  # backbones, distillers, FPRs: before any heavy work
        resume = self._join_processes(cfg.train)
        self._build_data(cfg)
        self._build_teacher(cfg)  # and the validation sets: both checked before any image is read
        self._build_batches(cfg)
        self._build_student(cfg)
        self._build_head(cfg)
        self._build_distillers(cfg)
        self._build_optimiser(cfg)
        if resume:
            self._resume(resume)

    # -- building, in order (each builder reads what the ones before it made) ---------------
    def _join_processes(self, train: TrainConfig) -> Path | None:
        """Device, process group (under ``torchrun``), the seed of the initial weights and the run
        folder, claimed before any heavy work; returns the checkpoint to resume from, if any."""
        device = resolve_device(train.device)
        self._owns_group = distributed.env_info().enabled and not distributed.is_initialized()  # close() leaves it
        self.dist = distributed.init_distributed(device.type)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        seed_everything(train.seed)  # identical initial weights on every rank
        self.run_dir = Path(train.output_dir)
        # the folder holds no other run (or continues/overwrites it)
        resume = claim_run_folder(self.run_dir, train.resume, train.overwrite, clear=self.dist.is_main)
        distributed.barrier(self.dist)
        return resume

    def _build_data(self, cfg: Config) -> None:
        """The training set (listed and checked, no image decoded yet)."""
        self.dataset = build_train_set(cfg)
        self._log_dropped_data("training on the readable part")

    def _build_teacher(self, cfg: Config) -> None:
        """The teacher (file, kind, cache match) and the validation sets, before any image is read
        (``data.preload`` reads them all); the teacher's initialisation draws no numbers from the
        stream the student's initial weights come from."""
        with torch.random.fork_rng(devices=[]):
            self.teacher = build_teacher(cfg.teacher, cfg.data.input_size, self.dataset, self.device,
                                         progress=cfg.train.progress and self.dist.is_main)
        self.validator = build_validator(cfg, self.dist, self.device)  # every val set checked and read now

    def _build_batches(self, cfg: Config) -> None:
        """The batch sampler (EKD, Sec. 3.3: random part + P identities x K) and the batches."""
        train, sampler = cfg.train, cfg.sampler
        self.sampler = BalancedBatchSampler(self.dataset.labels, sampler.random_size,
                                            sampler.identities_per_batch, sampler.samples_per_identity,
                                            seed=train.seed, rank=self.dist.rank,
                                            world_size=self.dist.world_size)
        if train.max_steps_per_epoch:
            self.sampler.batches_per_epoch = min(self.sampler.batches_per_epoch, train.max_steps_per_epoch)
        self.loader = build_train_loader(cfg, self.dataset, self.sampler, self.device, self.dist.rank,
                                         progress=train.progress and self.dist.is_main)

    def _build_student(self, cfg: Config) -> None:
        """The student backbone, its DDP wrapper and training forward, and the mixed precision."""
        train, model, device = cfg.train, cfg.model, self.device
        self.use_amp = train.amp != "none" and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if train.amp == "bf16" else torch.float16
        student = build_backbone(model.backbone, embedding_size=model.embedding_size,
                                 input_size=cfg.data.input_size, dropout=model.dropout,
                                 width=model.width).to(device)
        self.channels_last = train.channels_last
        if self.channels_last:
            student = student.to(memory_format=torch.channels_last)
        self.student = student
        self.student_ddp: nn.Module = (DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
                                       if self.dist.enabled else student)
        # the training forward: compiled (train.compile) or the (DDP-wrapped) module itself
        self.student_forward = compiled_forward(self.student_ddp, device) if train.compile else self.student_ddp

    def _build_head(self, cfg: Config) -> None:
        """The margin head: Partial FC when sampling or with several processes (same interface)."""
        head = cfg.head
        self.head = build_training_head(head.kind, cfg.model.embedding_size, self.dataset.num_classes,
                                        head.scale, head.margin, head.sample_rate, self.dist.rank,
                                        self.dist.world_size, self.dist.enabled, cfg.train.seed).to(self.device)
        self.partial_fc = self.head.sharded
        # Under sharding the classifier-based distillers hold/see this rank's class range only.
        self.class_shard = self.head.shard

    def _build_distillers(self, cfg: Config) -> None:
        """The distillers, the teacher's class centres they need, their ``weight: auto``
        calibration and the validation thresholds of their anchors (diagnostics)."""
        train = cfg.train
        t_dim = self.teacher.embedding_size if self.teacher else None
        self.distillers = build_distillers(cfg, t_dim, self.dataset.num_classes, self.class_shard).to(self.device)
        centers = teacher_centers_for(self.distillers, self.teacher.head_state if self.teacher else None,
                                      cfg.teacher.path, self.dataset.num_classes, t_dim)
        if self.class_shard is not None:
            check_sharding(self.distillers)
            if centers is not None and all(supports_class_shard(d) for d in self.distillers
                                           if d.requires & CLASS_EXTRAS):
                centers = self.class_shard.rows(centers).clone()  # this rank's rows only
                self.teacher.head_state = None  # type: ignore[union-attr]  # frees the full matrix
        self.teacher_centers = centers.to(self.device) if centers is not None else None
        self.ce_replaced = any(d.replaces_ce for d in self.distillers)
        self.auto_weights = AutoWeights(cfg.distill, self.distillers, train.auto_weight_steps, not self.ce_replaced)
        self._term_owner: dict[str, int] = {}  # loss term name -> index of the distiller that made it
        self._auto_weight_events: list[dict] = []  # weights fixed this step, for the log
        if self.validator is not None and train.diagnostics:
            self.validator.threshold_fprs = anchor_fprs(self.distillers)
            self.validator.teacher_model = getattr(self.teacher, "model", None)
        self.diagnostics: dict[str, float] = {}  # the last logged step's (ekd.engine.diagnostics)
        self._embedding: torch.Tensor | None = None  # the current step's, set by compute_terms
        self._batch_auc: float | None = None  # the logged step's training-batch pair AUC (guard)

    def _build_optimiser(self, cfg: Config) -> None:
        """SGD over student, head and distillers, the schedule, the loss scaler, the per-rank
        random streams, the training state and the divergence guard."""
        train, optim = cfg.train, cfg.optim
        steps_per_epoch = len(self.sampler)
        self.total_steps = steps_per_epoch * train.epochs
        self.optimizer = build_optimizer([self.student, self.head, self.distillers], optim.lr, optim.momentum,
                                         optim.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         int(round(optim.warmup_epochs * steps_per_epoch)), optim.scheduler,
                                         [int(m * steps_per_epoch) for m in optim.milestones], optim.gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and train.amp == "fp16")
        seed_everything(train.seed + self.dist.rank)  # per-rank streams (dropout)
        self.state = TrainState()
        self._stop_requested = False
        self.guard = DivergenceGuard(train.guard, int(round(train.guard.warmup_epochs * steps_per_epoch)))

    def _resume(self, checkpoint: Path) -> None:
        """Continue a run from ``checkpoint``: weights, optimiser, schedule, state, random
        streams, fixed auto weights, the metrics log and the best validation."""
        epochs = self.cfg.train.epochs
        load_training_state(self, checkpoint)
        self.auto_weights.restore(self.state.auto_weights)
        if self.dist.is_main:  # metrics.jsonl continues from the checkpoint's step
            continue_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        if self.validator is not None:
            self.validator.restore_best(self.state, self.run_dir)
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d/%d, step %d", checkpoint,
                     min(self.state.epoch + 1, epochs), epochs, self.state.step)

    def _log_dropped_data(self, when: str) -> None:
        """``data.accept_truncated``: say (at the start and the end) what the run did not see."""
        dropped = getattr(self.dataset, "truncated", None)
        if dropped and self.dist.is_main:
            log.warning("%s of %s (data.accept_truncated): %d of %d images and %d identities dropped",
                        when, self.cfg.data.root, dropped[0], dropped[2], dropped[1])

    # -- one step -------------------------------------------------------------------------
    def _mirror(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mirror each sample with p=0.5; the stream depends only on (seed, rank, epoch, batch),
        so a resumed run (any point, any world size) draws the same flips."""
        st = self.state
        return mirror_batch(images, (self.cfg.train.seed * 1_000_003 + self.dist.rank) * 1_000_003
                            + st.epoch * 100_003 + st.batch_in_epoch)

    def mirror(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, flipped)`` as :meth:`fit` feeds the current step (epoch and batch of
        :attr:`state`) to :meth:`train_step`: for code that drives the steps itself (benchmarks)."""
        return self._mirror(images)

    @property
    def step_embedding(self) -> torch.Tensor | None:
        """The student embedding of the batch :meth:`compute_terms` last saw (float32, with its
        graph); None once :meth:`train_step` has used it."""
        return self._embedding

    def compute_terms(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                      flipped: torch.Tensor) -> dict[str, torch.Tensor]:
        """All named loss terms of one batch (margin CE + every distiller on the global batch)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            emb = self.student_forward(images)
        emb = self._embedding = emb.float()
        n_ce = self.cfg.sampler.random_size if self.cfg.train.ce_on == "random" else len(labels)
        terms: dict[str, torch.Tensor] = {}
        if not self.ce_replaced:  # global mean over the gathered CE part of every rank's batch
            terms["ce"] = self.head.loss(*gather_global_batch(emb[:n_ce], labels[:n_ce]))
        if len(self.distillers):
            assert self.teacher is not None
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                teacher_emb = self.teacher.embed(images, indices, flipped)
            teacher_emb = distributed.gather_no_grad(teacher_emb.float(), self.dist)
            all_emb, all_labels = gather_global_batch(emb, labels)
            extras = distiller_extras(self.distillers, all_emb, teacher_emb, self.head,
                                      self.teacher_centers, self.cfg.sampler.random_size,
                                      self.class_shard)
            for i, (distiller, given) in enumerate(zip(self.distillers, extras)):
                for name, value in distiller(all_emb, teacher_emb, all_labels, **given).items():
                    key = name if name not in terms else f"{name}_{i}"
                    terms[key] = value
                    self._term_owner[key] = i
        return terms

    def _sync_small_grads(self) -> None:
        """Average distiller gradients over ranks (DDP does the student's; each rank's Partial FC
        shard gradient is already exact and must not be averaged)."""
        distributed.average_replicated_grads(self.distillers, self.dist)

    def _clip_grads(self) -> None:
        """``optim.clip_grad_norm``: clip the norm over all trained parameters (Partial FC's
        shards summed over ranks, so the norm is the single-process one)."""
        max_norm = self.cfg.optim.clip_grad_norm
        if max_norm is None:
            return
        shards = list(self.head.parameters()) if self.head.sharded else []
        ids = {id(p) for p in shards}
        others = [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in ids]
        clip_grad_norm(others, shards, float(max_norm), distributed=bool(shards) and self.dist.enabled)

    def _grads_finite(self) -> bool:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return True
        norms = torch.stack([p.grad.detach().float().norm() for p in params])
        return bool(torch.isfinite(norms).all())

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                   flipped: torch.Tensor) -> dict[str, float] | None:
        """One optimisation step; returns the terms, or None when the step was skipped. On the
        steps that will be logged, :attr:`diagnostics` gets each term's gradient share and what
        the distillers recorded."""
        diagnose = self.cfg.train.diagnostics and (self.state.step + 1) % self.cfg.train.log_every == 0
        set_recording(self.distillers, diagnose)
        terms = self.compute_terms(images, labels, indices, flipped)
        set_recording(self.distillers, False)
        embedding, self._embedding = self._embedding, None  # not kept (with its graph) past the step
        guard = self.cfg.train.guard
        if embedding is not None and guard.enabled and guard.batch_windows is not None \
                and guard.chance_within is not None \
                and (self.state.step + 1) % self.cfg.train.log_every == 0:  # the batch chance rule
            self._batch_auc = batch_pair_auc(distributed.gather_no_grad(embedding.detach(), self.dist),
                                             distributed.gather_no_grad(labels, self.dist))  # global batch
        held = self.auto_weights.held_back(self._term_owner) if self.auto_weights.calibrating else set()
        total = sum(v for k, v in terms.items() if k not in held)  # weight "auto": measured, not applied yet
        self.optimizer.zero_grad(set_to_none=True)
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        if bad:
            self._skip_step(bad, terms)
            return None
        if diagnose and embedding is not None:
            self.diagnostics = {**term_gradient_norms(terms, embedding, self.dist),
                                **distiller_diagnostics(self.distillers)}
        if held and embedding is not None:
            for event in self.auto_weights.observe(terms, self._term_owner, embedding, self.dist, self.state.step):
                self.state.auto_weights[str(event["index"])] = event["weight"]
                self._auto_weight_events.append(event)
        self.scaler.scale(total).backward()
        self._sync_small_grads()
        self.scaler.unscale_(self.optimizer)
        self._clip_grads()
        if not self._grads_finite():
            if self.scaler.is_enabled():  # fp16 overflow: the scaler skips and lowers its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.state.skipped += 1
                return None
            self._skip_step(["gradients"], terms)
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state.step += 1
        self.state.bad_in_a_row = 0
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["loss"] = float(total.detach())
        return out

    def _skip_step(self, bad: list[str], terms: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped += 1
        self.state.bad_in_a_row += 1
        values = ", ".join(f"{k}={float(terms[k].detach())}" for k in bad if k in terms)
        where = f"epoch {self.state.epoch + 1} step {self.state.step}"
        log.warning("non-finite %s at %s (%s): step skipped (%d in a row)", ", ".join(bad), where,
                    values or "loss finite", self.state.bad_in_a_row)
        if self.state.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingStopped(
                GuardVerdict("non-finite", ", ".join(bad), math.nan, self.state.step, "non-finite"),
                f"{self.state.bad_in_a_row} non-finite steps in a row at {where}: "
                f"{', '.join(bad)} {values}; lower optim.lr, check the data, or use "
                "train.amp=bf16 instead of fp16")

    # -- epochs ---------------------------------------------------------------------------
    def _on_sigint(self, signum, frame) -> None:  # noqa: ARG002
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        log.warning("interrupt: finishing the current step, then saving a resumable checkpoint "
                    "(press Ctrl-C again to abort at once)")

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the DDP wrapper and leave the process group this trainer joined. The wrapper
        holds the group: a group still alive when the interpreter exits takes its Gloo threads
        down with the process ("terminate called without an active exception")."""
        self.student_ddp = self.student_forward = self.student
        if self._owns_group:
            self._owns_group = False
            distributed.shutdown()

    def fit(self) -> TrainResult:
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            log.info("training %s for %d epoch%s of %d steps on %s; run folder %s",
                     cfg.model.backbone, cfg.train.epochs, "" if cfg.train.epochs == 1 else "s",
                     len(self.loader), self.device, self.run_dir)
        start = time.perf_counter()
        last: dict = {}
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            scalars = open_tensorboard(cfg.train.tensorboard, self.run_dir / "tensorboard", main,
                                       purge_step=self.state.step + 1 if self.state.step else None)
            with MetricsLog(self.run_dir / "metrics.jsonl", enabled=main, scalars=scalars) as metrics:
                try:
                    while self.state.epoch < cfg.train.epochs and not self._stop_requested:
                        last = self._run_epoch(metrics)
                        if not self._stop_requested:
                            self.state.epoch += 1
                            self.state.batch_in_epoch = 0
                        checkpoint = self.run_dir / "checkpoints" / "last.pt"
                        prepare_checkpoint(checkpoint, self.guard.suspect, main)
                        save_training_checkpoint(self, checkpoint)
                except TrainingStopped as stop:
                    raise self._stopped(stop, metrics) from None
        finally:
            signal.signal(signal.SIGINT, previous)
        model_path = self.run_dir / "model.pt"
        if not self._stop_requested:
            save_training_checkpoint(self, model_path, training_state=False)
        seconds = time.perf_counter() - start
        self._log_dropped_data("trained on the readable part")
        if self._stop_requested:
            log.warning("stopped at epoch %d step %d; resume with --set train.resume=auto",
                        self.state.epoch + 1, self.state.step)
        else:
            log.info("finished %d epoch%s in %.1f s; model saved to %s", cfg.train.epochs,
                     "" if cfg.train.epochs == 1 else "s", seconds, model_path)
        if self.validator is not None and self.dist.is_main:
            summary = self.validator.summary(self.state)
            if summary:
                log.info("%s", summary)
        return TrainResult(self.run_dir, model_path, seconds, last, self._stop_requested,
                           self.run_dir / "checkpoints" / "last.pt")

    def _stopped(self, stop: TrainingStopped, metrics: MetricsLog) -> TrainingStopped:
        """Record why training stopped (``metrics.jsonl`` row, log) and name the last good
        checkpoint; the returned error is what ``ekd train`` prints."""
        v, st = stop.verdict, self.state
        kept = kept_checkpoint(self.run_dir / "checkpoints" / "last.pt")
        metrics.write({"epoch": st.epoch, "step": st.step, "stopped": v.rule, "metric": v.metric,
                       "value": v.value, "reason": str(stop), "checkpoint": str(kept) if kept else None})
        where = (f"; the last good checkpoint is {kept}: resume from it with --set train.resume={kept} "
                 "(after changing what made it diverge, e.g. a lower optim.lr)" if kept
                 else "; no checkpoint was written before it")
        return TrainingStopped(v, f"{stop}{where}")

    def _check_guard(self, verdict: GuardVerdict | None) -> None:
        if self.cfg.train.guard.enabled:
            decide(verdict, self.dist, self.device, self.state.step)

    def _log_auto_weights(self, metrics: MetricsLog) -> None:
        """Log and record (``metrics.jsonl`` row ``auto_weight``) each weight fixed this step."""
        for event in self._auto_weight_events:
            self.guard.loss_redefined(self.state.step)  # the logged loss now holds the term
            metrics.write({"epoch": self.state.epoch, "step": self.state.step, "auto_weight": event})
            if self.dist.is_main:
                log.info("distill[%d] %s: weight auto -> %.4g (gradient share %.4g at weight 1, median "
                         "of %d steps; target %.3g)", event["index"], event["name"], event["weight"],
                         event["share_at_weight_1"], event["steps"], event["target_share"])
        self._auto_weight_events.clear()

    def _run_epoch(self, metrics: MetricsLog) -> dict:
        cfg, st = self.cfg, self.state
        self.student.train()
        self.head.train()
        self.sampler.set_epoch(st.epoch)
        self.sampler.start_batch = st.batch_in_epoch
        sums: dict[str, float] = {}
        steps, seen, t0 = 0, 0, time.perf_counter()
        # Time waiting for batches and in whole steps (since the last row, over the epoch).
        waited = spent = epoch_waited = epoch_spent = 0.0
        tick = t0
        bar = tqdm(self.loader, desc=f"epoch {st.epoch + 1}/{cfg.train.epochs}", leave=False,
                   disable=not (cfg.train.progress and self.dist.is_main), dynamic_ncols=True)
        # Without a bar (train.progress off), a log line every HEARTBEAT_S seconds.
        heartbeat = t0 if self.dist.is_main and not cfg.train.progress else None
        for images, labels, indices in bar:
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            got = time.perf_counter()
            waited, epoch_waited = waited + got - tick, epoch_waited + got - tick
            images, flipped = self._mirror(images)
            terms = self.train_step(images, labels, indices, flipped)
            self._log_auto_weights(metrics)
            st.batch_in_epoch += 1
            seen += len(labels) * self.dist.world_size
            now = time.perf_counter()
            spent, epoch_spent = spent + now - tick, epoch_spent + now - tick
            rate = seen / max(now - t0, 1e-9)
            if terms is not None:
                steps += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix({**{k: f"{v:.3g}" for k, v in terms.items()}, "lr": f"{lr:.3g}",
                                 "img/s": f"{rate:.0f}"})
                if st.step % cfg.train.log_every == 0:
                    batch = {}
                    if self._batch_auc is not None:  # the global batch's, the same on every rank
                        batch["batch_auc"] = self._batch_auc if math.isfinite(self._batch_auc) else None
                    self._batch_auc = None
                    metrics.write({"epoch": st.epoch, "step": st.step, "lr": lr, "images_per_s": rate,
                                   "data_wait": waited / max(spent, 1e-9), **terms, **batch, **self.diagnostics})
                    waited = spent = 0.0
                    self.diagnostics = {}
                    loss = distributed.all_reduce_mean(terms["loss"], self.dist, self.device) \
                        if cfg.train.guard.enabled else terms["loss"]
                    self._check_guard(self.guard.observe_loss(st.step, loss))
                    if batch.get("batch_auc") is not None:
                        self._check_guard(self.guard.observe_batch(st.step, batch["batch_auc"]))
                if self.validator is not None and self.validator.due(st.step):
                    checked = self.validator.validate(self, metrics)
                    t0 += checked.seconds  # not training time (img/s)
                    self._check_guard(self.guard.observe_validation(st.step, checked.values))
                if heartbeat is not None and now - heartbeat >= HEARTBEAT_S:
                    heartbeat = now
                    log.info("epoch %d/%d: batch %d of %d, loss %.4f (%.0f img/s)", st.epoch + 1,
                             cfg.train.epochs, st.batch_in_epoch, len(self.loader),
                             terms.get("loss", float("nan")), rate)
            tick = time.perf_counter()  # logging and validation are left out of both times
            if self._stop_requested:
                break
        summary = {k: distributed.all_reduce_mean(v / max(steps, 1), self.dist, self.device) for k, v in sums.items()}
        elapsed = time.perf_counter() - t0
        data_wait = epoch_waited / max(epoch_spent, 1e-9)
        val = (self.validator.validate(self, metrics).values
               if self.validator is not None and not self._stop_requested else {})
        if val:
            self._check_guard(self.guard.observe_validation(st.step, val))
        metrics.write({"epoch": st.epoch, "step": st.step, "epoch_end": not self._stop_requested,
                       "seconds": elapsed, "images_per_s": seen / max(elapsed, 1e-9),
                       "data_wait": data_wait, "skipped_steps": st.skipped, **summary})
        if self.dist.is_main:
            log.info("epoch %d/%d  %s  (%.0f img/s, data_wait=%.3f)%s", st.epoch + 1, cfg.train.epochs,
                     "  ".join(f"{k}={v:.4f}" for k, v in summary.items()), seen / max(elapsed, 1e-9),
                     data_wait, f"  val: {format_values(val)}" if val else "")
        if not all(math.isfinite(v) for v in summary.values()):
            bad = ", ".join(k for k, v in summary.items() if not math.isfinite(v))
            raise TrainingStopped(GuardVerdict("non-finite", bad, math.nan, st.step, "non-finite"),
                                  f"non-finite epoch mean loss at epoch {st.epoch + 1} step "
                                  f"{st.step}: {summary}")
        return summary


def train(cfg: Config) -> TrainResult:
    """Train a student (or a teacher, without distillers) as configured; under ``torchrun`` the
    process group is left when training ends."""
    with Trainer(cfg) as trainer:
        return trainer.fit()
