"""TensorBoard scalars of a run (``train.tensorboard``), an optional extra: ``pip install
'ekd[tensorboard]'``.

Every numeric value of every ``metrics.jsonl`` row becomes a scalar at the row's ``step``:
step rows under ``train/`` (each loss term, ``loss``, ``lr``, ``images_per_s``, ``data_wait``
when present), epoch summaries under ``epoch/`` and validation rows under ``val/``
(``val/<set>/<metric>``). Written by rank 0 to ``<output_dir>/tensorboard/``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ekd.errors import ConfigError

log = logging.getLogger("ekd.train")
_BOOKKEEPING = {"epoch", "step", "val", "epoch_end"}
INSTALL_HINT = "pip install 'ekd[tensorboard]'"


def _summary_writer_class() -> Any:
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    return SummaryWriter


class TensorBoardScalars:
    """A thin :class:`torch.utils.tensorboard.SummaryWriter` for metrics rows."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self._writer = _summary_writer_class()(log_dir=str(self.log_dir), purge_step=purge_step)

    def write_row(self, row: dict) -> None:
        if "stopped" in row:  # the guard's stop record (metrics.jsonl only)
            return
        prefix = "val/" if row.get("val") else "epoch/" if "epoch_end" in row else "train/"
        step = row.get("step")
        for key, value in row.items():
            if key in _BOOKKEEPING or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def tensorboard_available() -> bool:
    try:
        _summary_writer_class()
    except ImportError:
        return False
    return True


def open_tensorboard(setting: bool | None, log_dir: Path, enabled: bool,
                     purge_step: int | None = None) -> TensorBoardScalars | None:
    """The writer for ``train.tensorboard`` (``None`` = on when installed, ``False`` = off).
    Checked on every rank (so all ranks fail alike); the writer exists on rank 0 (``enabled``).
    ``purge_step`` (a resumed run's step) drops events a killed run wrote after its checkpoint."""
    if setting is False:
        return None
    if not tensorboard_available():
        if setting:
            raise ConfigError(f"train.tensorboard is true but the tensorboard package is not "
                              f"installed: {INSTALL_HINT} (or set train.tensorboard=false)")
        if enabled:
            log.info("TensorBoard logging off: the tensorboard package is not installed (%s)",
                     INSTALL_HINT)
        return None
    return TensorBoardScalars(log_dir, purge_step) if enabled else None
