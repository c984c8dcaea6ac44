"""Are the demo's students converged? Train the demo's student (``src/ekd/engine/demo.py``,
plan ``FULL``: same synthetic data, sampler, CosFace head and optimiser) for several epoch
counts and score each on the demo's two synthetic protocols.

Needs a finished ``ekd demo --out DEMO`` (its ``data/``, and for EKD rows its teacher and
teacher cache). Rows are ``method:width:epochs:seed`` (method ``nokd`` or ``ekd``); finished rows
are kept in ``OUT/<row>/res.json`` and skipped on a rerun; all rows go to
``bench/results/demo_convergence.json``.

    python bench/demo_convergence.py --demo demo_out --threads 1 nokd:0.5:3:0 nokd:0.5:6:0 nokd:0.5:12:0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ekd.config import DistillerConfig, validate
from ekd.engine import demo as D
from ekd.engine.evaluation import evaluate_checkpoint
from ekd.engine.trainer import train

RESULTS = Path(__file__).resolve().parent / "results" / "demo_convergence.json"


def run_row(demo: Path, out: Path, method: str, width: float, epochs: int, seed: int) -> dict:
    name = f"{method}_w{width:g}_e{epochs}_s{seed}"
    done = out / name / "res.json"
    if done.is_file():
        return json.loads(done.read_text())
    plan = D.FULL
    cfg = D.demo_config(plan, demo, name, "mobilefacenet", epochs, "cpu", seed)
    cfg.train.output_dir, cfg.model.width, cfg.train.tensorboard = str(out / name), width, False
    if method == "ekd":
        cfg.teacher.kind, cfg.teacher.path = "cache", str(demo / "teacher_cache")
        cfg.teacher.cache_teacher = str(demo / "teacher" / "model.pt")
        cfg.distill = [DistillerConfig(name="ekd", weight=1.0, params=dict(plan.ekd))]
    validate(cfg)
    start = time.perf_counter()
    run = train(cfg)
    data = demo / "data"
    sets = {"pairs": ("pairs", str(data / "pairs.txt"), str(data / "eval")),
            "all": ("folder", str(data / "eval"), None)}
    res = evaluate_checkpoint(run.model_path, sets, max_per_identity=plan.eval_images, device="cpu",
                              progress=False)["sets"]
    row = {"row": name, "method": method, "width": width, "epochs": epochs, "seed": seed,
           "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
           "load_average": os.getloadavg()[0], "pairs_acc": res["pairs"]["accuracy"],
           "pairs_tpr@1e-3": res["pairs"].get("tpr@1e-3"), "all_tpr@1e-3": res["all"].get("tpr@1e-3"),
           "all_tpr@1e-4": res["all"].get("tpr@1e-4"), "all_tpr@1e-5": res["all"].get("tpr@1e-5")}
    done.write_text(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="method:width:epochs:seed")
    ap.add_argument("--demo", type=Path, default=Path("demo_out"))
    ap.add_argument("--out", type=Path, default=Path("demo_convergence_runs"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.demo / "data" / "pairs.txt").is_file():
        raise SystemExit(f"{args.demo}: run `ekd demo --out {args.demo}` first")
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for spec in args.rows:
        method, width, epochs, seed = spec.split(":")
        row = run_row(args.demo, args.out, method, float(width), int(epochs), int(seed))
        rows = [r for r in rows if r["row"] != row["row"]] + [row]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(rows, indent=1))
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
