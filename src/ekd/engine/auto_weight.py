"""``weight: auto``: a distiller's weight set from its share of the margin softmax's gradient.

The zoo's default weights come from papers trained at 112 px on millions of images; at another
scale a term can be too weak to move the student (or drown the margin softmax). With
``weight: auto`` the trainer measures, over the first ``train.auto_weight_steps`` steps, the
ratio ``||d(sum of the distiller's terms at weight 1)/d emb|| / ||d CE / d emb||`` over the global
batch (the ``grad_share`` of :mod:`ekd.engine.diagnostics`); meanwhile the terms are computed
but not applied. It then fixes ``weight = target_share / median(ratio)``, logs it, writes it to
``metrics.jsonl`` and keeps it in the checkpoint, so a resumed run uses the same weight.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from ekd.config import DistillerConfig
from ekd.utils import distributed
from ekd.engine.diagnostics import term_gradient_norms
from ekd.errors import ConfigError

#: Target share used when ``target_share`` is not given, set by the cpu3 tuning grid
#: (docs/results/kd_tuning_cpu3.md). There, on the validation split, the rule chose cosine at
#: weight 10 (the better feature baseline, teacher centred). Its share at weight 1 over the
#: first 20 steps was 0.0286 (the "cosine auto" cells' calibration), so the chosen weight acts
#: at a share of 0.29. The earlier provisional default of 0.5 gave weight 17.5, past the best
#: weight of the grid.
DEFAULT_TARGET_SHARE = 0.3


@dataclass
class _Calibration:
    index: int
    name: str
    target_share: float
    ratios: list[float] = field(default_factory=list)


class AutoWeights:
    """The distillers configured with ``weight: auto`` and their calibration."""

    def __init__(self, configs: list[DistillerConfig], distillers: nn.ModuleList, steps: int,
                 has_margin_softmax: bool) -> None:
        self.distillers, self.steps = distillers, steps
        self.auto_indices = {i for i, c in enumerate(configs) if c.weight == "auto"}
        self.pending = [_Calibration(i, c.name, DEFAULT_TARGET_SHARE if c.target_share is None else c.target_share)
                        for i, c in enumerate(configs) if c.weight == "auto"]
        if self.pending and not has_margin_softmax:
            names = ", ".join(c.name for c in self.pending)
            raise ConfigError(f"distill weight 'auto' ({names}) sets a share of the margin softmax's "
                              "gradient, but a distiller here replaces the margin softmax; give a number")

    @property
    def calibrating(self) -> bool:
        return bool(self.pending)

    def held_back(self, owners: dict[str, int]) -> set[str]:
        """Names of the terms computed but not applied this step (distillers still calibrating)."""
        waiting = {c.index for c in self.pending}
        return {name for name, i in owners.items() if i in waiting}

    def observe(self, terms: dict[str, torch.Tensor], owners: dict[str, int], emb: torch.Tensor,
                dist: distributed.DistInfo, step: int) -> list[dict]:
        """Measure each calibrating distiller's ratio on this step (a collective under torchrun:
        every rank calls it on the same steps); returns one record per weight fixed now."""
        if not self.pending or "ce" not in terms or not emb.requires_grad:
            return []
        grouped = {"ce": terms["ce"]}
        for c in self.pending:
            own = [v for name, v in terms.items() if owners.get(name) == c.index]
            grouped[f"auto{c.index}"] = sum(own) if own else torch.zeros((), device=emb.device)
        shares = term_gradient_norms(grouped, emb, dist)
        fixed = []
        for c in list(self.pending):
            c.ratios.append(shares.get(f"grad_share/auto{c.index}", 0.0))
            if len(c.ratios) >= self.steps:
                fixed.append(self._fix(c, step))
        return fixed

    def _fix(self, c: _Calibration, step: int) -> dict:
        ratio = statistics.median(c.ratios)
        if not ratio > 0:
            raise ConfigError(f"distill[{c.index}] {c.name}: weight 'auto' measured no gradient into the "
                              f"embedding over {len(c.ratios)} steps (its terms do not depend on the "
                              "student's embedding here); give a number")
        weight = c.target_share / ratio
        self.distillers[c.index].weight = weight
        self.pending.remove(c)
        return {"index": c.index, "name": c.name, "weight": weight, "target_share": c.target_share,
                "share_at_weight_1": ratio, "steps": len(c.ratios), "step": step}

    def state(self) -> dict[str, float]:
        """The weights fixed so far (index as a string), for :class:`TrainState`."""
        waiting = {c.index for c in self.pending}
        return {str(i): float(self.distillers[i].weight) for i in sorted(self.auto_indices - waiting)}

    def restore(self, saved: dict[str, float]) -> None:
        """Apply the weights of a resumed run; those distillers calibrate no more."""
        for key, weight in saved.items():
            self.distillers[int(key)].weight = float(weight)
        self.pending = [c for c in self.pending if str(c.index) not in saved]
