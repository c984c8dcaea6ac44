"""Deployment statistics of the backbones EKD uses: IResNet-50 and both MobileFaceNet widths.

Writes ``bench/results/model_stats.md`` and ``model_stats.json``: parameters, MACs (PyTorch's
FLOP counter, FLOPs / 2, one image), embedding size and the median CPU latency at batch 1 and 32.
Randomly initialised weights: the numbers do not depend on training. Latency depends on the
machine and on its load; the files record the CPU, thread count and load average.

    python -m bench.model_stats [--threads 1] [--repeats 10] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ekd import __version__
from ekd.deploy.stats import model_stats, stats_table
from ekd.models import build_backbone

MODELS = ("iresnet50", "mobilefacenet", "mbf")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: stable numbers on a shared machine)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per batch size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.time()
    rows = []
    for name in MODELS:
        torch.manual_seed(0)
        model = build_backbone(name, args.embedding_size, args.input_size)
        rows.append(model_stats(model, args.input_size, name=name, backbone=name,
                                batch_sizes=(1, 32), repeats=args.repeats, warmup=args.warmup))
        print(f"{name}: done", flush=True)
    env = {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "threads": args.threads,
           "torch": torch.__version__, "ekd": __version__, "python": platform.python_version(),
           "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in os.getloadavg()],
           "repeats": args.repeats, "warmup": args.warmup, "seconds": round(time.time() - start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_stats.json").write_text(json.dumps(
        {"environment": env, "models": [r.to_dict() for r in rows]}, indent=1) + "\n")
    table = stats_table(rows)
    notes = (f"\nCPU: {env['cpu']} ({env['logical_cpus']} logical CPUs), {args.threads} torch "
             f"thread(s), torch {env['torch']}, ekd {env['ekd']}. Latency: median of "
             f"{args.repeats} runs after {args.warmup} warm-up runs, float32, "
             f"`torch.inference_mode`; load average before/after "
             f"{env['load_average_before']} / {env['load_average_after']}. MACs: "
             "`torch.utils.flop_counter.FlopCounterMode` FLOPs / 2 for one image (convolutions and "
             "matrix products; BN, PReLU and additions not counted). Written by "
             "`bench/model_stats.py`.\n")
    (out / "model_stats.md").write_text(
        f"# Model statistics ({args.input_size}x{args.input_size}, embedding "
        f"{args.embedding_size})\n\n{table}\n{notes}")
    print(table + "\n" + notes)


if __name__ == "__main__":
    main()
