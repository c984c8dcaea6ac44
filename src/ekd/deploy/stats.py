"""Model statistics for deployment: parameters, MACs, embedding size and CPU latency.

MACs come from PyTorch's own FLOP counter (:class:`torch.utils.flop_counter.FlopCounterMode`,
which counts convolutions and matrix products) as FLOPs / 2 for one image; batch norm, PReLU and
additions are not counted, as in the usual "MACs" of face-recognition papers. Latency is the
median wall time of repeated forward passes in ``torch.inference_mode`` on the CPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ekd.errors import ConfigError
from ekd.models import BACKBONES, build_backbone, count_parameters

__all__ = ["ModelStats", "count_macs", "measure_latency", "model_stats", "resolve_model",
           "stats_table"]


@dataclass
class ModelStats:
    """Statistics of one model at one input size (latency in ms per batch, median)."""

    name: str
    backbone: str
    input_size: int
    embedding_size: int
    parameters: int
    macs: int
    latency_ms: dict[int, float] = field(default_factory=dict)
    repeats: int = 0
    threads: int = 1
    device: str = "cpu"
    file: str = ""  # the model file measured; "" for a backbone built from its name

    def to_dict(self) -> dict:
        """JSON-ready dict (latency keys as strings)."""
        out = asdict(self)
        out["latency_ms"] = {str(b): ms for b, ms in self.latency_ms.items()}
        return out


def _dummy(batch: int, input_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, input_size, input_size, generator=gen) * 2 - 1


def _eval_mode(model: nn.Module):
    """Put ``model`` in eval mode and return a function restoring each module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()

    def restore() -> None:
        for m, was_training in modes:
            m.training = was_training
    return restore


def count_macs(model: nn.Module, input_size: int) -> tuple[int, int]:
    """``(MACs, embedding_size)`` of one ``input_size`` image through ``model`` (FLOPs / 2)."""
    restore = _eval_mode(model)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.inference_mode():
            out = model(_dummy(1, input_size))
    finally:
        restore()
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ConfigError(f"model must return a [batch, D] embedding, got "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)}")
    return counter.get_total_flops() // 2, int(out.shape[1])


def measure_latency(model: nn.Module, input_size: int, batch_size: int, repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median wall time (ms) of ``repeats`` CPU forward passes of a ``batch_size`` batch."""
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"latency needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    x = _dummy(batch_size, input_size)
    restore = _eval_mode(model)
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    finally:
        restore()
    return float(statistics.median(times))


def model_stats(model: nn.Module, input_size: int, name: str | None = None,
                backbone: str = "", batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 10,
                warmup: int = 2, file: str = "") -> ModelStats:
    """Parameters, MACs, embedding size and median CPU latency at each batch size."""
    model = model.cpu().float()
    macs, emb = count_macs(model, input_size)
    stats = ModelStats(name or backbone or type(model).__name__, backbone, int(input_size), emb,
                       count_parameters(model), int(macs), repeats=repeats,
                       threads=torch.get_num_threads(), file=str(file))
    for b in batch_sizes:
        stats.latency_ms[int(b)] = measure_latency(model, input_size, int(b), repeats, warmup)
    return stats


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
    from the backbone name, random weights)."""
    batches = sorted({b for r in rows for b in r.latency_ms})
    head = ["backbone", "file", "input", "params (M)", "MACs (G)", "embedding"]
    head += [f"CPU ms @ batch {b}" + (" (per image)" if b > 1 else "") for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.backbone or r.name, r.file or "-", f"{r.input_size}x{r.input_size}",
                 f"{r.parameters / 1e6:.2f}", f"{r.macs / 1e9:.3f}", str(r.embedding_size)]
        for b in batches:
            ms = r.latency_ms.get(b)
            cells.append("n/a" if ms is None else
                         f"{ms:.1f}" + (f" ({ms / b:.2f})" if b > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
