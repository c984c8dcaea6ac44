"""``ekd compare``: is a model really better than another, at the FPR one runs at?

Every model (ekd checkpoint, arcface_torch ``backbone.pth`` or ``.onnx``) is embedded once per
set and gets ``ekd eval``'s metrics. For each later model and each TPR@FPR, the paired
difference to the first model is resampled over *identities* with the benchmark's bootstrap
(:mod:`ekd.eval.bootstrap`: the same identity draws for both models, so what they share
cancels): the 95% percentile interval gives the verdict ``better`` / ``worse`` (interval above
/ below 0) or ``within noise``. On a pair list (LFW View-2, CFP, a pair file whose folders name
identities) the 10-fold accuracy and the AUC get intervals too, from the same identity draws
(:func:`ekd.eval.bootstrap.bootstrap_pair_metrics`); on an all-pairs set (an identity folder)
the bootstrap keeps only the impostor tail, so only TPR at FPR gets one. Sets that name no
identities (``.bin``) get metrics only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ekd.commands.eval_report import KINDS, _public, markdown_table, save_report, verification_set
from ekd.errors import ConfigError, DataError
from ekd.eval.bootstrap import (bootstrap_pair_metrics, interval, paired_difference, verdict,
                                weighted_tpr_at_fpr)
from ekd.eval.evaluate import VerificationSet, fpr_key
from ekd.eval.flip_embed import embed_dataset
from ekd.models import count_parameters
from ekd.models.loading import load_model
from ekd.utils.device import resolve_device

__all__ = ["compare_models", "compare_report", "COMPARE_FPRS"]

COMPARE_FPRS = (1e-2, 1e-3, 1e-4)
TAIL_FACTORS = (4.0, 16.0, 64.0, float("inf"))  # a longer tail when a resample needs it


@dataclass
class _Model:
    label: str
    path: str
    module: nn.Module
    input_size: int
    backbone: str


class _OnnxModule(nn.Module):
    """An ONNX model as a module taking ekd-normalised images (:class:`OnnxTeacher`)."""

    def __init__(self, path: str, device: torch.device) -> None:
        super().__init__()
        import onnxruntime

        from ekd.teachers.onnx import OnnxTeacher

        shape = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].shape
        size = shape[2] if len(shape) == 4 and isinstance(shape[2], int) else 112
        self.teacher = OnnxTeacher(path, size, device=device)
        self.input_size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.embed(images, None, None)


def _load(label: str, path: str, backbone: str | None, device: torch.device) -> _Model:
    if str(path).endswith(".onnx"):
        onnx = _OnnxModule(path, device)
        return _Model(label, path, onnx, onnx.input_size, "onnx")
    loaded = load_model(path, backbone=backbone, backbone_hint="--backbone")
    return _Model(label, path, loaded.model.to(device), loaded.input_size, loaded.backbone)


def _paired(vset: VerificationSet, emb: np.ndarray, ref: np.ndarray, fprs: tuple[float, ...],
            resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-set TPR difference ``[F]`` and identity-bootstrap samples ``[R, F]`` of it."""
    assert vset.tail is not None
    for factor in TAIL_FACTORS:
        a, b = vset.tail(emb, max(fprs), factor), vset.tail(ref, max(fprs), factor)
        try:
            samples = paired_difference(a, b, fprs, resamples, seed)
        except DataError as exc:
            if "longer tail" in str(exc) and factor != TAIL_FACTORS[-1]:
                continue
            raise
        ones = np.ones((1, a.num_identities), dtype=np.int64)  # every identity once: the set itself
        point = weighted_tpr_at_fpr(a, ones, fprs)[0] - weighted_tpr_at_fpr(b, ones, fprs)[0]
        return point, samples
    raise AssertionError("unreachable")


def compare_models(models: list[str], labels: list[str], sets: dict[str, tuple],
                   fprs: tuple[float, ...] = COMPARE_FPRS, resamples: int = 1000, seed: int = 0,
                   backbone: str | None = None, max_per_identity: int | None = 10,
                   batch_size: int = 128, device: str = "auto", progress: bool = True) -> dict:
    """``ekd eval``'s metrics of every model and, per later model, set and FPR, the paired
    difference to the first model with its 95% identity-bootstrap interval and verdict."""
    if len(models) < 2:
        raise ConfigError("ekd compare needs at least two models (the first is the reference)")
    if resamples < 1:
        raise ConfigError(f"--resamples must be at least 1, got {resamples}")
    if any(not 0 < f < 1 for f in fprs):
        raise ConfigError(f"--fprs must lie in (0, 1), got {', '.join(map(str, fprs))}")
    for name, spec in sets.items():
        if spec[0] not in KINDS or spec[0] == "ijb":
            raise ConfigError(f"set {name!r}: ekd compare takes pair lists, LFW, CFP, folders and "
                              f".bin files (IJB: use ekd eval)")
    dev = resolve_device(device)
    loaded = [_load(label, path, backbone, dev) for label, path in zip(labels, models)]
    results: dict = {}
    embeddings: dict[tuple[str, str], np.ndarray] = {}
    vsets: dict[tuple[str, int], VerificationSet] = {}
    bar = tqdm(total=len(loaded) * len(sets), unit="set", disable=not progress, dynamic_ncols=True)
    with bar:
        for m in loaded:
            res = results[m.label] = {"model": m.path, "backbone": m.backbone,
                                      "parameters": count_parameters(m.module), "input_size": m.input_size,
                                      "sets": {}}
            for name, spec in sets.items():
                bar.set_description(f"embedding {m.label} on {name}")
                kind, target, root = spec[:3]
                opts = dict(spec[3]) if len(spec) == 4 and spec[3] else {}
                key = (name, m.input_size)
                if key not in vsets:
                    vsets[key] = verification_set(kind, target, root, opts, max_per_identity, m.input_size)
                emb = embed_dataset(m.module, vsets[key].dataset, batch_size, dev)  # once per model and set
                res["sets"][name] = vsets[key].score(emb)
                embeddings[(m.label, name)] = emb
                bar.update()
    reference = loaded[0]
    differences: dict = {}
    for m in loaded[1:]:
        for name in sets:
            vset = vsets[(name, m.input_size)]
            rows = differences.setdefault(m.label, {}).setdefault(name, {})
            if vset.tail is None:
                rows["note"] = "no identities in this set: metrics only, no interval"
                continue
            point, samples = _paired(vset, embeddings[(m.label, name)], embeddings[(reference.label, name)],
                                     tuple(fprs), resamples, seed)
            bounds = interval(samples)
            for f, d, (low, high) in zip(fprs, point, bounds):
                rows[fpr_key(f)] = _row(d, low, high)
            if vset.pair_scores is not None:  # a pair list: accuracy and AUC too
                mine, ref = (vset.pair_scores(embeddings[(label, name)]) for label in (m.label, reference.label))
                drawn, ref_drawn = bootstrap_pair_metrics(mine, resamples, seed), bootstrap_pair_metrics(ref, resamples, seed)
                for metric in ("accuracy", "auc"):
                    low, high = interval(drawn[metric] - ref_drawn[metric])
                    rows[metric] = _row(results[m.label]["sets"][name][metric]
                                        - results[reference.label]["sets"][name][metric], low, high)
    return {"reference": reference.label, "resamples": resamples, "seed": seed,
            "fprs": list(fprs), "level": 0.95, "models": results, "differences": differences}


def _row(difference: float, low: float, high: float) -> dict:
    """One metric's paired difference, its interval and verdict (None where not measurable)."""
    def value(v: float) -> float | None:
        return None if np.isnan(v) else float(v)
    return {"difference": value(difference), "low": value(low), "high": value(high),
            "verdict": verdict(low, high)}


def _fmt(v: float | None, sign: bool = False) -> str:
    return "n/a" if v is None else f"{v:+.4f}" if sign else f"{v:.4f}"


def compare_table(report: dict) -> str:
    """Markdown: ``ekd eval``'s table of every model, then the paired differences."""
    ref = report["reference"]
    lines = [markdown_table(report["models"]), "",
             f"Paired difference to {ref} (95% interval over {report['resamples']} identity "
             f"resamples, seed {report['seed']}):", "",
             "| model | set | metric | difference | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for label, by_set in report["differences"].items():
        for name, rows in by_set.items():
            if "note" in rows:
                lines.append(f"| {label} | {name} | - | - | - | {rows['note']} |")
                continue
            for metric, r in rows.items():
                lines.append(f"| {label} | {name} | {metric.upper()} | {_fmt(r['difference'], True)} | "
                             f"[{_fmt(r['low'], True)}, {_fmt(r['high'], True)}] | {r['verdict']} |")
    return "\n".join(lines)


def compare_report(report: dict, out_dir: Path | None, plots: bool = True) -> str:
    """Write ``compare.json``, ``compare.md`` and ``roc_<set>.png`` (every model on one plot
    per set) into ``out_dir`` when given; return the Markdown."""
    text = compare_table(report)
    if out_dir is not None:
        save_report(out_dir, {"compare.json": json.dumps(_public(report), indent=1),
                              "compare.md": text + "\n"}, report["models"], plots)
    return text
