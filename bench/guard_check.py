"""The divergence guard on a real run: the training-batch pair AUC (the batch chance rule) of
each epoch checkpoint of a run, and the guard's verdict on its ``metrics.jsonl`` with the
default ``train.guard`` settings (:func:`ekd.engine.guard.replay`).

Usage::

    python -m bench.guard_check --run RUN --snapshots DIR --faces FACES --out bench/results/guard_check.json

``--snapshots`` holds copies of the run's ``checkpoints/last.pt`` taken at each epoch end;
``--faces`` is the faces folder whose ``train/`` the run trained on. The batches are drawn as the
trainer draws them (:class:`ekd.data.sampler.BalancedBatchSampler`: the run's random part and
P x K identities), five of them, the same for every checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ekd.config import Config, GuardConfig, from_dict
from ekd.data.sampler import BalancedBatchSampler
from ekd.engine.build import build_train_set
from ekd.engine.guard import batch_pair_auc, read_rows, replay
from ekd.models.loading import load_model
from ekd.utils.checkpoint_io import load_file


def batch_aucs(snapshots: list[Path], faces: Path, batches: int = 5, seed: int = 123) -> list[dict]:
    """Per checkpoint: epoch, step and the mean / min pair AUC of the same training batches."""
    first = load_file(snapshots[0])["config"]
    data = {**first["data"], "root": str(faces / "train"), "preload": False}
    dataset = build_train_set(from_dict(Config, {"data": data}))
    sampler = first["sampler"]
    drawn = BalancedBatchSampler(dataset.labels, sampler["random_size"], sampler["identities_per_batch"],
                                 sampler["samples_per_identity"], seed=seed)
    chosen = [batch for _, batch in zip(range(batches), iter(drawn))]
    images = [torch.stack([dataset[i][0] for i in batch]) for batch in chosen]
    labels = [torch.tensor([int(dataset[i][1]) for i in batch]) for batch in chosen]
    out = []
    for path in tqdm(snapshots, desc="checkpoints", unit="ckpt"):
        state = load_file(path)
        model = load_model(path).model.train()  # batch statistics, as in training
        with torch.no_grad():
            aucs = [batch_pair_auc(model(x), y) for x, y in zip(images, labels)]
        out.append({"epoch": int(state["epoch"]), "step": int(state["step"]),
                    "batch_auc_mean": float(np.mean(aucs)), "batch_auc_min": float(np.min(aucs))})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the run folder (its metrics.jsonl)")
    ap.add_argument("--snapshots", type=Path, required=True, help="folder of per-epoch last.pt copies")
    ap.add_argument("--faces", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    snapshots = sorted(args.snapshots.glob("*.pt"), key=lambda p: int(load_file(p)["step"]))
    rows = read_rows(args.run / "metrics.jsonl")
    verdict = replay(rows, GuardConfig())
    result = {"run": args.run.name, "guard": "defaults (train.guard)",
              "replay_verdict": None if verdict is None else verdict.message(),
              "epoch_losses": [{"epoch": r["epoch"], "step": r["step"], "loss": r.get("loss")}
                               for r in rows if r.get("epoch_end")],
              "checkpoints": batch_aucs(snapshots, args.faces)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["checkpoints"], indent=1))
    print("replay with the default guard:", result["replay_verdict"] or "no stop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
