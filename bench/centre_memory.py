"""Memory of the classifier-based distillers' class centres, before and after sharding.

Formula table: bytes per rank for C = 85k (MS1MV2), 360k (Glint360K), 2M (WebFace42M), d = 512,
global batch 1024, 8 ranks, float32. *Before* (every rank replicated): the ``[C, d]`` centres,
their normalised copy and four ``[N, C]`` logit-sized tensors (cosines, margin copy, scaled
logits, softmax). *After* (Partial FC class shards, :mod:`ekd.heads.sharded_ce`): the rank's
``C / W`` rows, the normalised copy of the kept rows and four ``[N, k]`` tensors, ``k = ceil(r C / W)``.

Measured: one AdaDistill step (update + margin softmax + backward) per configuration, each in its
own process (peak RSS from ``getrusage``), with a small batch:

    python -m bench.centre_memory            # writes bench/results/centre_memory.{md,json}
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D, N, WORLD, F32 = 512, 1024, 8, 4
CLASSES = {"85k": 85_742, "360k": 360_232, "2M": 2_059_906}
RESULTS = Path(__file__).resolve().parent / "results"
#: (label, classes, simulated world, sample rate, batch) of the measured steps.
MEASURED = [("before: replicated, C=360k", 360_232, 1, 1.0, 64, False),
            ("after: rank 0 of 8, C=2M, r=1", 2_059_906, 8, 1.0, 64, True),
            ("after: 1 process, C=2M, r=0.1 (all 2M centres held)", 2_059_906, 1, 0.1, 64, True)]


def before_bytes(c: int) -> int:
    return 2 * c * D * F32 + 4 * N * c * F32


def after_bytes(c: int, rate: float) -> int:
    shard = math.ceil(c / WORLD)
    kept = min(shard, max(1, math.ceil(rate * shard)))
    return shard * D * F32 + kept * D * F32 + 4 * N * kept * F32


def gib(b: float) -> str:
    return f"{b / 2 ** 30:.2f}"


def measure(classes: int, world: int, rate: float, batch: int, use_shard: bool) -> dict:
    """One AdaDistill step in this process (a 1-process Gloo group stands in for rank 0 of
    ``world``: its all-reduces are identities, memory and time are rank 0's)."""
    import torch
    import torch.distributed as dist

    from ekd.distill.adadistill import AdaDistillLoss
    from ekd.heads.sharded_ce import ClassShard

    torch.set_num_threads(1)
    shard = None
    if use_shard:
        if world > 1:
            store = Path(tempfile.mkdtemp()) / "store"
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        shard = ClassShard(classes, 0, world, rate)  # rank 0 of `world`; collectives: 1 process
    t0 = time.perf_counter()
    d = AdaDistillLoss(num_classes=classes, teacher_dim=D, class_shard=shard)
    init_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(batch, D, generator=gen).requires_grad_(True)
    t = torch.randn(batch, D, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    t0 = time.perf_counter()
    d(s, t, y)["adadistill"].backward()
    step_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"centres_bytes": d.centres.numel() * 4, "peak_rss_bytes": peak, "init_s": init_s,
            "step_s": step_s, "grad_finite": bool(torch.isfinite(s.grad).all())}


def main() -> None:
    if len(sys.argv) > 1:  # child: one measurement
        print(json.dumps(measure(*json.loads(sys.argv[1]))))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = [{"classes": k, "before": before_bytes(c), "after_r1": after_bytes(c, 1.0),
              "after_r01": after_bytes(c, 0.1)} for k, c in CLASSES.items()]
    runs = []
    for label, c, w, r, b, use in MEASURED:
        out = subprocess.run([sys.executable, "-m", "bench.centre_memory", json.dumps([c, w, r, b, use])],
                             check=True, capture_output=True, text=True, cwd=RESULTS.parent.parent).stdout
        runs.append({"config": label, "classes": c, "world": w, "sample_rate": r, "batch": b,
                     **json.loads(out.strip().splitlines()[-1])})
    lines = [f"Bytes per rank (GiB), d = {D}, global batch {N}, {WORLD} ranks, float32 "
             "(formula, see bench/centre_memory.py)", "",
             "| C | before (replicated) | after, sample rate 1 | after, sample rate 0.1 |",
             "|---|---|---|---|"]
    lines += [f"| {r['classes']} | {gib(r['before'])} | {gib(r['after_r1'])} | {gib(r['after_r01'])} |"
              for r in table]
    lines += ["", "Measured: one AdaDistill step on CPU (1 thread), its own process", "",
              "| configuration | batch | centres held (GiB) | peak RSS (GiB) | init (s) | step (s) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['batch']} | {gib(r['centres_bytes'])} | {gib(r['peak_rss_bytes'])} "
              f"| {r['init_s']:.1f} | {r['step_s']:.2f} |" for r in runs]
    (RESULTS / "centre_memory.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "centre_memory.json").write_text(json.dumps({"formula": table, "measured": runs}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
