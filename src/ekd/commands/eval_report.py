"""Evaluate saved models on verification sets and write reports (``ekd eval``, the demo)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ekd.errors import CheckpointError, ConfigError, DataError
from ekd.eval.evaluate import (VerificationSet, bin_set, evaluate_ijb, folder_set, format_value,
                               fpr_key, pairs_set)
from ekd.eval.protocols import read_lfw_pairs, read_pair_list
from ekd.models import count_parameters
from ekd.models.loading import LoadedModel, load_model
from ekd.utils.device import resolve_device

TABLE_FPRS = (1e-2, 1e-3, 1e-4, 1e-5)
KINDS = ("pairs", "lfw", "folder", "bin", "cfp", "ijb")


def _public(obj: object) -> object:
    """``obj`` without dict keys starting with ``_`` (ROC points, raw scores), recursively."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    return obj


def verification_set(kind: str, target: str, root: str | None, opts: dict,
                     max_per_identity: int | None, input_size: int) -> VerificationSet:
    """The :class:`VerificationSet` of a pair-based set kind (all but ``ijb``)."""
    if kind == "pairs":
        return pairs_set(read_pair_list(Path(target), Path(root) if root else None), input_size)
    if kind == "lfw":
        if not root:
            raise ConfigError("LFW pairs need the images folder (--lfw-root)")
        return pairs_set(read_lfw_pairs(Path(target), Path(root)), input_size)
    if kind == "folder":
        return folder_set(target, input_size, max_per_identity=max_per_identity)
    if kind == "bin":
        return bin_set(target, input_size, color=opts.get("color", "rgb"))
    if kind == "cfp":
        from ekd.eval.cfp import read_cfp_pairs

        return pairs_set(read_cfp_pairs(target, opts.get("split", "FP"), opts.get("folds")), input_size)
    raise ConfigError(f"unknown evaluation set kind {kind!r}; valid: {', '.join(KINDS)}")


def _evaluate_set(model: nn.Module, kind: str, target: str, root: str | None, opts: dict,
                  max_per_identity: int | None, common: dict) -> dict:
    if kind == "ijb":
        return evaluate_ijb(model, target, **opts, **common)
    vset = verification_set(kind, target, root, opts, max_per_identity, common["input_size"])
    res = vset.evaluate(model, common["batch_size"], common["device"], common["progress"])
    if kind == "lfw":
        res["protocol"] = "LFW View-2 pairs.txt, " + res["protocol"]
    if kind == "cfp":
        split, folds = opts.get("split", "FP"), opts.get("folds")
        res["protocol"] = (f"CFP-{split} folds {'all' if folds is None else list(folds)}, same/diff "
                           "interleaved, 10 contiguous folds (InsightFace verification.py)")
    return res


def check_inputs(models: list[str], sets: dict[str, tuple]) -> None:
    """Fail before any embedding work when a model file or a set's file/folder is missing."""
    for model in models:
        if not Path(model).is_file():
            raise CheckpointError(f"model file not found: {model}"
                                  + (" (it is a folder)" if Path(model).is_dir() else ""))
    for name, spec in sets.items():
        kind, target, root = spec[:3]
        for what, path in (("", target), (" images folder", root)):
            if path and not Path(path).exists():
                raise DataError(f"set {name!r} ({kind}){what} not found: {path}")


def _load(path: str | Path, backbone: str | None) -> LoadedModel:
    """A checkpoint, or an ``.onnx`` file (fp32, fp16, INT8) run with onnxruntime on the CPU."""
    if Path(path).suffix.lower() != ".onnx":
        return load_model(path, backbone=backbone, backbone_hint="--backbone")
    from ekd.deploy.embedding_model import OnnxBackbone, OnnxEmbeddingModel

    onnx = OnnxEmbeddingModel(path)
    return LoadedModel(OnnxBackbone(onnx), onnx.backbone or "onnx", onnx.embedding_size,
                       onnx.input_size)


def _short(path: str | Path) -> str:
    """``run/model.pt``: a model file named with its folder (runs all save ``model.pt``)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def evaluate_checkpoint(path: str | Path, sets: dict[str, tuple],
                        backbone: str | None = None, max_per_identity: int | None = 10,
                        batch_size: int = 128, device: str = "auto", progress: bool = True,
                        label: str | None = None) -> dict:
    """Evaluate one model file on named sets ``{name: (kind, path, root[, options])}``.

    ``kind`` is ``pairs`` (generic list), ``lfw`` (View-2 ``pairs.txt``, root = images folder),
    ``folder`` (all pairs over an identity folder), ``bin`` (InsightFace ``.bin``; option
    ``color``), ``cfp`` (CFP folder; options ``split`` FF/FP, ``folds`` list or None = all) or
    ``ijb`` (IJB folder with ``meta/`` and ``loose_crop/``; options ``target``, ``one_to_n``,
    ``use_norm_score``, ``use_detector_score``, ``use_flip_test``). Each set's results keep a
    private ``_roc`` entry for :func:`write_report`'s plots. ``label`` names the model on the
    progress bars (default: its folder and file name).
    """
    loaded = _load(path, backbone)
    dev = resolve_device(device)
    model = loaded.model.to(dev)
    params = getattr(model, "parameter_count", None) or count_parameters(model)
    out: dict = {"model": str(path), "backbone": loaded.backbone, "parameters": params,
                 "input_size": loaded.input_size, "sets": {}}
    for name, spec in sets.items():
        if not 3 <= len(spec) <= 4:
            raise ConfigError(f"set {name!r}: expected (kind, path, root[, options]), got {spec!r}")
        kind, target, root = spec[:3]
        opts = dict(spec[3]) if len(spec) == 4 and spec[3] else {}
        bar = f"embedding {label or _short(path)} on {name}" if progress else False
        common = dict(input_size=loaded.input_size, batch_size=batch_size, device=dev, progress=bar)
        out["sets"][name] = _evaluate_set(model, kind, target, root, opts, max_per_identity, common)
    return out


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (model, set): parameters, 10-fold accuracy, AUC, TPR at FPR; then a 1:N table
    (IJB) when any set has one, and the protocol variant of every set."""
    head = ["model", "set", "params (M)", "accuracy", "AUC"] + [fpr_key(f).upper().replace("TPR@", "TPR@FPR=")
                                                               for f in TABLE_FPRS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, res in results.items():
        for set_name, m in res["sets"].items():
            acc = "n/a" if "accuracy" not in m else f"{m['accuracy']:.4f} ± {m['accuracy_std']:.4f}"
            row = [label, set_name, f"{res['parameters'] / 1e6:.2f}", acc, format_value(m["auc"])]
            row += [format_value(m.get(fpr_key(f))) for f in TABLE_FPRS]
            lines.append("| " + " | ".join(row) + " |")
    ident = [(label, s, m["1:N"]) for label, res in results.items()
             for s, m in res["sets"].items() if "1:N" in m]
    if ident:
        lines += ["", "| model | set | gallery | top-1 | top-5 | top-10 | TPIR@FPIR=1e-2 | "
                  "TPIR@FPIR=1e-1 |", "|" + "---|" * 8]
        for label, set_name, r in ident:
            for gal, m in [("combined", r)] + [("mean of 2", r["mean_over_galleries"])]:
                row = [label, set_name, gal] + [format_value(m.get(k)) for k in
                                                ("top1", "top5", "top10", "tpir@1e-2", "tpir@1e-1")]
                lines.append("| " + " | ".join(row) + " |")
    protocols = {s: m["protocol"] for res in results.values() for s, m in res["sets"].items()
                 if "protocol" in m}
    if protocols:
        lines += ["", "Protocols:"] + [f"- {s}: {p}" for s, p in protocols.items()]
    return "\n".join(lines)


def save_report(out_dir: Path, files: dict[str, str], results: dict[str, dict], plots: bool) -> None:
    """Write ``files`` (name -> text) into ``out_dir`` and, with ``plots``, one ROC PNG per set
    of ``results`` (``roc_<set>.png``, every model on it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text)
    if plots:
        from ekd.eval.plots import write_roc_plots

        write_roc_plots(results, out_dir)


def write_report(results: dict[str, dict], out_dir: Path | None, plots: bool = False) -> str:
    """Write ``metrics.json`` (without the private ``_`` entries) and ``results.md`` (when
    ``out_dir``), and with ``plots`` one ROC PNG per set (``roc_<set>.png``); return the table."""
    table = markdown_table(results)
    if out_dir is not None:
        save_report(out_dir, {"metrics.json": json.dumps(_public(results), indent=1),
                              "results.md": table + "\n"}, results, plots)
    return table
