"""Training state: what a checkpoint holds so that a resumed run continues exactly.

``checkpoints/last.pt`` holds the student, head, optimiser, scheduler, grad scaler, distiller
buffers, the epoch, the batch within the epoch (after Ctrl-C), the step, the skipped-step
count, every RNG state and the best validation value so far (``val.keep_best``). Writes are
atomic (see :mod:`ekd.utils.checkpoint_io`); only rank 0 writes under DDP. ``model.pt`` holds the
model and head only.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ekd.config import to_dict
from ekd.utils import distributed
from ekd.errors import CheckpointError
from ekd.utils.checkpoint_io import FORMAT, VERSION, load_file, load_state_strict, save_atomic



class CheckpointedTrainer(Protocol):
    """What a checkpoint reads from and restores into (:class:`ekd.engine.trainer.Trainer`; a
    protocol here, so this module does not import the trainer that imports it)."""

    cfg: Any
    dist: distributed.DistInfo
    device: torch.device
    dataset: Any
    student: torch.nn.Module
    head: Any
    partial_fc: bool
    distillers: torch.nn.ModuleList
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    state: "TrainState"
    run_dir: Path


@dataclass
class TrainState:
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    # val.keep_best: the metric, its best value so far and the step of checkpoints/best.pt
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    # distill weight "auto": the weight each such distiller was given (its index as a string)
    auto_weights: dict = field(default_factory=dict)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only); every row also goes
    to ``scalars`` (TensorBoard, :mod:`ekd.engine.tensorboard_log`) when given."""

    def __init__(self, path: Path, enabled: bool = True, scalars: Any = None) -> None:
        self.path, self.enabled, self._fh = path, enabled, None
        self.scalars = scalars if enabled else None

    def __enter__(self) -> "MetricsLog":
        if self.enabled:
            self._fh = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        if self._fh:
            self._fh.close()
        if self.scalars is not None:
            self.scalars.close()

    def write(self, row: dict) -> None:
        if self._fh:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
        if self.scalars is not None:
            self.scalars.write_row(row)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(trainer: "CheckpointedTrainer", path: Path, training_state: bool = True,
                             extra: dict | None = None) -> Path:
    """Write model + head (+ the full training state, + ``extra`` entries) atomically; rank 0
    only under DDP."""
    head_state = _full_head_state(trainer)  # a collective under DDP: every rank takes part
    distiller_state = _full_distiller_state(trainer) if training_state else None  # collective too
    if trainer.dist.is_main:
        cfg = trainer.cfg
        obj = {
            "format": FORMAT, "version": VERSION,
            "model_meta": {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size,
                           "width": cfg.model.width,
                           "input_size": cfg.data.input_size, "num_classes": trainer.dataset.num_classes},
            "model": trainer.student.state_dict(),
            "head": head_state,
            "config": to_dict(cfg),
        }
        if training_state:
            obj.update({"optimizer": trainer.optimizer.state_dict(),
                        "scheduler": trainer.scheduler.state_dict(),
                        "scaler": trainer.scaler.state_dict(),
                        "distillers": distiller_state,
                        "state": asdict(trainer.state),
                        "world_size": trainer.dist.world_size,
                        "rng": rng_state(),
                        # kept at the top level for readers of older checkpoints
                        "epoch": trainer.state.epoch, "step": trainer.state.step})
        obj.update(extra or {})
        save_atomic(obj, path)
    distributed.barrier(trainer.dist)
    return path


def load_training_state(trainer: "CheckpointedTrainer", path: str | Path) -> None:
    """Restore everything :func:`save_training_checkpoint` wrote; errors name the file."""
    obj = load_file(path)
    needed = {"model", "head", "optimizer", "scheduler", "distillers", "state", "rng"}
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not needed <= set(obj):
        missing = sorted(needed - set(obj)) if isinstance(obj, dict) else sorted(needed)
        raise CheckpointError(f"{path}: not a resumable ekd training checkpoint (missing "
                              f"{', '.join(missing)})")
    load_state_strict(trainer.student, obj["model"], str(path), "student")
    _load_head(trainer, obj["head"], str(path))
    load_state_strict(trainer.distillers, obj["distillers"], str(path), "distillers")
    try:
        trainer.optimizer.load_state_dict(obj["optimizer"])
        trainer.scheduler.load_state_dict(obj["scheduler"])
        if "scaler" in obj:
            trainer.scaler.load_state_dict(obj["scaler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimiser/scheduler state does not match this config: {exc}") from None
    _reshard_head_momentum(trainer)
    trainer.state = TrainState(**obj["state"])
    trainer.state.bad_in_a_row = 0
    if obj.get("world_size", 1) == trainer.dist.world_size:
        set_rng_state(obj["rng"])  # another world size: new per-rank streams, same schedule
    else:
        trainer.state.batch_in_epoch = 0


def _full_head_state(trainer: "CheckpointedTrainer") -> dict:
    """The margin head as ``{"weight": [C, d]}`` whatever the sharding (Partial FC gathered)."""
    if trainer.partial_fc:
        return {"weight": trainer.head.full_weight().detach().cpu()}
    return trainer.head.state_dict()


def _full_distiller_state(trainer: "CheckpointedTrainer") -> dict:
    """The distillers' state with sharded class centres gathered to the full ``[C, d]``, so a
    checkpoint resumes under any world size (a collective under sharding)."""
    state = trainer.distillers.state_dict()
    for i, d in enumerate(trainer.distillers):
        centres = d.full_centres()  # None: the distiller holds no class centres
        if centres is not None:
            state[f"{i}.centres"] = centres.cpu()
    return state


def _load_head(trainer: "CheckpointedTrainer", state: dict, source: str) -> None:
    weight = state.get("weight") if isinstance(state, dict) else None
    expected = (trainer.dataset.num_classes, trainer.cfg.model.embedding_size)
    if weight is None or tuple(weight.shape) != expected:
        raise CheckpointError(f"{source}: head weight {None if weight is None else tuple(weight.shape)} "
                              f"does not match {expected} (classes, embedding size)")
    if trainer.partial_fc:
        trainer.head.load_full_weight(weight.to(trainer.device))
    else:
        load_state_strict(trainer.head, state, source, "head")


def _reshard_head_momentum(trainer: "CheckpointedTrainer") -> None:
    """After resuming with another world size, cut the head's optimiser buffers (saved for the
    full ``[C, d]`` centres, or another shard) to this rank's Partial FC shard."""
    weight = trainer.head.weight
    state = trainer.optimizer.state.get(weight, {})
    for key, buf in list(state.items()):
        if not isinstance(buf, torch.Tensor) or buf.shape == weight.shape:
            continue
        if trainer.partial_fc and buf.shape == (trainer.head.num_classes, weight.shape[1]):
            state[key] = buf[trainer.head.shard_start:trainer.head.shard_end].clone()
        else:  # a shard of another layout: restart that buffer
            del state[key]
