"""Training step time with and without ``train.compile``, for any training config.

Two :class:`ekd.engine.trainer.Trainer` objects are built from the same config (same seed, so
the same student, data and batches), one with ``train.compile=false`` and one with ``true``.
Each runs ``--warmup`` steps (the compiled one compiles in its first), then the two are timed in
interleaved rounds (eager, compiled, eager, ...) so that load changes on a shared machine hit both
alike; the result is the median of ``--steps`` rounds and the first-step (compile) time.
Timed: ``Trainer.train_step`` (student forward, margin CE, teacher embeddings, distillers,
backward, SGD step); batches are prefetched and mirrored as in training (``step_time.prefetch``).

Usage::

    python -m bench.compile_speed CONFIG [--set KEY=VALUE ...] [--steps 20] [--threads 1]
                                  [--out bench/results] [--name NAME]

e.g. a KD-table cell's own ``config.yaml`` (its run folder) with ``--threads 1`` as the table
runs it. Writes ``<out>/compile_speed_<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.step_time import prefetch, timed_step

from ekd.config import load_config
from ekd.engine.trainer import Trainer

OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="a training config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compiles)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--name", default=None, help="results file suffix (default: the config's stem)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    return args


def measure(config: Path, overrides: list[str], steps: int, warmup: int) -> dict:
    """Median step seconds of the eager and the compiled trainer, and their first steps."""
    with tempfile.TemporaryDirectory(prefix="ekd_compile_speed_") as tmp:
        trainers = {flag: Trainer(load_config(config, [*overrides, f"train.compile={flag}",
                                                       f"train.output_dir={Path(tmp) / flag}",
                                                       "train.resume=null", "train.progress=false"]))
                    for flag in ("false", "true")}
        batches = prefetch(trainers["false"], warmup + steps)
        first, times = {}, {flag: [] for flag in trainers}
        for flag, trainer in trainers.items():
            first[flag] = [timed_step(trainer, batches[i])[0] for i in range(warmup)]
        for i in range(steps):
            for flag, trainer in trainers.items():
                times[flag].append(timed_step(trainer, batches[warmup + i])[0])
    return {"first_steps_s": first, "times_s": times,
            "median_s": {flag: statistics.median(t) for flag, t in times.items()}}


def write_results(res: dict, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compile_speed_{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    med, first = res["median_s"], res["first_steps_s"]
    lines = [
        f"# Training step with and without `train.compile`: {name}",
        "",
        f"torch {res['torch']}, {res['threads']} CPU thread(s), {res['machine']}; load average at start "
        f"{res['load_start']:.2f}, at end {res['load_end']:.2f} (the two variants were timed in "
        "interleaved rounds, so load changes hit both alike).",
        f"Config: `{res['config']}` with {res['overrides'] or 'no overrides'}.",
        "",
        "| train.compile | median step | min | max | first step |",
        "|---|---:|---:|---:|---:|",
    ]
    for flag in ("false", "true"):
        t = res["times_s"][flag]
        lines.append(f"| {flag} | {med[flag] * 1e3:.0f} ms | {min(t) * 1e3:.0f} ms | {max(t) * 1e3:.0f} ms | "
                     f"{first[flag][0]:.1f} s |")
    lines += ["", f"Compiled / eager: **{med['true'] / med['false']:.2f}** over {res['steps']} rounds. The compiled "
              "first step includes compiling: seconds when inductor's on-disk cache already holds the graphs, "
              "about a minute on a fresh machine.", "",
              f"Command: `{res['command']}`", ""]
    path = out / f"compile_speed_{name}.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    res = measure(args.config, args.set, args.steps, args.warmup)
    res.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
               load_start=load_start, load_end=os.getloadavg()[0], config=args.config.name,
               overrides=args.set, steps=args.steps,
               command=" ".join(["python -m bench.compile_speed", args.config.name, *(f"--set {o}" for o in args.set),
                                 f"--steps {args.steps}", f"--threads {torch.get_num_threads()}"]))
    path = write_results(res, args.out, args.name or args.config.stem)
    print(path.read_text())


if __name__ == "__main__":
    main()
