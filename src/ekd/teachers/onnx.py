"""``teacher.kind: onnx``: a teacher given as an ONNX model, run with onnxruntime (the ``onnx`` extra).

Any model that takes aligned face crops and returns embeddings works; its expected input is
described in the config: colour order (RGB/BGR), layout (NCHW/NHWC) and normalisation
``(pixel - mean) / std`` on the 0-255 scale (InsightFace models: 127.5 / 127.5, RGB, NCHW).
ekd's own batches are RGB NCHW normalised as ``(pixel - 127.5) / 127.5``; they are converted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ekd.errors import CheckpointError, ConfigError
from ekd.teachers.registry import Teacher, TeacherKind, register_kind

__all__ = ["OnnxTeacher"]


class OnnxTeacher(Teacher):
    """Embeddings from an onnxruntime session (CUDA provider when available and on GPU)."""

    def __init__(self, path: str | Path, input_size: int, color: str = "RGB", layout: str = "NCHW",
                 mean: float = 127.5, std: float = 127.5, device: torch.device | str = "cpu") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("teacher.kind 'onnx' needs onnxruntime: pip install 'ekd[onnx]'") from None
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX teacher not found: {path}")
        self.device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: onnxruntime cannot load it: {exc}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise CheckpointError(f"{path}: expected one image input and an embedding output, got "
                                  f"inputs {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        shape = list(inputs[0].shape)
        spatial = shape[1:3] if layout == "NHWC" else shape[2:4]
        if len(shape) != 4 or any(isinstance(s, int) and s != input_size for s in spatial):
            raise CheckpointError(f"{path}: input shape {shape} ({layout}) does not take "
                                  f"{input_size}x{input_size} faces (data.input_size)")
        self.color, self.layout, self.mean, self.std = color, layout, float(mean), float(std)
        self.input_size = input_size
        self.source = str(path)
        probe = self._run(torch.zeros(1, 3, input_size, input_size))
        if probe.ndim != 2:
            raise CheckpointError(f"{path}: output shape {tuple(probe.shape)} is not [batch, dim]")
        self.embedding_size = int(probe.shape[1])

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().numpy() * 127.5 + 127.5  # back to RGB 0-255
        if self.color == "BGR":
            x = x[:, ::-1]
        x = (x - self.mean) / self.std
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        return self._run(images).to(self.device)


def _build(teacher_config, input_size: int, dataset, device: torch.device) -> Teacher:  # noqa: ANN001
    return OnnxTeacher(teacher_config.path, input_size, color=teacher_config.onnx_color,
                       layout=teacher_config.onnx_layout, mean=teacher_config.onnx_mean,
                       std=teacher_config.onnx_std, device=device)


register_kind(TeacherKind("onnx", _build))
