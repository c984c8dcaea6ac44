"""``ekd export | stats | embed | verify``: deployment commands (argument wiring only).

* ``ekd export CHECKPOINT --onnx OUT.onnx [--fp16] [--check]`` -- ONNX with dynamic batch;
  ``--int8 --calib FOLDER [--calib-size N]`` -- INT8 (QDQ) calibrated on face crops.
* ``ekd stats MODEL...`` -- parameters, MACs, embedding size, CPU latency (table + JSON);
  checkpoints, backbone names and ONNX files (fp32/fp16/INT8).
* ``ekd embed --model M IMAGES_OR_FOLDER... -o out.npy`` -- embeddings + ``out.paths.txt``.
* ``ekd verify --model M A.jpg B.jpg --fpr 1e-4 --thresholds RUN/metrics.json`` -- same person?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ekd.errors import ConfigError
from ekd.output_paths import prepare_output_file


def _cmd_export(args: argparse.Namespace) -> int:
    from ekd.deploy.onnx_export import export_checkpoint

    prepare_output_file(args.onnx, "--onnx")
    if args.int8 or args.calib:
        return _export_int8(args)
    res = export_checkpoint(args.checkpoint, args.onnx, backbone=args.backbone, fp16=args.fp16,
                            opset=args.opset, check=args.check)
    print(f"wrote {res.path}: {res.backbone}, input [batch, 3, {res.input_size}, "
          f"{res.input_size}] RGB (x/255-0.5)/0.5, embedding {res.embedding_size}, "
          f"{res.precision}, opset {args.opset}")
    for batch, delta in res.parity.items():
        print(f"parity batch {batch}: max |Δ| of normalised embeddings {delta:.2e} "
              f"(tolerance {res.tolerance:g})")
    return 0


def _export_int8(args: argparse.Namespace) -> int:
    from ekd.deploy.quantize import export_int8

    if not (args.int8 and args.calib):
        raise ConfigError("--int8 needs --calib FOLDER (aligned face crops like those the model "
                          "will see) and --calib works only with --int8")
    if args.fp16 or args.check:
        raise ConfigError("--int8 cannot be combined with --fp16 or --check (the INT8 export "
                          "checks itself against the fp32 model on held-back images)")
    res = export_int8(args.checkpoint, args.onnx, args.calib, args.calib_size,
                      backbone=args.backbone, opset=args.opset)
    print(f"wrote {res.path}: {res.backbone}, input [batch, 3, {res.input_size}, "
          f"{res.input_size}] RGB (x/255-0.5)/0.5, embedding {res.embedding_size}, INT8 (QDQ, "
          f"per-channel weights) calibrated on {res.calibration_images} image(s) of {args.calib}, "
          f"opset {args.opset}")
    print(res.parity.text())
    return 0


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes: expected numbers like 1,32, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes: batch sizes must be >= 1, got {text!r}")
    return sizes


def _cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from ekd.deploy.stats import (busy_warnings, model_stats, onnx_stats, resolve_model,
                                  stats_table)

    if args.json:
        prepare_output_file(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, batches = [], _batch_sizes(args.batch_sizes)
    for spec in args.model:
        if Path(spec).is_file() and Path(spec).suffix.lower() == ".onnx":
            rows.append(onnx_stats(spec, batches, args.repeats, args.warmup))
            continue
        model, backbone, size = resolve_model(spec, args.backbone, args.input_size,
                                              args.embedding_size)
        is_file = Path(spec).is_file()
        name = Path(spec).name if is_file else backbone
        rows.append(model_stats(model, size, name=name, backbone=backbone,
                                file=spec if is_file else "", batch_sizes=batches,
                                repeats=args.repeats, warmup=args.warmup))
    print(stats_table(rows))
    print(f"(latency: median [25th-75th percentile] of {args.repeats} runs, "
          f"{torch.get_num_threads()} CPU thread(s); MACs from torch.utils.flop_counter, "
          "FLOPs/2, one image; ONNX files: MACs of the PyTorch model they were exported from)")
    for line in busy_warnings(rows):
        print(line, file=sys.stderr)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from ekd.deploy.embedding_model import (collect_images, embeddings_file, load_embedding_model,
                                  save_embeddings)

    prepare_output_file(embeddings_file(args.output), "--output")
    model = load_embedding_model(args.model, backbone=args.backbone, device=args.device)
    paths = collect_images(args.images)
    emb = model.embed_paths(paths, batch_size=args.batch_size, flip=not args.no_flip,
                            workers=args.workers)
    npy, listing = save_embeddings(args.output, emb, paths)
    print(f"{model.describe()}\nwrote {npy} [{emb.shape[0]}, {emb.shape[1]}] and {listing}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ekd.deploy.embedding_model import load_embedding_model, read_threshold

    info: dict = {}
    if args.threshold is not None:
        if args.thresholds or args.fpr is not None:
            raise ConfigError("give either --threshold or --fpr with --thresholds, not both")
        threshold, why = args.threshold, "given with --threshold"
    elif args.thresholds and args.fpr is not None:
        threshold, info = read_threshold(args.thresholds, args.fpr, args.set, args.label)
        why = f"FPR {info['fpr']} on set {info['set']!r} of {info['file']}"
    elif args.thresholds:
        raise ConfigError("--thresholds needs --fpr (1e-3, 1e-4 or 1e-5, as stored by ekd eval)")
    else:
        raise ConfigError("choose the decision threshold: --threshold T, or --fpr 1e-4 "
                          "--thresholds RUN/metrics.json (written by ekd eval --out RUN)")
    model = load_embedding_model(args.model, backbone=args.backbone, device=args.device)
    if info.get("backbone") and model.backbone and info["backbone"] != model.backbone:
        print(f"warning: the thresholds were measured with backbone {info['backbone']}, this "
              f"model is {model.backbone}; a threshold only holds for the model it was measured "
              "with", file=sys.stderr)
    emb = model.embed_paths([args.image_a, args.image_b], batch_size=2, progress=False)
    score = float(emb[0] @ emb[1])
    decision = "SAME" if score >= threshold else "DIFFERENT"
    print(f"{args.image_a}  {args.image_b}\ncosine similarity: {score:.6f}\n"
          f"threshold: {threshold:.6f} ({why})\ndecision: {decision}")
    return 0


def add_deploy_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export``, ``stats``, ``embed`` and ``verify``."""
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX (dynamic batch)")
    p.add_argument("checkpoint", help="ekd checkpoint or arcface_torch backbone.pth")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--backbone", help="architecture of a bare state_dict, e.g. iresnet50")
    p.add_argument("--fp16", action="store_true",
                   help="half-precision weights and compute (float32 input/output)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    p.add_argument("--check", action="store_true",
                   help="compare onnxruntime with PyTorch on random inputs at batch 1 and 32")
    p.add_argument("--int8", action="store_true",
                   help="INT8 model (onnxruntime static quantization, QDQ, per-channel weights) "
                        "calibrated on --calib; prints fp32-vs-INT8 parity on held-back images")
    p.add_argument("--calib", metavar="FOLDER",
                   help="aligned face crops for INT8 calibration (searched recursively)")
    p.add_argument("--calib-size", type=int, default=256,
                   help="calibration images drawn from --calib (default 256; up to 64 others "
                        "are held back for the parity check)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("stats", help="parameters, MACs, embedding size, CPU latency")
    p.add_argument("model", nargs="+",
                   help="checkpoint file(s), .onnx file(s) (fp32, fp16 or INT8) or backbone "
                        "name(s), e.g. iresnet50")
    p.add_argument("--backbone", help="architecture of a bare state_dict")
    p.add_argument("--input-size", type=int, help="input side for backbone names (default 112)")
    p.add_argument("--embedding-size", type=int, help="embedding size for backbone names (512)")
    p.add_argument("--batch-sizes", default="1,64", help="latency batch sizes (default 1,64)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed runs per batch size (median and 25th-75th percentile)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=_cmd_stats)

    p = subparsers.add_parser("embed", help="embed aligned face images (checkpoint or ONNX)")
    p.add_argument("--model", required=True, help="ekd checkpoint, backbone.pth or .onnx")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True,
                   help="output .npy; the image paths go to <name>.paths.txt beside it")
    p.add_argument("--backbone", help="architecture of a bare state_dict")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image loading processes")
    p.add_argument("--no-flip", action="store_true",
                   help="no mirror-image sum (ekd eval and verify use it)")
    p.add_argument("--device", default="cpu", help="PyTorch models: cpu, cuda or auto")
    p.set_defaults(func=_cmd_embed)

    p = subparsers.add_parser("verify", help="are two aligned face images the same person?")
    p.add_argument("--model", required=True, help="ekd checkpoint, backbone.pth or .onnx")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--threshold", type=float, help="explicit cosine-similarity threshold")
    p.add_argument("--fpr", help="target false positive rate: 1e-3, 1e-4 or 1e-5")
    p.add_argument("--thresholds",
                   help="metrics.json (or its run folder) written by ekd eval --out")
    p.add_argument("--set", help="evaluation set whose threshold to use (if several)")
    p.add_argument("--label", help="model label in metrics.json (if several models)")
    p.add_argument("--backbone", help="architecture of a bare state_dict")
    p.add_argument("--device", default="cpu", help="PyTorch models: cpu, cuda or auto")
    p.set_defaults(func=_cmd_verify)
