"""Model statistics for deployment: parameters, MACs, embedding size and CPU latency.

MACs come from PyTorch's own FLOP counter (:func:`ekd.models.complexity.count_macs`, FLOPs / 2
for one image). Latency is the wall time of repeated forward passes on the CPU (PyTorch in
``torch.inference_mode``, or onnxruntime for ``.onnx`` files, INT8 ones included), reported as the
median and the spread (25th to 75th percentile) over the repeats: a spread wider than
:data:`BUSY_SPREAD` of the median means other work shared the CPU, and the numbers are flagged.
An ONNX file exported by ekd records its parameters and MACs (of the PyTorch model it came from)
in its metadata; for other ONNX files the parameters are the elements of its weight tensors and
the MACs are not known.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ekd.errors import ConfigError
from ekd.models import BACKBONES, build_backbone, count_parameters
from ekd.models.complexity import count_macs, dummy_images, eval_mode

__all__ = ["BUSY_SPREAD", "Latency", "ModelStats", "busy_warnings", "count_macs",
           "measure_latency", "model_stats", "onnx_stats", "resolve_model", "stats_table",
           "time_calls"]

#: Interquartile range of the repeats, relative to their median, above which the CPU was busy.
BUSY_SPREAD = 0.25


@dataclass
class Latency:
    """Wall times (ms) of the repeats of one batch size: median and 25th/75th percentiles."""

    median: float
    p25: float
    p75: float
    minimum: float
    maximum: float

    @classmethod
    def from_times(cls, times: list[float]) -> "Latency":
        """Summary of a list of wall times in ms."""
        t = np.asarray(times, dtype=np.float64)
        p25, med, p75 = np.percentile(t, [25, 50, 75])
        return cls(float(med), float(p25), float(p75), float(t.min()), float(t.max()))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75 - self.p25) / self.median if self.median > 0 else 0.0


@dataclass
class ModelStats:
    """Statistics of one model at one input size (latency in ms per batch: median, and the
    25th-75th percentile spread in ``latency_spread_ms``)."""

    name: str
    backbone: str
    input_size: int
    embedding_size: int
    parameters: int
    macs: int  # 0: not known (an ONNX file without ekd's metadata)
    latency_ms: dict[int, float] = field(default_factory=dict)
    repeats: int = 0
    threads: int = 1
    device: str = "cpu"
    file: str = ""  # the model file measured; "" for a backbone built from its name
    runtime: str = "pytorch"
    precision: str = "fp32"
    latency_spread_ms: dict[int, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (latency keys as strings)."""
        out = asdict(self)
        out["latency_ms"] = {str(b): ms for b, ms in self.latency_ms.items()}
        out["latency_spread_ms"] = {str(b): list(v) for b, v in self.latency_spread_ms.items()}
        return out

    def record(self, batch: int, latency: Latency) -> None:
        """Store the latency of one batch size."""
        self.latency_ms[int(batch)] = latency.median
        self.latency_spread_ms[int(batch)] = (latency.p25, latency.p75)


def time_calls(run: Callable[[], object], repeats: int = 10, warmup: int = 2) -> Latency:
    """Wall time (ms) of ``repeats`` calls of ``run`` after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"latency needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return Latency.from_times(times)


def _torch_latency(model: nn.Module, input_size: int, batch_size: int, repeats: int,
                   warmup: int) -> Latency:
    x = dummy_images(batch_size, input_size)
    restore = eval_mode(model)
    try:
        with torch.inference_mode():
            return time_calls(lambda: model(x), repeats, warmup)
    finally:
        restore()


def measure_latency(model: nn.Module, input_size: int, batch_size: int, repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median wall time (ms) of ``repeats`` CPU forward passes of a ``batch_size`` batch."""
    return _torch_latency(model, input_size, batch_size, repeats, warmup).median


def model_stats(model: nn.Module, input_size: int, name: str | None = None,
                backbone: str = "", batch_sizes: tuple[int, ...] = (1, 64), repeats: int = 10,
                warmup: int = 2, file: str = "") -> ModelStats:
    """Parameters, MACs, embedding size and CPU latency (median, spread) at each batch size."""
    model = model.cpu().float()
    macs, emb = count_macs(model, input_size)
    stats = ModelStats(name or backbone or type(model).__name__, backbone, int(input_size), emb,
                       count_parameters(model), int(macs), repeats=repeats,
                       threads=torch.get_num_threads(), file=str(file))
    for b in batch_sizes:
        stats.record(b, _torch_latency(model, input_size, int(b), repeats, warmup))
    return stats


def _onnx_parameters(path: Path) -> int:
    """Elements of the weight tensors of an ONNX file (quantization scales and zero points and
    1-element constants left out)."""
    import onnx

    proto = onnx.load(str(path))
    skip = ("_scale", "_zero_point")
    return int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                   if not t.name.endswith(skip) and int(np.prod(t.dims)) > 1))


def onnx_stats(path: str | Path, batch_sizes: tuple[int, ...] = (1, 64), repeats: int = 10,
               warmup: int = 2) -> ModelStats:
    """Parameters, MACs (from ekd's export metadata), embedding size and onnxruntime CPU latency
    of an ``.onnx`` file (fp32, fp16 or INT8)."""
    from ekd.deploy.embedding_model import OnnxEmbeddingModel

    path = Path(path)
    model = OnnxEmbeddingModel(path, threads=torch.get_num_threads())
    meta = model.metadata
    params = int(meta["parameters"]) if "parameters" in meta else _onnx_parameters(path)
    stats = ModelStats(path.name, model.backbone or "onnx", model.input_size,
                       model.embedding_size, params, int(meta.get("macs", 0)), repeats=repeats,
                       threads=torch.get_num_threads(), file=str(path), runtime="onnxruntime",
                       precision=meta.get("precision", "fp32"))
    for b in batch_sizes:
        x = dummy_images(int(b), model.input_size).numpy()
        stats.record(b, time_calls(lambda: model.forward(x), repeats, warmup))
    return stats


def busy_warnings(rows: list[ModelStats], limit: float = BUSY_SPREAD) -> list[str]:
    """One line per (model, batch size) whose latency spread exceeds ``limit`` of its median."""
    out = []
    for r in rows:
        for b, (lo, hi) in sorted(r.latency_spread_ms.items()):
            med = r.latency_ms[b]
            if med > 0 and (hi - lo) / med > limit:
                out.append(f"warning: {r.file or r.name} at batch {b}: latency varied "
                           f"{lo:.1f}-{hi:.1f} ms around a median of {med:.1f} ms "
                           f"(spread {(hi - lo) / med:.0%} > {limit:.0%}); the CPU looks busy "
                           "with other work, so these timings are not reliable: rerun on an idle "
                           "machine or with more --repeats")
    return out


def resolve_model(spec: str, backbone: str | None = None, input_size: int | None = None,
                  embedding_size: int | None = None) -> tuple[nn.Module, str, int]:
    """``(model, backbone, input_size)`` for a checkpoint path or a backbone name like iresnet50."""
    path = Path(spec)
    if path.is_file():
        from ekd.deploy.onnx_export import load_checkpoint

        loaded = load_checkpoint(path, backbone, embedding_size=embedding_size,
                                 input_size=input_size)
        return loaded.model, loaded.backbone, loaded.input_size
    key = spec.strip().lower()
    if key in BACKBONES:
        size = input_size or 112
        return build_backbone(key, embedding_size or 512, size), key, size
    raise ConfigError(f"{spec!r} is neither a model file nor a backbone name; backbone names: "
                      f"{', '.join(sorted(BACKBONES))}")


def stats_table(rows: list[ModelStats]) -> str:
    """A Markdown table, one row per model, labelled with its backbone and file ("-": built
    from the backbone name, random weights); latency as median [25th-75th percentile] ms."""
    batches = sorted({b for r in rows for b in r.latency_ms})
    head = ["backbone", "file", "input", "params (M)", "MACs (G)", "embedding", "runtime"]
    head += [f"CPU ms @ batch {b}" + (" (per image)" if b > 1 else "") for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.backbone or r.name, r.file or "-", f"{r.input_size}x{r.input_size}",
                 f"{r.parameters / 1e6:.2f}", f"{r.macs / 1e9:.3f}" if r.macs else "n/a",
                 str(r.embedding_size),
                 r.runtime + ("" if r.precision == "fp32" else f" {r.precision}")]
        for b in batches:
            ms = r.latency_ms.get(b)
            lo, hi = r.latency_spread_ms.get(b, (ms, ms))
            cells.append("n/a" if ms is None else f"{ms:.1f} [{lo:.1f}-{hi:.1f}]"
                         + (f" ({ms / b:.2f})" if b > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
