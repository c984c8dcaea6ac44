"""Checks of a loaded :class:`~ekd.config.schema.Config` that need nothing but the config itself:
choices, signs and ranges, finite numbers, the batch against the synthetic set it describes, the
shape of the ``val`` section. Each error names the key and what would be valid.

Checks against the registries (backbones, distillers, evaluation FPRs) live with them, in
:mod:`ekd.engine.preflight`, and run before any heavy work.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ekd.config.convert import from_dict
from ekd.config.schema import Config, GuardConfig, ValConfig, ValSetConfig
from ekd.errors import ConfigError

_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")

#: The values a key may take (``data.kind``: :data:`ekd.data.kinds.DATASET_KINDS`; ``head.kind``:
#: :data:`ekd.heads.HEADS`; both equalities are tested).
_CHOICES = {
    "data.kind": ("folder", "rec", "synthetic"),  # = ekd.data.kinds.DATASET_KINDS (tested)
    "data.on_corrupt": ("skip", "error"),
    "head.kind": ("arcface", "cosface"),
    "teacher.kind": ("none", "checkpoint", "onnx", "cache"),
    "teacher.centers": ("classifier", "mean_embedding"),
    "teacher.center": ("none", "train_mean"),  # = ekd.teachers.centering.CENTER_CHOICES (tested)
    "teacher.onnx_color": ("RGB", "BGR"),
    "teacher.onnx_layout": ("NCHW", "NHWC"),
    "train.amp": ("none", "bf16", "fp16"),
    "optim.scheduler": ("cosine", "step"),
    "train.ce_on": ("random", "all"),
}


def validate(cfg: Config) -> None:
    """Reject impossible values with errors that name the key and the valid choices (the checks
    against the registries are :func:`ekd.engine.preflight.check_against_registries`)."""
    _check_values(cfg)
    _check_guard(cfg.train.guard)
    _check_teacher_and_distill(cfg)
    _check_more(cfg)


def _check_values(cfg: Config) -> None:
    """Choices, signs and the keys another key makes required."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    positive = {
        "data.input_size": cfg.data.input_size,
        "model.embedding_size": cfg.model.embedding_size,
        "sampler.samples_per_identity": cfg.sampler.samples_per_identity,
        "train.epochs": cfg.train.epochs,
        "eval.batch_size": cfg.eval.batch_size,
        "val.batch_size": cfg.val.batch_size,
        "train.log_every": cfg.train.log_every,
        "data.preload_max_gb": cfg.data.preload_max_gb,
        "teacher.center_images": cfg.teacher.center_images,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    nonneg = {
        "sampler.random_size": cfg.sampler.random_size,
        "sampler.identities_per_batch": cfg.sampler.identities_per_batch,
        "data.num_workers": cfg.data.num_workers,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_epochs": cfg.optim.warmup_epochs,
    }
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.sampler.random_size + cfg.sampler.identities_per_batch == 0:
        raise ConfigError("sampler: the batch is empty (random_size and identities_per_batch are both 0)")
    if cfg.train.ce_on == "random" and cfg.sampler.random_size == 0:
        raise ConfigError("train.ce_on is 'random' but sampler.random_size is 0: "
                          "set train.ce_on=all or a positive random_size")
    if cfg.data.kind in ("folder", "rec") and not cfg.data.root:
        raise ConfigError(f"data.root is required when data.kind is '{cfg.data.kind}'")
    if cfg.teacher.kind != "none" and not cfg.teacher.path:
        raise ConfigError(f"teacher.path is required when teacher.kind is '{cfg.teacher.kind}'")
    if not 0 < cfg.head.sample_rate <= 1:
        raise ConfigError(f"head.sample_rate must be in (0, 1], got {cfg.head.sample_rate}")
    if cfg.train.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps must be >= 1, got {cfg.train.max_bad_steps}")


def _check_guard(guard: GuardConfig) -> None:
    if guard.loss_factor is not None and guard.loss_factor <= 1:
        raise ConfigError(f"train.guard.loss_factor must be > 1 (or null: rule off), got {guard.loss_factor}")
    if guard.loss_windows < 1:
        raise ConfigError(f"train.guard.loss_windows must be >= 1, got {guard.loss_windows}")
    if guard.batch_windows is not None and guard.batch_windows < 1:
        raise ConfigError(f"train.guard.batch_windows must be >= 1 (or null: rule off), got {guard.batch_windows}")
    if guard.chance_within is not None and not 0 <= guard.chance_within < 0.5:
        raise ConfigError(f"train.guard.chance_within must be in [0, 0.5) (or null: rule off), "
                          f"got {guard.chance_within}")
    if guard.warmup_epochs < 0:
        raise ConfigError(f"train.guard.warmup_epochs must be >= 0, got {guard.warmup_epochs}")


def _check_teacher_and_distill(cfg: Config) -> None:
    """The teacher a distiller needs, and each ``distill[]`` entry's weight (a number or "auto")."""
    if cfg.teacher.onnx_std <= 0:
        raise ConfigError(f"teacher.onnx_std must be > 0, got {cfg.teacher.onnx_std}")
    if cfg.distill and cfg.teacher.kind == "none":
        names = ", ".join(d.name for d in cfg.distill)
        raise ConfigError(f"distill lists {names} but teacher.kind is 'none': "
                          "a distiller needs a teacher (set teacher.kind and teacher.path)")
    for i, entry in enumerate(cfg.distill):
        if isinstance(entry.weight, str):
            if entry.weight != "auto":
                raise ConfigError(f"distill[{i}].weight must be a number or 'auto', got {entry.weight!r}")
            if entry.target_share is not None and not (math.isfinite(entry.target_share)
                                                       and entry.target_share > 0):
                raise ConfigError(f"distill[{i}].target_share must be a number > 0, got {entry.target_share}")
        else:
            if entry.weight < 0:
                raise ConfigError(f"distill[{i}].weight must be >= 0, got {entry.weight}")
            if entry.target_share is not None:
                raise ConfigError(f"distill[{i}].target_share is used with weight: auto only "
                                  f"(weight is {entry.weight:g})")
    if cfg.train.auto_weight_steps < 1:
        raise ConfigError(f"train.auto_weight_steps must be >= 1, got {cfg.train.auto_weight_steps}")


def _floats(obj: Any, prefix: str) -> list[tuple[str, float]]:
    """Every float field of a (nested) dataclass, with its dotted key."""
    out = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out += _floats(value, key + ".")
        elif isinstance(value, float):
            out.append((key, value))
    return out


def _check_more(cfg: Config) -> None:
    """Checks across keys and sections, after the per-key ones of :func:`validate`."""
    for section in ("data", "sampler", "model", "head", "teacher", "optim", "train", "eval", "val"):
        for key, value in _floats(getattr(cfg, section), section + "."):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
    for i, d in enumerate(cfg.distill):
        if not isinstance(d.weight, str) and not math.isfinite(d.weight):
            raise ConfigError(f"distill[{i}].weight must be a finite number, got {d.weight}")
    _check_model(cfg)
    _check_optim_train(cfg)
    _check_batch(cfg)
    _check_val(cfg.val)


def _check_model(cfg: Config) -> None:
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.teacher.embedding_size is not None and cfg.teacher.embedding_size < 1:
        raise ConfigError(f"teacher.embedding_size must be > 0, got {cfg.teacher.embedding_size}")
    if cfg.head.scale <= 0:
        raise ConfigError(f"head.scale must be > 0, got {cfg.head.scale}")
    if cfg.head.margin < 0:
        raise ConfigError(f"head.margin must be >= 0, got {cfg.head.margin}")
    if cfg.data.kind == "synthetic":
        synthetic = cfg.data.synthetic
        for name in ("train_identities", "train_images", "eval_identities", "eval_images",
                     "num_pairs", "image_size"):
            if getattr(synthetic, name) <= 0:
                raise ConfigError(f"data.synthetic.{name} must be > 0, got {getattr(synthetic, name)}")


def _check_optim_train(cfg: Config) -> None:
    optim, train = cfg.optim, cfg.train
    if not 0 <= optim.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {optim.momentum}")
    if optim.gamma <= 0:
        raise ConfigError(f"optim.gamma must be > 0, got {optim.gamma}")
    clip = optim.clip_grad_norm
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not math.isfinite(clip) or clip <= 0):
        raise ConfigError(f"optim.clip_grad_norm must be a number > 0 or null (off), got {clip!r}")
    if optim.warmup_epochs > train.epochs:
        raise ConfigError(f"optim.warmup_epochs={optim.warmup_epochs} exceeds train.epochs={train.epochs}")
    bad = [m for m in optim.milestones
           if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < train.epochs]
    if bad:
        raise ConfigError(f"optim.milestones: {bad[0]!r} is not an epoch in (0, train.epochs="
                          f"{train.epochs}); give increasing numbers, e.g. [10, 18, 22]")
    if list(optim.milestones) != sorted(optim.milestones):
        raise ConfigError(f"optim.milestones must be increasing, got {optim.milestones}")
    if not _DEVICE.fullmatch(train.device):
        raise ConfigError(f"train.device: {train.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if train.max_steps_per_epoch is not None and train.max_steps_per_epoch < 1:
        raise ConfigError(f"train.max_steps_per_epoch must be >= 1 or null, got {train.max_steps_per_epoch}")
    cap = cfg.eval.max_per_identity
    if cap is not None and cap < 2:
        raise ConfigError(f"eval.max_per_identity must be >= 2 or null (pairs need 2 images), got {cap}")


def _check_batch(cfg: Config) -> None:
    """P x K against the data the config itself describes (the synthetic set's sizes)."""
    sampler = cfg.sampler
    if cfg.data.kind != "synthetic":
        return  # a folder's sizes are checked by the sampler once the data is listed
    synthetic = cfg.data.synthetic
    if sampler.identities_per_batch > synthetic.train_identities:
        raise ConfigError(f"sampler.identities_per_batch={sampler.identities_per_batch} exceeds "
                          f"data.synthetic.train_identities={synthetic.train_identities}")
    if sampler.identities_per_batch and synthetic.train_images < 2:
        raise ConfigError("sampler.identities_per_batch > 0 needs identities with 2 or more images; "
                          f"data.synthetic.train_images is {synthetic.train_images}")
    total = synthetic.train_identities * synthetic.train_images
    per_batch = sampler.random_size or sampler.identities_per_batch * sampler.samples_per_identity
    if sampler.random_size > total or per_batch > total:
        raise ConfigError(f"one batch ({per_batch} samples: sampler.random_size={sampler.random_size}, "
                          f"identities_per_batch x samples_per_identity = {sampler.identities_per_batch} x "
                          f"{sampler.samples_per_identity}) is larger than the synthetic training set "
                          f"({total} images)")


VAL_KINDS = ("bin", "pairs", "folder")


def val_sets(val: ValConfig) -> list[ValSetConfig]:
    """``val.sets`` as :class:`~ekd.config.ValSetConfig` (a bare string is the path), names
    defaulted to the path's stem; malformed entries are errors naming ``val.sets[i]``."""
    out = []
    for i, entry in enumerate(val.sets):
        key = f"val.sets[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}: expected a path or a mapping of path, name, kind, root, "
                              f"color; got {entry!r}")
        vs = from_dict(ValSetConfig, entry, prefix=key + ".")
        if not vs.path.strip():
            raise ConfigError(f"{key}.path is required (a .bin file, a pair list or an identity folder)")
        if vs.kind is not None and vs.kind not in VAL_KINDS:
            raise ConfigError(f"{key}.kind: {vs.kind!r} is not one of {', '.join(VAL_KINDS)}")
        if vs.color not in ("rgb", "bgr"):
            raise ConfigError(f"{key}.color: {vs.color!r} is not one of rgb, bgr")
        if vs.name is None:
            vs.name = re.split(r"[\\/]", vs.path.rstrip("/\\"))[-1].rsplit(".", 1)[0] or vs.path
        if not vs.name or "/" in vs.name:
            raise ConfigError(f"{key}.name: {vs.name!r} must be non-empty and without '/'")
        out.append(vs)
    names = [vs.name for vs in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"val.sets: the name {dup[0]!r} is used twice; give the sets distinct "
                          "'name's")
    return out


def _check_val(val: ValConfig) -> None:
    sets = val_sets(val)
    if not sets and (val.every_steps is not None or val.keep_best):
        raise ConfigError("val.every_steps / val.keep_best are set but val.sets is empty: "
                          "list the verification sets to validate on")
    if val.every_steps is not None and val.every_steps < 1:
        raise ConfigError(f"val.every_steps must be >= 1 or null, got {val.every_steps}")
    if val.max_per_identity is not None and val.max_per_identity < 2:
        raise ConfigError(f"val.max_per_identity must be >= 2 or null (pairs need 2 images), "
                          f"got {val.max_per_identity}")
