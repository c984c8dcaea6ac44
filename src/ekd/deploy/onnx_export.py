"""ONNX export of face backbones, with the preprocessing recorded in the model and a parity check.

The exported graph takes ``input`` (float32 ``[batch, 3, size, size]``, dynamic batch) and returns
``embedding`` (float32 ``[batch, D]``, not normalised). Its ``metadata_props`` record what a
deployment needs to feed it: input size, colour order (RGB), the normalisation
``(x / 255 - mean) / std`` with mean = std = 0.5 (InsightFace's ``(x - 127.5) / 127.5``),
embedding size, backbone and ekd version. ``fp16`` stores half-precision weights and computes in
half precision while keeping float32 input and output (``Cast`` nodes at both ends).

``onnx`` is needed to export, ``onnxruntime`` to check parity; both come with the ``onnx`` extra.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

import ekd
from ekd.errors import CheckpointError, ConfigError, EkdError
from ekd.models import count_parameters
from ekd.models.complexity import count_macs
from ekd.utils.checkpoint_io import write_atomic

__all__ = ["OPSET", "ExportResult", "export_checkpoint", "export_onnx", "load_checkpoint",
           "onnx_parity", "ort_session", "random_parity", "read_metadata", "require_onnx",
           "require_onnxruntime"]

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
#: Largest accepted max |Δ| of the L2-normalised embeddings, ONNX Runtime vs PyTorch (fp32).
FP32_TOLERANCE = 1e-4
#: The same for an fp16 export compared with the float32 PyTorch model.
FP16_TOLERANCE = 1e-2


def _require(module: str, purpose: str) -> ModuleType:
    try:
        return __import__(module)
    except ImportError as exc:
        raise EkdError(f"{purpose} needs the Python package {module!r} (the 'onnx' extra): "
                       f"pip install 'ekd[onnx]' ({exc})") from None


def require_onnx() -> ModuleType:
    """Import ``onnx`` or raise :class:`EkdError` naming the ``onnx`` extra."""
    return _require("onnx", "ONNX export")


def require_onnxruntime() -> ModuleType:
    """Import ``onnxruntime`` or raise :class:`EkdError` naming the ``onnx`` extra."""
    return _require("onnxruntime", "running an ONNX model")


def ort_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for ``path`` (CPU unless ``providers`` say otherwise).

    ``threads`` (intra-op) defaults to ``torch.get_num_threads()``, so one setting governs both.
    """
    ort = require_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    try:
        return ort.InferenceSession(str(path), opts,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CheckpointError(f"{path}: onnxruntime cannot load this model: {exc}") from None


class _HalfPrecision(nn.Module):
    """Run a half-precision module on float32 input and return float32 output."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cast in, run in fp16, cast out."""
        return self.module(x.half()).float()


def preprocessing_metadata(backbone: str, input_size: int, embedding_size: int,
                           precision: str = "fp32", parameters: int = 0,
                           macs: int = 0) -> dict[str, str]:
    """The ``metadata_props`` written into every exported model (all values are strings;
    ``parameters`` and ``macs`` of the PyTorch model, for ``ekd stats``, when known)."""
    counts = {k: str(int(v)) for k, v in (("parameters", parameters), ("macs", macs)) if v}
    return {**counts,
        "ekd_version": ekd.__version__,
        "backbone": str(backbone),
        "embedding_size": str(int(embedding_size)),
        "input_size": str(int(input_size)),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NCHW",
        "color_order": "RGB",
        "mean": ",".join(str(m) for m in MEAN),
        "std": ",".join(str(s) for s in STD),
        "normalization": "(x / 255 - mean) / std per channel, x the 8-bit RGB pixel values "
                         "(equals (x - 127.5) / 127.5)",
        "alignment": f"faces aligned to the ArcFace 5-point template, {input_size}x{input_size}",
        "precision": precision,
        "postprocess": "L2-normalise the embedding; ekd eval sums the embeddings of the image and "
                       "its horizontal mirror before normalising",
    }


def _torch_export(net: nn.Module, dummy: torch.Tensor, buf: io.BytesIO, opset: int) -> None:
    kwargs = dict(opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                  do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: no onnxscript dependency
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(net, (dummy,), buf, **kwargs)


def export_onnx(model: nn.Module, out: str | Path, *, backbone: str, input_size: int,
                fp16: bool = False, opset: int = OPSET) -> Path:
    """Export ``model`` (left unchanged) to ``out`` with a dynamic batch axis and metadata.

    The file is written atomically; returns its path.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < OPSET:
        raise ConfigError(f"ONNX opset must be an integer >= {OPSET}, got {opset!r}")
    onnx = require_onnx()
    out = Path(out)
    net = copy.deepcopy(model).cpu().float().eval()
    parameters, macs = count_parameters(net), count_macs(net, input_size)[0]
    if fp16:
        net = _HalfPrecision(net).eval()
    dummy = torch.rand(2, 3, input_size, input_size) * 2 - 1
    buf = io.BytesIO()
    try:
        _torch_export(net, dummy, buf, opset)
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise EkdError(f"ONNX export of {backbone} to {out} failed: {exc}") from exc
    proto = onnx.load_from_string(buf.getvalue())
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    embedding_size = dims[1].dim_value if len(dims) == 2 else 0
    if embedding_size < 1:
        raise EkdError(f"{backbone}: expected an output [batch, D], got {len(dims)} dimensions")
    meta = preprocessing_metadata(backbone, input_size, embedding_size, "fp16" if fp16 else "fp32",
                                  parameters, macs)
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = (f"ekd {ekd.__version__} export of {backbone}: {INPUT_NAME} float32 "
                        f"[batch, 3, {input_size}, {input_size}] RGB, (x/255-0.5)/0.5 -> "
                        f"{OUTPUT_NAME} float32 [batch, {embedding_size}]")
    onnx.checker.check_model(proto)
    return write_atomic(out, lambda fh: fh.write(proto.SerializeToString()))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (via onnxruntime, weights are not parsed twice)."""
    session = ort_session(path)
    return dict(session.get_modelmeta().custom_metadata_map)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def torch_forward(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``model(x)`` in eval mode without gradients (each module's mode restored), as numpy."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.inference_mode():
            return model(x.to(device)).float().cpu().numpy()
    finally:
        for m, was_training in modes:
            m.training = was_training


def onnx_parity(model: nn.Module, onnx_path: str | Path, images: torch.Tensor | np.ndarray,
                session=None) -> float:
    """max |Δ| of the L2-normalised embeddings of ``model`` and the ONNX model on ``images``."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"parity images must be [B, 3, H, W], got {tuple(x.shape)}")
    session = session or ort_session(onnx_path)
    ref = torch_forward(model, x)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != ref.shape:
        raise EkdError(f"{onnx_path}: output shape {got.shape} != PyTorch {ref.shape}")
    return float(np.abs(_normalise(ref) - _normalise(got)).max())


def random_parity(model: nn.Module, onnx_path: str | Path, input_size: int,
                  batch_sizes: tuple[int, ...] = (1, 32), seed: int = 0) -> dict[int, float]:
    """Parity per batch size on uniform random images in ``[-1, 1]`` (normalised pixels)."""
    gen = torch.Generator().manual_seed(seed)
    session = ort_session(onnx_path)
    return {b: onnx_parity(model, onnx_path,
                           torch.rand(b, 3, input_size, input_size, generator=gen) * 2 - 1, session)
            for b in batch_sizes}


def load_checkpoint(checkpoint: str | Path, backbone: str | None = None, **kwargs):
    """:func:`ekd.models.loading.load_model`, with a hint at ``--backbone`` for bare state_dicts."""
    from ekd.models.loading import load_model

    return load_model(checkpoint, backbone=backbone, backbone_hint="--backbone", **kwargs)


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and, when checked, the measured parity."""

    path: Path
    backbone: str
    input_size: int
    embedding_size: int
    precision: str
    parity: dict[int, float] = field(default_factory=dict)
    tolerance: float = FP32_TOLERANCE


def export_checkpoint(checkpoint: str | Path, out: str | Path, backbone: str | None = None,
                      fp16: bool = False, opset: int = OPSET, check: bool = False,
                      batch_sizes: tuple[int, ...] = (1, 32)) -> ExportResult:
    """Export an ekd checkpoint (or bare arcface_torch state_dict with ``backbone``) to ONNX.

    With ``check``, compares onnxruntime with PyTorch on random inputs at each batch size and
    raises :class:`EkdError` (keeping the file) when max |Δ| exceeds the tolerance.
    """
    loaded = load_checkpoint(checkpoint, backbone)
    path = export_onnx(loaded.model, out, backbone=loaded.backbone, input_size=loaded.input_size,
                       fp16=fp16, opset=opset)
    result = ExportResult(path, loaded.backbone, loaded.input_size, loaded.embedding_size,
                          "fp16" if fp16 else "fp32",
                          tolerance=FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
    if check:
        result.parity = random_parity(loaded.model, path, loaded.input_size, batch_sizes)
        worst = max(result.parity.values())
        if not worst <= result.tolerance:
            raise EkdError(f"{path}: parity check failed: max |Δ| of normalised embeddings "
                           f"{worst:.3g} > {result.tolerance:g} (per batch size: {result.parity}); "
                           "the file was kept for inspection")
    return result
