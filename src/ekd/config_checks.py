"""Cross-field checks of a :class:`~ekd.config.Config`, run by :func:`ekd.config.validate`.

Each check names the offending key and what would be valid. These need the model and distiller
registries, so the modules are imported here, on first use, to keep ``import ekd.config`` light.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ekd.config_types import ValSetConfig
from ekd.errors import ConfigError

# ``cfg`` below is an :class:`ekd.config.Config` (typed ``Any``: this module is imported by
# ekd.config and must not import it back).
Config = ValConfig = Any

#: Distillers whose loss needs positive pairs (same identity) in every batch.
NEEDS_POSITIVE_PAIRS = ("ekd", "triplet_distill")
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


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


def check_more(cfg: Config) -> None:
    """Checks beyond the per-key ones of :func:`ekd.config.validate`."""
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
    _check_distillers(cfg)
    _check_val(cfg.val)


def _check_model(cfg: Config) -> None:
    from ekd.models import BACKBONES, MIN_INPUT_SIZE, check_width, feature_map_side

    valid = ", ".join(sorted(BACKBONES))
    for key, name in (("model.backbone", cfg.model.backbone), ("teacher.backbone", cfg.teacher.backbone)):
        if name is not None and name.strip().lower() not in BACKBONES:
            raise ConfigError(f"{key}: {name!r} is not one of {valid}")
    check_width(cfg.model.backbone, cfg.model.width, "model.width")
    size = cfg.data.input_size
    if size < MIN_INPUT_SIZE or feature_map_side(size) < 1:
        raise ConfigError(f"data.input_size={size} is too small for the backbones: the minimum is "
                          f"{MIN_INPUT_SIZE} (faces are usually 112)")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.teacher.embedding_size is not None and cfg.teacher.embedding_size < 1:
        raise ConfigError(f"teacher.embedding_size must be > 0, got {cfg.teacher.embedding_size}")
    if cfg.head.scale <= 0:
        raise ConfigError(f"head.scale must be > 0, got {cfg.head.scale}")
    if cfg.head.margin < 0:
        raise ConfigError(f"head.margin must be >= 0, got {cfg.head.margin}")
    if cfg.data.kind == "synthetic":
        s = cfg.data.synthetic
        for name in ("train_identities", "train_images", "eval_identities", "eval_images",
                     "num_pairs", "image_size"):
            if getattr(s, name) <= 0:
                raise ConfigError(f"data.synthetic.{name} must be > 0, got {getattr(s, name)}")


def _check_optim_train(cfg: Config) -> None:
    o, t = cfg.optim, cfg.train
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
    if o.gamma <= 0:
        raise ConfigError(f"optim.gamma must be > 0, got {o.gamma}")
    clip = o.clip_grad_norm
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not math.isfinite(clip) or clip <= 0):
        raise ConfigError(f"optim.clip_grad_norm must be a number > 0 or null (off), got {clip!r}")
    if o.warmup_epochs > t.epochs:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} exceeds train.epochs={t.epochs}")
    bad = [m for m in o.milestones
           if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < t.epochs]
    if bad:
        raise ConfigError(f"optim.milestones: {bad[0]!r} is not an epoch in (0, train.epochs="
                          f"{t.epochs}); give increasing numbers, e.g. [10, 18, 22]")
    if list(o.milestones) != sorted(o.milestones):
        raise ConfigError(f"optim.milestones must be increasing, got {o.milestones}")
    if not _DEVICE.fullmatch(t.device):
        raise ConfigError(f"train.device: {t.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if t.max_steps_per_epoch is not None and t.max_steps_per_epoch < 1:
        raise ConfigError(f"train.max_steps_per_epoch must be >= 1 or null, got {t.max_steps_per_epoch}")
    cap = cfg.eval.max_per_identity
    if cap is not None and cap < 2:
        raise ConfigError(f"eval.max_per_identity must be >= 2 or null (pairs need 2 images), got {cap}")


def _check_batch(cfg: Config) -> None:
    """P x K against the data the config itself describes (the synthetic set's sizes)."""
    sp = cfg.sampler
    if cfg.data.kind != "synthetic":
        return  # a folder's sizes are checked by the sampler once the data is listed
    s = cfg.data.synthetic
    if sp.identities_per_batch > s.train_identities:
        raise ConfigError(f"sampler.identities_per_batch={sp.identities_per_batch} exceeds "
                          f"data.synthetic.train_identities={s.train_identities}")
    if sp.identities_per_batch and s.train_images < 2:
        raise ConfigError("sampler.identities_per_batch > 0 needs identities with 2 or more images; "
                          f"data.synthetic.train_images is {s.train_images}")
    total = s.train_identities * s.train_images
    per_batch = sp.random_size or sp.identities_per_batch * sp.samples_per_identity
    if sp.random_size > total or per_batch > total:
        raise ConfigError(f"one batch ({per_batch} samples: sampler.random_size={sp.random_size}, "
                          f"identities_per_batch x samples_per_identity = {sp.identities_per_batch} x "
                          f"{sp.samples_per_identity}) is larger than the synthetic training set "
                          f"({total} images)")


def _check_distillers(cfg: Config) -> None:
    if not cfg.distill:
        return
    from ekd.distill import DISTILLERS

    for i, d in enumerate(cfg.distill):
        if d.name not in DISTILLERS:
            raise ConfigError(f"distill[{i}].name: {d.name!r} is not one of "
                              f"{', '.join(sorted(DISTILLERS))}")
        # unknown params are reported by build_distiller when the trainer builds it
        if d.name in NEEDS_POSITIVE_PAIRS:
            sp = cfg.sampler
            if sp.identities_per_batch < 1 or sp.samples_per_identity < 2:
                raise ConfigError(
                    f"distill[{i}] '{d.name}' needs positive pairs (two images of one identity) in "
                    f"every batch, but sampler.identities_per_batch={sp.identities_per_batch} and "
                    f"sampler.samples_per_identity={sp.samples_per_identity}: set "
                    "identities_per_batch >= 1 and samples_per_identity >= 2 (paper: 4)")


VAL_KINDS = ("bin", "pairs", "folder")


def val_metric_names(fprs: list[float]) -> list[str]:
    """The metrics logged per validation set: 10-fold ``acc`` (pair sets), ``auc``, ``tpr@F``."""
    from ekd.eval.evaluate import fpr_key

    return ["acc", "auc"] + [fpr_key(f) for f in fprs]


def val_sets(val: ValConfig) -> list[ValSetConfig]:
    """``val.sets`` as :class:`~ekd.config.ValSetConfig` (a bare string is the path), names
    defaulted to the path's stem; malformed entries are errors naming ``val.sets[i]``."""
    from ekd.config_types import from_dict

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
    from ekd.eval.evaluate import REPORT_FPRS

    sets = val_sets(val)
    if not sets and (val.every_steps is not None or val.keep_best):
        raise ConfigError("val.every_steps / val.keep_best are set but val.sets is empty: "
                          "list the verification sets to validate on")
    if val.every_steps is not None and val.every_steps < 1:
        raise ConfigError(f"val.every_steps must be >= 1 or null, got {val.every_steps}")
    if val.max_per_identity is not None and val.max_per_identity < 2:
        raise ConfigError(f"val.max_per_identity must be >= 2 or null (pairs need 2 images), "
                          f"got {val.max_per_identity}")
    valid = ", ".join(f"{f:.0e}".replace("e-0", "e-") for f in REPORT_FPRS)
    for f in val.fprs:
        if not any(math.isclose(f, r, rel_tol=1e-9) for r in REPORT_FPRS):
            raise ConfigError(f"val.fprs: {f!r} is not one of {valid}")
    if val.keep_best is not None:
        metrics = val_metric_names(val.fprs)
        choices = [f"{vs.name}/{m}" for vs in sets for m in metrics]
        if val.keep_best not in choices:
            raise ConfigError(f"val.keep_best: {val.keep_best!r} is not a validation metric; "
                              f"valid: {', '.join(choices)}")
