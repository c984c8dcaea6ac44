"""Train several configs at once, each in its own process with its share of the cores.

On a small CPU, one process per core beats one process using every core: a MobileFaceNet step on
a 64-image batch of 32 px crops parallelises poorly across threads, so two students trained side
by side finish in about the time one takes with two threads. ``ekd demo`` uses it for its
students; the results are those of :func:`ekd.engine.trainer.train` run one after another with
the same thread count (tested with one).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import torch

from ekd.config import Config
from ekd.engine.trainer import TrainResult, train
from ekd.errors import EkdError


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


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
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_set_threads,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(train, cfg) for cfg in configs]
        results = []
        for cfg, future in zip(configs, futures):
            try:
                results.append(future.result())
            except EkdError as exc:
                raise type(exc)(f"training {cfg.train.output_dir}: {exc}") from exc
    return results
