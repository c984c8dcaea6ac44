"""Evaluate saved models on verification sets and write reports (``ekd eval``, the demo)."""

from __future__ import annotations

import json
from pathlib import Path

from ekd.engine.teacher import load_model
from ekd.engine.trainer import resolve_device
from ekd.errors import ConfigError
from ekd.eval.evaluate import evaluate_folder, evaluate_pairs, format_value, fpr_key
from ekd.eval.protocols import read_lfw_pairs, read_pair_list
from ekd.models import count_parameters

TABLE_FPRS = (1e-2, 1e-3, 1e-4, 1e-5)


def evaluate_checkpoint(path: str | Path, sets: dict[str, tuple[str, str, str | None]],
                        backbone: str | None = None, max_per_identity: int | None = 10,
                        batch_size: int = 128, device: str = "auto", progress: bool = True) -> dict:
    """Evaluate one model file on named sets ``{name: (kind, path, root)}``.

    ``kind`` is ``pairs`` (generic list), ``lfw`` (View-2 ``pairs.txt``, root = images folder)
    or ``folder`` (all pairs over an identity folder).
    """
    loaded = load_model(path, backbone=backbone)
    dev = resolve_device(device)
    model = loaded.model.to(dev)
    out: dict = {"model": str(path), "backbone": loaded.backbone,
                 "parameters": count_parameters(model), "input_size": loaded.input_size, "sets": {}}
    for name, (kind, target, root) in sets.items():
        common = dict(input_size=loaded.input_size, batch_size=batch_size, device=dev, progress=progress)
        if kind == "pairs":
            pairs = read_pair_list(Path(target), Path(root) if root else None)
            out["sets"][name] = evaluate_pairs(model, pairs, **common)
        elif kind == "lfw":
            if not root:
                raise ConfigError("LFW pairs need the images folder (--lfw-root)")
            out["sets"][name] = evaluate_pairs(model, read_lfw_pairs(Path(target), Path(root)), **common)
        elif kind == "folder":
            out["sets"][name] = evaluate_folder(model, target, max_per_identity=max_per_identity, **common)
        else:
            raise ConfigError(f"unknown evaluation set kind {kind!r}; valid: pairs, lfw, folder")
    return out


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (model, set): parameters, 10-fold accuracy, AUC, TPR at FPR."""
    head = ["model", "set", "params (M)", "accuracy", "AUC"] + [fpr_key(f).upper().replace("TPR@", "TPR@FPR=")
                                                               for f in TABLE_FPRS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, res in results.items():
        for set_name, m in res["sets"].items():
            acc = "n/a" if "accuracy" not in m else f"{m['accuracy']:.4f} ± {m['accuracy_std']:.4f}"
            row = [label, set_name, f"{res['parameters'] / 1e6:.2f}", acc, format_value(m["auc"])]
            row += [format_value(m.get(fpr_key(f))) for f in TABLE_FPRS]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, dict], out_dir: Path | None) -> str:
    """Write ``metrics.json`` and ``results.md`` (when ``out_dir``); return the table."""
    table = markdown_table(results)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
        (out_dir / "results.md").write_text(table + "\n")
    return table
