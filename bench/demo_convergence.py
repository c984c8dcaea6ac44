"""Are the demo's models converged? Train the demo's teacher or students (``src/ekd/commands/demo.py``,
the plan recorded in ``DEMO/plan.json``: same synthetic data, sampler, CosFace head, optimiser)
for other epoch counts and score each on the demo's two synthetic protocols.

Needs a finished ``ekd demo --out DEMO`` (its ``data/``, and for EKD rows its teacher cache).
Rows are ``kind:epochs:seed[:width]`` with kind ``teacher``, ``nokd`` or ``ekd`` (``width``: a
student width other than the plan's); finished rows are kept in
``OUT/<row>/res.json`` and skipped on a rerun; all rows go to
``bench/results/demo_convergence.json`` (keyed by the plan, so rows of earlier plans stay).
``--jobs 2`` trains two rows at once, one thread each, as the demo trains its students.

    python -m bench.demo_convergence --demo demo_out --jobs 2 nokd:6:0 nokd:6:1 ekd:6:0 ekd:6:1 teacher:6:0
    python -m bench.demo_convergence --demo demo_out nokd:12:0:0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ekd.commands import demo as demo_command
from ekd.commands.eval_report import evaluate_checkpoint
from ekd.commands.side_by_side import train_side_by_side

RESULTS = Path(__file__).resolve().parent / "results" / "demo_convergence.json"
PLAN_KEYS = ("train_identities", "train_images", "eval_identities", "eval_images", "image_size",
             "random_size", "identities_per_batch", "num_pairs", "teacher_backbone",
             "teacher_width", "student_width", "teacher_identities", "preload")


def load_plan(demo: Path) -> demo_command.DemoPlan:
    recorded = json.loads((demo / "plan.json").read_text())
    recorded.pop("quick")
    recorded["seeds"] = tuple(recorded["seeds"])
    return demo_command.DemoPlan(**recorded)


def row_name(spec: str) -> str:
    kind, epochs, seed, *width = spec.split(":")
    return f"{kind}_e{epochs}_s{seed}" + (f"_w{float(width[0]):g}" if width else "")


def row_config(plan: demo_command.DemoPlan, demo: Path, out: Path, spec: str):  # noqa: ANN201
    kind, epochs, seed, *width = spec.split(":")
    epochs, seed, name = int(epochs), int(seed), row_name(spec)
    if width:
        plan = replace(plan, student_width=float(width[0]))
    if kind == "teacher":
        cfg = demo_command.teacher_config(plan, demo, "cpu", epochs, name, seed)
    else:
        cfg = demo_command.student_config(plan, demo, kind, seed, "cpu", epochs, name)
    cfg.train.output_dir, cfg.train.tensorboard = str(out / name), False
    return name, plan, cfg


def score(plan: demo_command.DemoPlan, demo: Path, model: Path) -> dict:
    res = evaluate_checkpoint(model, demo_command.eval_sets(demo), max_per_identity=plan.eval_images,
                              device="cpu", progress=False)["sets"]
    pairs, every = res[demo_command.PAIRS], res[demo_command.ALL_PAIRS]
    return {"pairs_acc": pairs["accuracy"], "pairs_tpr@1e-3": pairs.get("tpr@1e-3"),
            "all_tpr@1e-3": every.get("tpr@1e-3"), "all_tpr@1e-4": every.get("tpr@1e-4"),
            "all_tpr@1e-5": every.get("tpr@1e-5")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="kind:epochs:seed (kind teacher, nokd or ekd)")
    ap.add_argument("--demo", type=Path, default=Path("demo_out"))
    ap.add_argument("--out", type=Path, default=Path("demo_convergence_runs"))
    ap.add_argument("--jobs", type=int, default=1, help="rows trained at once, one thread each")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS.name} in bench/results")
    args = ap.parse_args(argv)
    if not (args.demo / "plan.json").is_file():
        raise SystemExit(f"{args.demo}: run `ekd demo --out {args.demo}` first")
    plan = load_plan(args.demo)
    todo = []
    for spec in args.rows:
        name, used, cfg = row_config(plan, args.demo, args.out, spec)
        if not (args.out / name / "res.json").is_file():
            todo.append((name, spec, used, cfg))
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = train_side_by_side([t[-1] for t in todo], args.jobs)
    seconds = time.perf_counter() - start
    for (name, spec, used, cfg), run in zip(todo, runs):
        row = {"row": name, "plan": {k: getattr(used, k) for k in PLAN_KEYS},
               "kind": spec.split(":")[0], "epochs": cfg.train.epochs, "seed": cfg.train.seed,
               "train_seconds": run.seconds, "jobs": args.jobs, "batch_seconds": seconds,
               "load_average": os.getloadavg()[0], **score(plan, args.demo, run.model_path)}
        (args.out / name / "res.json").write_text(json.dumps(row))
    rows = json.loads(args.results.read_text()) if args.results.is_file() else []
    for spec in args.rows:
        row = json.loads((args.out / row_name(spec) / "res.json").read_text())
        rows = [r for r in rows if not (r["row"] == row["row"] and r["plan"] == row["plan"])] + [row]
        print(json.dumps(row))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
