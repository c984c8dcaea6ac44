"""Checks of a run configuration against the registries, before any heavy work.

:mod:`ekd.config` checks what the config alone can tell; this module checks the names and values
only the higher layers know: the backbones and their input sizes and widths (:mod:`ekd.models`),
the distillers and what they declare (:mod:`ekd.distill.base`: ``needs_positive_pairs``) and the
FPRs evaluation reports (:mod:`ekd.eval.evaluate`). ``ekd train`` runs them when it loads the
config (:func:`load_checked_config`), and :class:`ekd.engine.trainer.Trainer` runs them first,
before the run folder, the teacher or any image; each error names the key and what is valid.
"""

from __future__ import annotations

import math
from pathlib import Path

from ekd.config import Config, ValConfig, load_config, val_sets
from ekd.distill import DISTILLERS
from ekd.errors import ConfigError
from ekd.eval.evaluate import REPORT_FPRS, fpr_key
from ekd.models import BACKBONES, MIN_INPUT_SIZE, check_width, feature_map_side

__all__ = ["check_against_registries", "load_checked_config", "val_metric_names"]


def load_checked_config(path: str | Path | None = None, overrides: list[str] | None = None,
                        base: dict | None = None) -> Config:
    """:func:`ekd.config.load_config` followed by :func:`check_against_registries`."""
    cfg = load_config(path, overrides, base)
    check_against_registries(cfg)
    return cfg


def check_against_registries(cfg: Config) -> None:
    """The checks of ``cfg`` that need the model, distiller and evaluation registries."""
    _check_model(cfg)
    _check_distillers(cfg)
    _check_val(cfg.val)


def val_metric_names(fprs: list[float]) -> list[str]:
    """The metrics logged per validation set: 10-fold ``acc`` (pair sets), ``auc``, ``tpr@F``."""
    return ["acc", "auc"] + [fpr_key(f) for f in fprs]


def _check_model(cfg: Config) -> None:
    valid = ", ".join(sorted(BACKBONES))
    for key, name in (("model.backbone", cfg.model.backbone), ("teacher.backbone", cfg.teacher.backbone)):
        if name is not None and name.strip().lower() not in BACKBONES:
            raise ConfigError(f"{key}: {name!r} is not one of {valid}")
    check_width(cfg.model.backbone, cfg.model.width, "model.width")
    size = cfg.data.input_size
    if size < MIN_INPUT_SIZE or feature_map_side(size) < 1:
        raise ConfigError(f"data.input_size={size} is too small for the backbones: the minimum is "
                          f"{MIN_INPUT_SIZE} (faces are usually 112)")


def _check_distillers(cfg: Config) -> None:
    for i, entry in enumerate(cfg.distill):
        if entry.name not in DISTILLERS:
            raise ConfigError(f"distill[{i}].name: {entry.name!r} is not one of "
                              f"{', '.join(sorted(DISTILLERS))}")
        # unknown params are reported by build_distiller when the trainer builds it
        if DISTILLERS[entry.name].needs_positive_pairs:
            sampler = cfg.sampler
            if sampler.identities_per_batch < 1 or sampler.samples_per_identity < 2:
                raise ConfigError(
                    f"distill[{i}] '{entry.name}' needs positive pairs (two images of one identity) in "
                    f"every batch, but sampler.identities_per_batch={sampler.identities_per_batch} and "
                    f"sampler.samples_per_identity={sampler.samples_per_identity}: set "
                    "identities_per_batch >= 1 and samples_per_identity >= 2 (paper: 4)")


def _check_val(val: ValConfig) -> None:
    valid = ", ".join(f"{f:.0e}".replace("e-0", "e-") for f in REPORT_FPRS)
    for f in val.fprs:
        if not any(math.isclose(f, r, rel_tol=1e-9) for r in REPORT_FPRS):
            raise ConfigError(f"val.fprs: {f!r} is not one of {valid}")
    if val.keep_best is not None:
        metrics = val_metric_names(val.fprs)
        choices = [f"{vs.name}/{m}" for vs in val_sets(val) for m in metrics]
        if val.keep_best not in choices:
            raise ConfigError(f"val.keep_best: {val.keep_best!r} is not a validation metric; "
                              f"valid: {', '.join(choices)}")
