"""Command line: ``ekd train``, ``eval``, ``teacher-cache``, ``demo``, ``diagnose`` here; ``data``
in :mod:`ekd.commands.cli_data`; ``export``, ``stats``, ``embed``, ``verify`` in
:mod:`ekd.commands.cli_deploy`. Only argument wiring lives here."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import warnings
from pathlib import Path

from ekd.errors import ConfigError, EkdError, user_message
from ekd.output_paths import prepare_output_dir


def _cmd_train(args: argparse.Namespace) -> int:
    from ekd.engine.preflight import load_checked_config
    from ekd.engine.trainer import train

    overrides = [*args.set, "train.overwrite=true"] if args.overwrite else args.set
    cfg = load_checked_config(args.config, overrides)
    prepare_output_dir(cfg.train.output_dir, "train.output_dir")
    result = train(cfg)
    if result.interrupted:  # Ctrl-C: a resumable checkpoint, no model
        kept = [s for s in args.set if not s.startswith("train.resume=")]
        again = shlex.join(["ekd", "train", args.config, *(a for s in kept for a in ("--set", s))])
        print(f"ekd train: interrupted; resumable checkpoint {result.checkpoint_path} "
              f"(no model written); resume with: {again} --set train.resume=auto", file=sys.stderr)
        return 130
    print(f"run directory: {result.run_dir}\nmodel: {result.model_path}")
    return 0


def _sets_from_args(args: argparse.Namespace) -> dict[str, tuple]:
    """The evaluation sets of ``ekd eval`` / ``ekd compare`` (:func:`_add_set_arguments`)."""
    sets: dict[str, tuple] = {}
    if args.pairs:
        sets["pairs"] = ("pairs", args.pairs, args.pairs_root)
    if args.lfw_pairs:
        sets["lfw"] = ("lfw", args.lfw_pairs, args.lfw_root)
    if args.folder:
        sets["all-pairs"] = ("folder", args.folder, None)
    for path in args.bin or []:
        sets[Path(path).stem] = ("bin", path, None, {"color": args.bin_color})
    if args.cfp:
        try:
            folds = None if args.cfp_folds == "all" else [int(f) for f in args.cfp_folds.split(",")]
        except ValueError:
            raise EkdError(f"--cfp-folds: expected 'all' or numbers like 9,10, "
                           f"got {args.cfp_folds!r}") from None
        for split in ("FF", "FP"):
            sets[f"cfp_{split.lower()}"] = ("cfp", args.cfp, None, {"split": split, "folds": folds})
    if args.ijb:
        sets[f"{args.ijb_target} 1:1"] = ("ijb", args.ijb, None, {
            "target": args.ijb_target, "one_to_n": args.ijb_1n,
            "use_norm_score": not args.ijb_no_norm_score,
            "use_detector_score": not args.ijb_no_detector_score,
            "use_flip_test": not args.ijb_no_flip})
    if not sets:
        raise EkdError("give at least one of --pairs, --lfw-pairs, --folder, --bin, "
                       "--cfp, --ijb")
    return sets


def _outputs_sets_labels(args: argparse.Namespace, models: list[str],
                         what: str) -> tuple[Path | None, dict[str, tuple], list[str]]:
    """``--out`` (checked), the sets and one label per model (``--label`` or the paths)."""
    out = prepare_output_dir(args.out) if args.out else None
    sets = _sets_from_args(args)
    labels = args.label or models
    if len(labels) != len(models):
        raise EkdError(f"{len(labels)} --label for {len(models)} {what}")
    return out, sets, labels


def _cmd_eval(args: argparse.Namespace) -> int:
    from ekd.commands.eval_report import check_inputs, evaluate_checkpoint, write_report

    out, sets, labels = _outputs_sets_labels(args, args.model, "--model")
    if args.plots and not args.out:
        raise EkdError("--plots needs --out")
    check_inputs(args.model, sets)
    from ekd.utils import distributed
    from ekd.utils.device import resolve_device

    info = distributed.init_distributed(resolve_device(args.device).type)  # torchrun: embeddings sharded
    try:
        results = {}
        for label, model in zip(labels, args.model):
            results[label] = evaluate_checkpoint(model, sets, backbone=args.backbone,
                                                 max_per_identity=args.max_per_identity,
                                                 batch_size=args.batch_size, device=args.device,
                                                 progress=info.is_main,
                                                 label=label if args.label else None)
        if info.is_main:
            print(write_report(results, out, plots=args.plots))
    finally:
        distributed.shutdown()
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ekd.commands.compare import compare_models, compare_report
    from ekd.commands.eval_report import check_inputs

    out, sets, labels = _outputs_sets_labels(args, args.models, "models")
    try:
        fprs = tuple(float(f) for f in args.fprs.split(","))
    except ValueError:
        raise EkdError(f"--fprs: expected numbers like 1e-3,1e-4, got {args.fprs!r}") from None
    check_inputs(args.models, sets)
    report = compare_models(args.models, labels, sets, fprs=fprs, resamples=args.resamples,
                            seed=args.seed, backbone=args.backbone,
                            max_per_identity=args.max_per_identity, batch_size=args.batch_size,
                            device=args.device)
    print(compare_report(report, out))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ekd.commands.demo import run_demo

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    run_demo(prepare_output_dir(args.out), quick=args.quick, device=args.device, jobs=args.jobs)
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from ekd.commands.diagnostics_report import diagnose

    out = prepare_output_dir(args.out) if args.out else None
    print(diagnose(args.run_dir, out, plots=not args.no_plots).text())
    return 0


def _cmd_teacher_cache(args: argparse.Namespace) -> int:
    from ekd.utils.distributed import env_info
    from ekd.teachers.cache import TeacherCache
    from ekd.teachers.cache_builder import cache_for_data

    out = cache_for_data(args.data, args.input_size, prepare_output_dir(args.out), teacher=args.teacher,
                         backbone=args.backbone, from_npz=args.from_npz, batch_size=args.batch_size,
                         device=args.device, data_kind=args.data_kind, num_workers=args.num_workers,
                         chunk_batches=args.chunk_batches, on_corrupt=args.on_corrupt)
    if env_info().is_main:
        TeacherCache(out)  # complete and readable
        print(f"teacher cache written to {out}; train with --set teacher.kind=cache "
              f"--set teacher.path={out}")
    return 0


class _OneLineHelp(argparse.HelpFormatter):
    """Every command and its help on one line (room for the longest name, ``teacher-cache``)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog)
        self._action_max_length = 18


DESCRIPTION = ("Evaluation-oriented Knowledge Distillation (EKD, CVPR 2022) for face recognition: "
               "train, evaluate and deploy face models.")


def _add_set_arguments(p: argparse.ArgumentParser) -> None:
    """The set options shared by ``ekd eval`` and ``ekd compare``."""
    p.add_argument("--backbone", help="architecture of bare state_dict files, e.g. iresnet50")
    p.add_argument("--pairs", help="generic pair list: 'path1 path2 label' per line")
    p.add_argument("--pairs-root", help="folder the pair list's paths are relative to")
    p.add_argument("--lfw-pairs", help="LFW View-2 pairs.txt")
    p.add_argument("--lfw-root", help="LFW images folder (<root>/<Name>/<Name>_NNNN.jpg)")
    p.add_argument("--folder", help="identity folder for all-pairs verification")
    p.add_argument("--max-per-identity", type=int, default=10,
                   help="all-pairs: first N images per identity (default 10)")
    p.add_argument("--bin", action="append", help="InsightFace verification .bin (repeatable)")
    p.add_argument("--bin-color", choices=("rgb", "bgr"), default="rgb",
                   help="channel order fed to the model from .bin images (default rgb, as InsightFace)")
    p.add_argument("--cfp", help="CFP folder (with Protocol/ and Data/): CFP-FF and CFP-FP")
    p.add_argument("--cfp-folds", default="all", help="'all' (default) or e.g. '10' or '9,10'")
    p.add_argument("--ijb", help="IJB-B/C folder with meta/ and loose_crop/")
    p.add_argument("--ijb-target", choices=("IJBB", "IJBC"), default="IJBC")
    p.add_argument("--ijb-1n", action="store_true", help="also run IJB 1:N identification")
    p.add_argument("--ijb-no-norm-score", action="store_true",
                   help="L2-normalise image features before aggregation (InsightFace N0)")
    p.add_argument("--ijb-no-detector-score", action="store_true",
                   help="do not weight by detector score (InsightFace D0)")
    p.add_argument("--ijb-no-flip", action="store_true", help="no flip test (InsightFace F0)")


def build_parser() -> argparse.ArgumentParser:
    from ekd import __version__

    parser = argparse.ArgumentParser(
        prog="ekd", description=DESCRIPTION,
        formatter_class=_OneLineHelp,
        epilog="Run 'ekd COMMAND --help' for the options of one command; docs/ explains each.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"ekd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    _add_train_command(sub)
    _add_eval_command(sub)
    _add_compare_command(sub)
    _add_teacher_cache_command(sub)
    _add_demo_command(sub)
    _add_diagnose_command(sub)

    from ekd.commands.cli_data import add_data_commands

    add_data_commands(sub)
    from ekd.commands.cli_deploy import add_deploy_commands

    add_deploy_commands(sub)
    return parser


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a teacher or a student from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="train.output_dir holds another run: delete it and start again "
                        "(= --set train.overwrite=true)")
    p.set_defaults(func=_cmd_train)


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models on verification sets (LFW, CFP, IJB)")
    p.add_argument("--model", action="append", required=True,
                   help="ekd checkpoint, arcface_torch backbone.pth or .onnx (fp32, fp16 or INT8; "
                        "run with onnxruntime on the CPU) (repeatable)")
    _add_set_arguments(p)
    p.add_argument("--label", action="append", help="display name per --model (repeatable)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write metrics.json and results.md into this folder")
    p.add_argument("--plots", action="store_true",
                   help="also write roc_<set>.png per set into --out (needs matplotlib)")
    p.set_defaults(func=_cmd_eval)


def _add_compare_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="is a model really better? paired differences with "
                       "identity-bootstrap intervals",
                       description="Embed every model once on the sets (the options of ekd eval), "
                       "report ekd eval's metrics and, per TPR@FPR (and on pair lists per accuracy and "
                       "AUC), each model's difference to the first with a 95% interval from "
                       "resampling identities (the benchmark's bootstrap) and a verdict: better, "
                       "worse or within noise.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="ekd checkpoint, arcface_torch backbone.pth or .onnx; the first is the reference")
    _add_set_arguments(p)
    p.add_argument("--label", action="append", help="display name per model (repeatable)")
    p.add_argument("--fprs", default="1e-2,1e-3,1e-4", help="FPRs of the differences (default 1e-2,1e-3,1e-4)")
    p.add_argument("--resamples", type=int, default=1000, help="identity resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the identity draws (default 0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write compare.json, compare.md and roc_<set>.png into this folder")
    p.set_defaults(func=_cmd_compare)


def _add_teacher_cache_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher-cache", help="store a teacher's embeddings of a training set once",
                       description="Run a teacher once over a training set (identity folder or "
                       ".rec) and store its embeddings (original + mirrored) for training without "
                       "the teacher. Under torchrun each rank embeds its share; a rerun resumes an "
                       "interrupted cache.")
    p.add_argument("--data", required=True,
                   help="identity folder (root/<identity>/<image>) or InsightFace .rec (with .idx)")
    p.add_argument("--data-kind", choices=("auto", "folder", "rec"), default="auto",
                   help="auto (default): rec for a .rec/.idx or a folder holding train.rec")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--teacher", help="ekd checkpoint, arcface_torch backbone.pth or .onnx model")
    p.add_argument("--backbone", help="architecture of a bare state_dict, e.g. iresnet50")
    p.add_argument("--from-npz", help="import precomputed embeddings (arrays paths, emb, emb_flip)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--chunk-batches", type=int, default=64,
                   help="batches per resumable chunk (default 64)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--on-corrupt", choices=("skip", "error"), default="skip",
                   help="unreadable images: replaced as in training (default) or an error")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_teacher_cache)


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic faces: a teacher, students without KD, with cosine matching, AdaDistill and EKD")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a smoke run of every step (about a minute)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=None,
                   help="models trained at once, sharing the cores: the teacher beside the no-KD "
                        "students, then the distilled students (default: 2 on a CPU with 2+ cores, "
                        "1 on a GPU)")
    p.set_defaults(func=_cmd_demo)


def _add_diagnose_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="gradient shares and EKD anchors of a run, in words")
    p.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="folder for the plots (default: RUN_DIR/diagnose)")
    p.add_argument("--no-plots", action="store_true", help="print the summary only")
    p.set_defaults(func=_cmd_diagnose)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """A warning as one readable line (``warning: ...``), without the source line that raised
    it (``ekd -v`` keeps Python's format, with file and line)."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    if not args.verbose:
        warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except EkdError as exc:
        print(f"ekd {command}: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ekd {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
