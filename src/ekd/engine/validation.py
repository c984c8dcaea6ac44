"""Validation during training (the ``val`` section), after arcface_torch's
``CallBackVerification``: verification sets read once at start-up, evaluated every
``val.every_steps`` steps and at every epoch end with the functions of ``ekd eval``
(:class:`ekd.eval.evaluate.VerificationSet`: flip-summed embeddings, InsightFace's 10-fold
accuracy, TPR at FPR), sharded over ranks and gathered under ``torchrun``.

Each validation writes a row ``{"val": true, "epoch", "step", "<set>/<metric>": value, ...}`` to
``metrics.jsonl`` (and TensorBoard); metrics are ``acc`` (10-fold accuracy, pair sets only),
``auc`` and ``tpr@F`` for ``F`` in ``val.fprs``. With ``val.keep_best: "<set>/<metric>"`` a
strictly better value saves ``checkpoints/best.pt`` (model + head, like ``model.pt``); the
best value and step live in the training state of ``last.pt``, so a resumed run keeps them.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from ekd.config import Config, ValSetConfig, val_sets
from ekd.data import BinDataset, ListDataset
from ekd.utils.distributed import DistInfo
from ekd.engine.preflight import val_metric_names
from ekd.engine.state import save_training_checkpoint
from ekd.errors import ConfigError, DataError
from ekd.eval.evaluate import THRESHOLD_FPRS, VerificationSet, bin_set, folder_set, fpr_key, pairs_set
from ekd.eval.metrics import max_false_positives
from ekd.eval.protocols import read_pair_list
from ekd.utils.checkpoint_io import load_file

if TYPE_CHECKING:
    from ekd.engine.state import CheckpointedTrainer, MetricsLog, TrainState

log = logging.getLogger("ekd.val")
BEST_NAME = "best.pt"


def set_kind(vs: ValSetConfig) -> str:
    """``vs.kind``, else ``bin`` for a ``.bin`` file, ``folder`` for a directory, else ``pairs``."""
    if vs.kind:
        return vs.kind
    path = Path(vs.path)
    if path.suffix.lower() == ".bin":
        return "bin"
    return "folder" if path.is_dir() else "pairs"


def _image_sizes(ds: object) -> list[tuple[str, tuple[int, int]]]:
    """``(where, (width, height))`` of every image of a set, from the image headers only."""
    if isinstance(ds, BinDataset):
        items = [(f"{ds.path} image {i}", io.BytesIO(b)) for i, b in enumerate(ds.bins)]
    elif isinstance(ds, ListDataset):
        items = [(p, p) for p in ds.paths]
    else:
        raise TypeError(f"no image list for {type(ds).__name__}")
    out = []
    for where, src in items:
        try:
            with Image.open(src) as img:
                out.append((where, img.size))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{where}: cannot read the image ({exc})") from None
    return out


def _build_set(vs: ValSetConfig, kind: str, input_size: int, cfg: Config) -> VerificationSet:
    if kind == "bin":
        return bin_set(vs.path, input_size, color=vs.color)
    if kind == "folder":
        return folder_set(vs.path, input_size, cfg.val.max_per_identity)
    return pairs_set(read_pair_list(Path(vs.path), Path(vs.root) if vs.root else None), input_size,
                     source=vs.path)


@dataclass
class ValResult:
    values: dict = field(default_factory=dict)
    seconds: float = 0.0


class Validator:
    """The ``val`` sets of a config, checked and read once: ``run(model)`` -> metric values."""

    def __init__(self, cfg: Config, dist_info: DistInfo, device: torch.device) -> None:
        val_config, size = cfg.val, cfg.data.input_size
        self.cfg, self.dist, self.device = cfg, dist_info, device
        self.every_steps, self.keep_best = val_config.every_steps, val_config.keep_best
        self.sets: dict[str, tuple[str, VerificationSet]] = {}
        for i, vs in enumerate(val_sets(val_config)):
            key, kind = f"val.sets[{i}] ({vs.name})", set_kind(vs)
            if not Path(vs.path).exists():
                raise DataError(f"{key}: not found: {vs.path}")
            if (vs.root and kind != "pairs") or (vs.color != "rgb" and kind != "bin"):
                raise ConfigError(f"{key}: 'root' is for pair lists and 'color' for .bin sets; "
                                  f"{vs.path} is a {kind} set")
            data = _build_set(vs, kind, size, cfg)
            if not data.genuine or not data.impostors:
                raise DataError(f"{key}: {vs.path} has {data.genuine} genuine and {data.impostors} "
                                "impostor pairs; verification needs both")
            odd = next(((w, s) for w, s in _image_sizes(data.dataset) if s != (size, size)), None)
            if odd and not val_config.resize:
                raise DataError(f"{key}: {odd[0]} is {odd[1][0]}x{odd[1][1]} but data.input_size is "
                                f"{size}: set val.resize=true to resize the validation images "
                                f"bilinearly, or give a set made at {size}x{size}")
            if odd:
                log.info("%s: images resized to %dx%d (e.g. %s is %dx%d)", key, size, size, odd[0], *odd[1])
            for f in val_config.fprs:
                if max_false_positives(f, data.impostors) < 1:
                    log.info("%s: %s n/a: %d impostor pairs (needs %d)", key, fpr_key(f),
                             data.impostors, math.ceil(1 / f))
            self.sets[vs.name] = (kind, data)
        self._check_keep_best()
        self._last = (-1, ValResult())
        self._best_seen: dict[str, tuple[float, int]] = {}  # metric -> (best value, step)
        # Diagnostics (ekd.engine.diagnostics): thresholds at EKD's anchor FPRs, the teacher's
        # once (it is frozen) when it is a network that can embed the sets.
        self.threshold_fprs: tuple[float, ...] = ()
        self.teacher_model: nn.Module | None = None
        self._teacher_thresholds: dict[str, float | None] | None = None

    def _check_keep_best(self) -> None:
        if not self.keep_best:
            return
        name, metric = self.keep_best.split("/", 1)
        kind, data = self.sets[name]
        if metric == "acc" and kind == "folder":
            raise ConfigError(f"val.keep_best: {self.keep_best!r}: folder sets (all pairs) have no "
                              f"10-fold accuracy; valid: {', '.join(self.metric_names())}")
        fpr = next((f for f in self.cfg.val.fprs if fpr_key(f) == metric), None)
        if fpr is not None and max_false_positives(fpr, data.impostors) < 1:
            raise ConfigError(f"val.keep_best: {self.keep_best!r} cannot be measured: {data.source} "
                              f"has {data.impostors} impostor pairs and TPR at FPR {fpr:g} needs "
                              f"{math.ceil(1 / fpr)}")

    def metric_names(self) -> list[str]:
        """Every ``<set>/<metric>`` a validation row holds."""
        metrics = val_metric_names(self.cfg.val.fprs)
        return [f"{n}/{m}" for n, (kind, _) in self.sets.items() for m in metrics
                if not (kind == "folder" and m == "acc")]

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def run(self, model: nn.Module) -> dict[str, float | None]:
        """``{"<set>/<metric>": value}`` (``None`` = too few impostor pairs for that FPR); the
        model's train/eval modes are restored. Under DDP rank 0's buffers (BatchNorm statistics)
        are broadcast first, so every rank embeds its shard with the model rank 0 saves."""
        if self.dist.enabled:
            with torch.no_grad():
                for buf in model.buffers():
                    dist.broadcast(buf, 0)
        out: dict[str, float | None] = {}
        for name, (kind, data) in self.sets.items():
            res = self._evaluate(data, model, f"of the student on {name}")
            if kind != "folder":
                out[f"{name}/acc"] = res["accuracy"]
            out[f"{name}/auc"] = res["auc"]
            for f in self.cfg.val.fprs:
                out[f"{name}/{fpr_key(f)}"] = res[fpr_key(f)]
            out.update(_thresholds(name, "thr", res, self.threshold_fprs))
        if self.threshold_fprs and self.teacher_model is not None:
            if self._teacher_thresholds is None:
                self._teacher_thresholds = {}
                for name, (_, data) in self.sets.items():
                    res = self._evaluate(data, self.teacher_model, f"of the teacher on {name}")
                    self._teacher_thresholds.update(_thresholds(name, "teacher_thr", res, self.threshold_fprs))
            out.update(self._teacher_thresholds)
        return out

    def _bar(self, label: str) -> str | bool:
        """The embedding bar's label (``train.progress`` on, first process), else no bar."""
        return f"validation {label}" if label and self.cfg.train.progress and self.dist.is_main else False

    def _evaluate(self, data: VerificationSet, model: nn.Module, label: str = "") -> dict:
        with torch.random.fork_rng(devices=[]):  # the loader's seed draw must not move training's RNG
            return data.evaluate(model, self.cfg.val.batch_size, self.device,
                                 progress=self._bar(label),
                                 threshold_fprs=self.threshold_fprs or THRESHOLD_FPRS)

    def validate(self, trainer: "CheckpointedTrainer", metrics: "MetricsLog") -> ValResult:
        """Run once per step (a second call at the same step returns the first result): metrics
        row, log line, and ``best.pt`` when the ``keep_best`` metric improved."""
        st = trainer.state
        if self._last[0] == st.step:
            return self._last[1]
        start = time.perf_counter()
        values = self.run(trainer.student)
        seconds = time.perf_counter() - start
        metrics.write({"val": True, "epoch": st.epoch, "step": st.step, **values, "seconds": seconds})
        improved = self._update_best(values, st)
        if improved:
            save_training_checkpoint(trainer, trainer.run_dir / "checkpoints" / BEST_NAME,
                                     training_state=False, extra={"best": {
                                         "metric": st.best_metric, "value": st.best_value,
                                         "step": st.best_step, "epoch": st.epoch}})
        if trainer.dist.is_main:
            best = (f"; best {st.best_metric}={st.best_value:.4f} at step {st.best_step}"
                    f"{' (saved best.pt)' if improved else ''}" if st.best_value is not None else "")
            shown = {k: v for k, v in values.items() if "thr@" not in k}  # thresholds: metrics.jsonl only
            log.info("validation at step %d: %s (%.1f s)%s", st.step, format_values(shown), seconds, best)
        self._remember(values, st.step)
        self._last = (st.step, ValResult(values, seconds))
        return self._last[1]

    def _remember(self, values: dict, step: int) -> None:
        for key, value in values.items():
            if value is not None and math.isfinite(value) and "thr@" not in key and (
                    key not in self._best_seen or value > self._best_seen[key][0]):
                self._best_seen[key] = (float(value), step)

    def summary(self, st: "TrainState") -> str | None:
        """The end-of-run line: the ``keep_best`` metric's best value (kept across resumes), or
        the best value of each metric of the first set over this run's validations."""
        if self.keep_best and st.best_value is not None:
            return (f"best validation {st.best_metric} = {st.best_value:.4f} at step "
                    f"{st.best_step} (checkpoints/{BEST_NAME})")
        first = next(iter(self.sets), None)
        best = {k: v for k, v in self._best_seen.items() if k.startswith(f"{first}/")}
        if not best:
            return None
        return "best validation: " + ", ".join(f"{k} {v:.4f} (step {s})"
                                               for k, (v, s) in best.items())

    def _update_best(self, values: dict, st: "TrainState") -> bool:
        if not self.keep_best:
            return False
        if st.best_metric != self.keep_best:  # a fresh run, or keep_best changed on resume
            st.best_metric, st.best_value, st.best_step = self.keep_best, None, None
        value = values.get(self.keep_best)
        if value is None or not math.isfinite(value):
            return False
        if st.best_value is not None and value <= st.best_value:
            return False
        st.best_value, st.best_step = float(value), st.step
        return True

    def restore_best(self, st: "TrainState", run_dir: Path) -> None:
        """After resuming: a ``best.pt`` written after ``last.pt`` (a kill in between) holds a
        higher best value than the training state; keep that one."""
        path = run_dir / "checkpoints" / BEST_NAME
        if not self.keep_best or not path.is_file():
            return
        best = load_file(path).get("best") or {}
        if best.get("metric") == self.keep_best and best.get("value") is not None and (
                st.best_metric != self.keep_best or st.best_value is None or best["value"] > st.best_value):
            st.best_metric, st.best_value, st.best_step = self.keep_best, float(best["value"]), best["step"]


def _thresholds(name: str, label: str, res: dict, fprs: tuple[float, ...]) -> dict[str, float | None]:
    """``<set>/<label>@F`` for F in ``fprs`` (``None`` where F cannot be measured; +inf, when
    only rejecting everything meets F, is reported as ``None`` too)."""
    out: dict[str, float | None] = {}
    for f in fprs:
        key = f"{f:.0e}".replace("e-0", "e-")
        v = res["thresholds"].get(key)
        out[f"{name}/{label}@{key}"] = None if v is None or not math.isfinite(v) else float(v)
    return out


def format_values(values: dict) -> str:
    return "  ".join(f"{k}={'n/a' if v is None else f'{v:.4f}'}" for k, v in values.items())


def build_validator(cfg: Config, dist_info: DistInfo, device: torch.device) -> Validator | None:
    """A :class:`Validator` when ``val.sets`` lists sets, else ``None``."""
    return Validator(cfg, dist_info, device) if cfg.val.sets else None
