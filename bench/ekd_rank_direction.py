"""Which way EKD's soft-rank error pulls, on the final state of finished ablation cells.

For each cell folder given (``<cache>/cells/<name>``, as ``bench/ekd_ablation.py`` leaves them),
the run's last checkpoint is loaded into a trainer built from the run's own config, and EKD's
diagnostics are recorded on the first ``--batches`` training batches (no step is taken): the
share of the squared soft-rank error that pulls positive pairs down / top-k negatives up
(``ekd/against_pos``, ``ekd/against_neg``: the student already ranks those pairs better than the
teacher does) and the active-band shares. Runs trained since the trainer logs ``against_*``
have them in ``metrics.jsonl`` already; this measures the cells trained before.

    python -m bench.ekd_rank_direction CACHE/cells/T2-w0.5-ekd__ours-s0-... [...] [--batches 20]

Writes ``bench/results/ekd_rank_direction.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.step_time import prefetch

from ekd.config import load_config
from ekd.engine.diagnostics import distiller_diagnostics, set_recording
from ekd.engine.trainer import Trainer

OUT = Path(__file__).resolve().parent / "results" / "ekd_rank_direction.json"
KEYS = ("against_pos", "against_neg", "active_pos", "active_neg")


def measure(cell: Path, batches: int) -> dict[str, float]:
    """Mean over ``batches`` training batches of EKD's direction and band shares."""
    run = cell / "run"
    overrides = [f"train.output_dir={tempfile.mkdtemp()}", f"train.resume={run / 'checkpoints' / 'last.pt'}",
                 "val.sets=[]", "train.progress=false"]
    trainer = Trainer(load_config(run / "config.yaml", overrides))
    values: dict[str, list[float]] = {}
    with torch.no_grad():
        for batch in prefetch(trainer, batches):
            set_recording(trainer.distillers, True)
            trainer.compute_terms(*batch)
            for key, v in distiller_diagnostics(trainer.distillers).items():
                values.setdefault(key, []).append(v)
    return {k: round(statistics.mean(v), 4) for k, v in sorted(values.items())
            if k.rsplit("/", 1)[-1] in KEYS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", nargs="+", type=Path)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = {cell.name: measure(cell, args.batches) for cell in args.cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batches": args.batches, "cells": rows}, indent=1) + "\n")
    for name, row in rows.items():
        print(name, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
