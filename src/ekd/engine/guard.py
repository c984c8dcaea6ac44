"""Divergence guard (``train.guard``): stop a run that has diverged or collapsed, say why, and
keep the last good checkpoint.

Rules, each configurable, all off with ``train.guard.enabled: false``:

- **non-finite**: ``train.max_bad_steps`` non-finite steps in a row, or a non-finite epoch mean
  (the term and the step are named);
- **loss**: the logged total loss stays above ``loss_factor`` x its running minimum for
  ``loss_windows`` logging windows in a row (``train.log_every`` steps each) after warm-up;
  the minimum counts from the first logged step, so a blow-up during warm-up is caught when it
  ends. Only a positive minimum is used;
- **chance**: a validation set's accuracy or AUC at or below ``0.5 + chance_within`` after
  ``warmup_epochs`` (a collapsed model with a finite loss);
- **batch chance**: without a validation set too: the AUC of the training batch's genuine
  against impostor pairs, scored by the student's embeddings (``batch_auc`` in
  ``metrics.jsonl``, :func:`batch_pair_auc`; under ``torchrun`` the gathered global batch's),
  at or below ``0.5 + chance_within`` for ``batch_windows`` logging windows in a row after
  warm-up. A healthy student separates the identities it trains on within the first epochs; a
  collapsed one (every face one embedding, a finite loss) scores 0.5.

No rule fires up to the end of warm-up, so a short run that ends near chance is not an error.

The guard sees the values written to ``metrics.jsonl`` (the loss averaged over ranks), so
:func:`replay` applies it to a finished run's file. Under ``torchrun`` the stop decision is
all-reduced: every rank stops at the same step. A stopped run writes a ``stopped`` row and
raises :class:`TrainingStopped` (``ekd train`` exits 2). ``checkpoints/last_good.pt`` keeps the
last checkpoint written while no rule was pending; :func:`kept_checkpoint` names it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ekd.utils.distributed import DistInfo
from ekd.errors import EkdError
from ekd.eval.metrics import roc_auc

__all__ = ["GuardVerdict", "TrainingStopped", "DivergenceGuard", "batch_pair_auc", "decide", "prepare_checkpoint",
           "kept_checkpoint", "replay", "read_rows"]

LAST_GOOD = "last_good.pt"


@dataclass
class GuardVerdict:
    """Why training stops: the rule, the metric, its value and the step."""

    rule: str
    metric: str
    value: float
    step: int
    detail: str

    def message(self) -> str:
        return f"training stopped at step {self.step} by the {self.rule} rule: {self.detail}"


class TrainingStopped(EkdError):
    """A guard rule stopped training; ``verdict`` says which and why."""

    def __init__(self, verdict: GuardVerdict, message: str | None = None) -> None:
        super().__init__(message or verdict.message())
        self.verdict = verdict


class DivergenceGuard:
    """The loss and chance rules of ``train.guard`` (a :class:`ekd.config.GuardConfig`) over the
    logged values; ``warmup_steps`` = ``warmup_epochs`` x steps per epoch."""

    def __init__(self, cfg, warmup_steps: int) -> None:  # noqa: ANN001 - ekd.config.GuardConfig
        self.cfg, self.warmup_steps = cfg, warmup_steps
        self.min_loss = math.inf
        self.strikes = 0  # logging windows in a row above loss_factor x min_loss
        self.counted_after = -1  # losses logged at or before this step are not the loss any more
        self.batch_strikes = 0  # logging windows in a row with the training batch at chance

    def loss_redefined(self, step: int) -> None:
        """The total loss gained a term at ``step`` (a ``weight: auto`` distiller's weight was
        fixed, ekd.engine.auto_weight): the running minimum restarts with the losses logged after
        it, so the new term is not taken for a divergence."""
        self.min_loss, self.strikes, self.counted_after = math.inf, 0, step

    @property
    def suspect(self) -> bool:
        """A rule is pending: a checkpoint written now may already hold a diverging model."""
        return self.strikes > 0 or self.batch_strikes > 0

    def observe_loss(self, step: int, loss: float) -> GuardVerdict | None:
        """One logged loss value; a verdict when the loss rule fires."""
        cfg = self.cfg
        if not cfg.enabled or cfg.loss_factor is None or not math.isfinite(loss) or step <= self.counted_after:
            return None
        floor = self.min_loss
        self.min_loss = min(self.min_loss, loss)
        if step <= self.warmup_steps or not 0 < floor < math.inf or loss <= cfg.loss_factor * floor:
            self.strikes = 0
            return None
        self.strikes += 1
        if self.strikes < cfg.loss_windows:
            return None
        return GuardVerdict("loss", "loss", loss, step,
                            f"loss {loss:.4g} above {cfg.loss_factor:g} x its running minimum "
                            f"{floor:.4g} for {self.strikes} logging windows in a row "
                            "(train.guard.loss_factor, train.guard.loss_windows)")

    def observe_batch(self, step: int, auc: float) -> GuardVerdict | None:
        """One logged training-batch pair AUC (NaN: the batch had no genuine or no impostor
        pair); a verdict when the batch chance rule fires."""
        cfg = self.cfg
        if not cfg.enabled or cfg.chance_within is None or cfg.batch_windows is None or not math.isfinite(auc):
            return None
        if step <= self.warmup_steps or auc > 0.5 + cfg.chance_within:
            self.batch_strikes = 0
            return None
        self.batch_strikes += 1
        if self.batch_strikes < cfg.batch_windows:
            return None
        return GuardVerdict("batch chance", "batch_auc", auc, step,
                            f"the training batch's pair AUC {auc:.4f} is at chance (at most 0.5 + "
                            f"{cfg.chance_within:g}, train.guard.chance_within) for {self.batch_strikes} "
                            f"logging windows in a row after warm-up (train.guard.batch_windows): "
                            "the student no longer separates the identities it trains on")

    def observe_validation(self, step: int, values: dict) -> GuardVerdict | None:
        """One validation's ``<set>/<metric>`` values; a verdict when a set is at chance."""
        cfg = self.cfg
        if not cfg.enabled or cfg.chance_within is None or step <= self.warmup_steps:
            return None
        for key, value in values.items():
            if key.rsplit("/", 1)[-1] in ("acc", "auc") and value is not None \
                    and value <= 0.5 + cfg.chance_within:
                return GuardVerdict("chance", key, float(value), step,
                                    f"validation {key} = {value:.4f} is at chance (at most 0.5 + "
                                    f"{cfg.chance_within:g}, train.guard.chance_within) after "
                                    f"warm-up ({self.warmup_steps} steps, train.guard.warmup_epochs)")
        return None


def batch_pair_auc(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """AUC of a batch's genuine against impostor pairs (the upper triangle of the cosine matrix
    of ``embeddings``, pairs of equal ``labels`` genuine); NaN without both kinds of pair. A zero
    embedding scores 0 with everything (ties count 1/2: AUC 0.5)."""
    emb = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    rows, cols = torch.triu_indices(len(emb), len(emb), 1, device=emb.device)
    scores = (emb[rows] * emb[cols]).sum(1)
    same = labels[rows] == labels[cols]
    if bool(same.all()) or not bool(same.any()):
        return math.nan
    return roc_auc(scores.cpu().numpy(), same.cpu().numpy())


def decide(verdict: GuardVerdict | None, info: DistInfo, device: torch.device, step: int) -> None:
    """Raise :class:`TrainingStopped` on every rank when any rank has a verdict (an all-reduce
    of the decision under ``torchrun``; every rank calls this at the same steps)."""
    if info.enabled:
        flag = torch.tensor([0 if verdict is None else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and verdict is None:
            verdict = GuardVerdict("guard", "loss", math.nan, step, "another rank's guard rule fired "
                                   "(its log names the rule)")
    if verdict is not None:
        raise TrainingStopped(verdict)


def prepare_checkpoint(last: Path, suspect: bool, is_main: bool) -> None:
    """Before ``last`` is overwritten: while a rule is pending, move the good ``last`` aside to
    ``last_good.pt`` (once); when none is, ``last`` is the good one and ``last_good.pt`` goes."""
    if not is_main:
        return
    good = last.with_name(LAST_GOOD)
    if not suspect:
        good.unlink(missing_ok=True)
    elif last.is_file() and not good.is_file():
        os.replace(last, good)


def kept_checkpoint(last: Path) -> Path | None:
    """The last good checkpoint beside ``last``: ``last_good.pt``, else ``last`` (None if neither)."""
    good = last.with_name(LAST_GOOD)
    return good if good.is_file() else last if last.is_file() else None


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def replay(rows: Iterable[dict], cfg) -> GuardVerdict | None:  # noqa: ANN001 - GuardConfig
    """Apply the loss, batch chance and chance rules to the rows of a run's ``metrics.jsonl`` (steps per
    epoch from its first ``epoch_end`` row): the verdict the guard would have given, or None."""
    rows = list(rows)
    ends = [r["step"] for r in rows if r.get("epoch_end")]
    if not ends:
        raise EkdError("replay: metrics.jsonl has no epoch_end row, so the epoch length is unknown")
    guard = DivergenceGuard(cfg, int(round(cfg.warmup_epochs * ends[0])))
    for row in rows:
        if row.get("val"):
            verdict = guard.observe_validation(row["step"], {k: v for k, v in row.items()
                                                             if "/" in k})
        elif "epoch_end" not in row and "stopped" not in row and "loss" in row:
            verdict = guard.observe_loss(row["step"], row["loss"])
            if verdict is None and row.get("batch_auc") is not None:
                verdict = guard.observe_batch(row["step"], row["batch_auc"])
        else:
            continue
        if verdict is not None:
            return verdict
    return None
