"""Train several configs at once, each in its own process with its share of the cores.

On a small CPU, one process per core beats one process using every core: a MobileFaceNet step on
a 64-image batch of 32 px crops parallelises poorly across threads, so two students trained side
by side finish in about the time one takes with two threads. ``ekd demo`` uses it for its
students; the results are those of :func:`ekd.engine.trainer.train` run one after another with
the same thread count (tested with one).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ekd.config import Config
from ekd.engine.trainer import TrainResult, train
from ekd.errors import EkdError


LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"
LOG_DATE = "%H:%M:%S"


def _start_worker(threads: int, level: int) -> None:
    """Each worker: its share of the cores, and the parent's log level, so that its runs' log
    lines (one per epoch, validation) reach the terminal as a run in the parent's would."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATE)


def _train_named(cfg: Config) -> TrainResult:
    """:func:`train` with the run's folder name in front of each of its log lines (two runs'
    lines interleave on the terminal)."""
    name = Path(cfg.train.output_dir).name
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s [{name}] %(name)s: %(message)s",
                                               LOG_DATE))
    return train(cfg)


def train_side_by_side(configs: Sequence[Config], jobs: int,
                       threads: int | None = None) -> list[TrainResult]:
    """Train ``configs`` (in order of the returned results), ``jobs`` processes at a time, each
    with ``threads`` torch threads (default: the cores divided among the jobs, at least one).

    ``jobs <= 1`` trains them one after another in this process, with its own thread count.
    An :class:`~ekd.errors.EkdError` in a child is raised here as the same type, its message
    prefixed with the run directory of the config that failed; anything else propagates as it is.
    """
    if jobs <= 1 or len(configs) <= 1:
        return [train(cfg) for cfg in configs]
    jobs = min(jobs, len(configs))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch / OpenMP state
    level = logging.getLogger("ekd").getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(threads, level)) as pool:
        futures = [pool.submit(_train_named, cfg) for cfg in configs]
        results = []
        for cfg, future in zip(configs, futures):
            try:
                results.append(future.result())
            except EkdError as exc:
                raise type(exc)(f"training {cfg.train.output_dir}: {exc}") from exc
    return results
