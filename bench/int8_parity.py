"""What INT8 costs a real-face student: fp32 vs INT8 ONNX on LFW all-pairs at low FPR.

Exports the student with the user's own commands (``ekd export --onnx`` and ``ekd export --int8
--calib <faces>/train``), then embeds the LFW all-pairs protocol (``../shared/data/faces``
README: every identity with >= 2 images, its first 10 by file name, all pairs) with the PyTorch
checkpoint, the fp32 ONNX and the INT8 ONNX model, and reports TPR at FPR 1e-3 / 1e-4 with 95%
intervals from 1,000 resamples of the identities (:mod:`ekd.eval.bootstrap`, the resamples of
the KD table), the paired INT8 - fp32 difference on the same resamples, the CPU latency at batch
1 and 64 (median and 25th-75th percentile, :mod:`ekd.deploy.stats`) and the file sizes.

Usage::

    python -m bench.int8_parity --model STUDENT.pt --name CELL [--faces ../shared/data/faces]

Writes ``bench/results/int8_<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.kd_cells import BOOT_RESAMPLES, BOOT_SEED, all_pairs_tail, environment, git
from bench.kd_protocols import load_protocols

from ekd.commands.cli import main as ekd_main
from ekd.data.folder import ListDataset
from ekd.deploy.embedding_model import OnnxBackbone, OnnxEmbeddingModel
from ekd.deploy.stats import model_stats, onnx_stats
from ekd.deploy.onnx_export import load_checkpoint
from ekd.eval.bootstrap import bootstrap_tpr, interval, paired_difference
from ekd.eval.flip_embed import embed_dataset
from ekd.eval.metrics import tpr_at_fpr
from ekd.eval.protocols import all_pairs_scores

REPO = Path(__file__).resolve().parents[1]

FPRS = (1e-3, 1e-4)


def run_ekd(args: list[str]) -> str:
    """Run an ``ekd`` command in this process; its standard output (it must succeed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = ekd_main(args)
    if code != 0:
        raise SystemExit(f"ekd {' '.join(args)} failed with exit code {code}")
    return buf.getvalue()


def score(model: torch.nn.Module, protocols, input_size: int) -> dict:  # noqa: ANN001
    """Point TPRs, bootstrap samples and the bootstrap tail of one model on LFW all-pairs."""
    paths = protocols.all_pairs_paths
    t0 = time.perf_counter()
    emb = embed_dataset(model, ListDataset(paths, input_size), batch_size=128,
                        progress=f"LFW all-pairs, {len(paths)} images")
    scores, same = all_pairs_scores(emb, protocols.all_pairs_labels)
    point = tpr_at_fpr(scores, same, FPRS)
    tail = all_pairs_tail(protocols, {os.path.normpath(p): e for p, e in zip(paths, emb)})
    samples = bootstrap_tpr(tail, FPRS, BOOT_RESAMPLES, BOOT_SEED)
    return {"tpr": {f"{f:.0e}": point[f] for f in FPRS},
            "interval": {f"{f:.0e}": list(map(float, iv))
                         for f, iv in zip(FPRS, interval(samples))},
            "_tail": tail, "embed_seconds": time.perf_counter() - t0}


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as ``torch.save`` writes them (a training checkpoint also
    holds the head and the optimizer, which a deployment does not ship)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def cell_file(model: str) -> str:
    """The model's path inside its cell folder (``run/model.pt``), for the report."""
    parts = Path(model).parts
    return "/".join(parts[parts.index("run"):]) if "run" in parts else Path(model).name


def checkpoint_epoch(path: Path) -> str:
    """``"final model"`` for a ``model.pt``, else the epoch and step a training checkpoint holds."""
    from ekd.utils.checkpoint_io import load_file

    state = load_file(path).get("state")
    if not isinstance(state, dict):
        return "final model"
    return f"training checkpoint after epoch {state.get('epoch')} (step {state.get('step')})"


def table(rec: dict) -> str:
    """The Markdown table of docs/deploy.md."""
    head = ("| model | size | TPR@1e-3 [95% interval] | TPR@1e-4 [95% interval] | "
            "CPU ms batch 1 | CPU ms batch 64 |")
    lines = [head, "|---|---|---|---|---|---|"]
    for label in ("pytorch fp32", "onnx fp32", "onnx int8"):
        r = rec["models"][label]
        cells = [label, f"{r['file_bytes'] / 1e6:.2f} MB"]
        for f in ("1e-03", "1e-04"):
            lo, hi = r["interval"][f]
            cells.append(f"{r['tpr'][f]:.4f} [{lo:.4f}, {hi:.4f}]")
        for b in ("1", "64"):
            med, (p25, p75) = r["latency_ms"][b], r["latency_spread_ms"][b]
            cells.append(f"{med:.1f} [{p25:.1f}-{p75:.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    d = rec["int8_minus_fp32"]
    lines += ["", "INT8 - fp32 ONNX, paired on the same identity resamples: " + "; ".join(
        f"TPR@{f} {d[f]['mean']:+.4f} [{d[f]['interval'][0]:+.4f}, {d[f]['interval'][1]:+.4f}]"
        for f in ("1e-03", "1e-04")) + ".", "", rec["parity"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="student checkpoint (model.pt)")
    parser.add_argument("--name", required=True, help="its name in the results, e.g. the cell")
    parser.add_argument("--faces", default=str(REPO.parent / "shared" / "data" / "faces"))
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30, help="latency repeats")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "ekd" / "int8_parity"))
    args = parser.parse_args()
    faces, work = Path(args.faces), Path(args.work) / args.name
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    fp32, int8 = work / "student.onnx", work / "student_int8.onnx"
    run_ekd(["export", args.model, "--onnx", str(fp32), "--check"])
    export_out = run_ekd(["export", args.model, "--onnx", str(int8), "--int8", "--calib",
                          str(faces / "train"), "--calib-size", str(args.calib_size)])
    parity = next(line for line in export_out.splitlines() if line.startswith("INT8 parity"))
    protocols = load_protocols(faces)
    loaded = load_checkpoint(args.model)
    size = loaded.input_size
    models = {"pytorch fp32": (loaded.model, Path(args.model)),
              "onnx fp32": (OnnxBackbone(OnnxEmbeddingModel(fp32)), fp32),
              "onnx int8": (OnnxBackbone(OnnxEmbeddingModel(int8)), int8)}
    rec: dict = {"name": args.name, "model": str(Path(args.model).name),
                 "checkpoint": checkpoint_epoch(Path(args.model)),
                 "backbone": loaded.backbone, "input_size": size, "parity": parity,
                 "protocol": f"LFW all-pairs ({len(protocols.all_pairs_paths)} images), "
                             f"{BOOT_RESAMPLES} identity resamples, seed {BOOT_SEED}",
                 "calibration": f"{args.calib_size} images of faces/train (training identities)",
                 "threads": torch.get_num_threads(), "models": {}}
    for label, (model, file) in models.items():
        res = score(model, protocols, size)
        if label == "pytorch fp32":
            st = model_stats(model, size, batch_sizes=(1, 64), repeats=args.repeats)
            size_bytes = state_dict_bytes(model)
        else:
            st = onnx_stats(file, (1, 64), args.repeats)
            size_bytes = file.stat().st_size
        res.update(file_bytes=size_bytes,
                   latency_ms={str(b): v for b, v in st.latency_ms.items()},
                   latency_spread_ms={str(b): list(v) for b, v in st.latency_spread_ms.items()})
        rec["models"][label] = res
        print(f"{label}: TPR {res['tpr']} intervals {res['interval']}", flush=True)
    diff = paired_difference(rec["models"]["onnx int8"]["_tail"],
                             rec["models"]["onnx fp32"]["_tail"], FPRS, BOOT_RESAMPLES, BOOT_SEED)
    rec["int8_minus_fp32"] = {f"{f:.0e}": {"mean": float(np.nanmean(diff[:, i])),
                                           "interval": list(map(float, interval(diff[:, i])))}
                              for i, f in enumerate(FPRS)}
    for r in rec["models"].values():
        r.pop("_tail")
    rec.update(git_commit=git("rev-parse", "HEAD"), environment=environment())
    out = REPO / "bench" / "results" / f"int8_{args.name}"  # names hold dots (w0.5): no with_suffix
    Path(f"{out}.json").write_text(json.dumps(rec, indent=1) + "\n")
    text = table(rec)
    Path(f"{out}.md").write_text(
        f"# fp32 vs INT8: {args.name} ({loaded.backbone}, {size} px, {rec['checkpoint']})\n\n"
        f"Made by `python -m bench.int8_parity --model <cache>/cells/{args.name}/{cell_file(args.model)} "
        f"--name {args.name}` (`<cache>`: the KD table's cache folder); "
        f"{rec['protocol']}; latency: median [25th-75th percentile] of {args.repeats} runs, "
        f"{rec['threads']} CPU thread(s); size: the PyTorch weights (state_dict) or the ONNX "
        f"file.\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
