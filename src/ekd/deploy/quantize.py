"""INT8 ONNX models: onnxruntime static quantization calibrated on the user's own face crops.

:func:`quantize_int8` takes an fp32 model written by :func:`ekd.deploy.onnx_export.export_onnx`
and writes an INT8 one in the QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs around
each quantized operator; onnxruntime's recommended format for CPU and for converters to mobile
runtimes), with per-channel symmetric int8 weights and per-tensor uint8 activations whose ranges
come from calibration images (min/max, onnxruntime's ``quantize_static``). The calibration images
are read and normalised by ekd's own preprocessing (:func:`ekd.deploy.embedding_model.preprocess`, the one
``ekd eval`` uses), so the ranges are those the deployed model will see.

A part of the images (``holdout``) is kept out of calibration; :func:`parity` compares the fp32
and INT8 embeddings of those images (cosine of the L2-normalised embeddings, each image and its
mirror summed as ``ekd eval`` does), which is the summary ``ekd export --int8`` prints.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ekd.data.transforms import load_image
from ekd.deploy.embedding_model import OnnxEmbeddingModel, collect_images, preprocess
from ekd.deploy.onnx_export import INPUT_NAME, require_onnx, require_onnxruntime
from ekd.errors import ConfigError, DataError
from ekd.utils.checkpoint_io import write_atomic

__all__ = ["CalibrationSplit", "Int8Export", "Int8Parity", "export_int8", "parity", "quantize_int8",
           "split_calibration"]

#: Fewest calibration images accepted (activation ranges from fewer are unreliable).
MIN_CALIBRATION = 8


@dataclass
class CalibrationSplit:
    """Image files used to set activation ranges, and those held back to measure parity."""

    calibrate: list[str]
    holdout: list[str]


@dataclass
class Int8Parity:
    """Cosine similarity of fp32 and INT8 embeddings of the held-back images."""

    images: int
    mean: float
    minimum: float
    p05: float

    def text(self) -> str:
        """One line for the export summary."""
        return (f"INT8 parity on {self.images} held-back calibration image(s): cosine of fp32 vs "
                f"INT8 embeddings mean {self.mean:.4f}, 5th percentile {self.p05:.4f}, "
                f"min {self.minimum:.4f}")


def split_calibration(folder: str | Path, size: int = 256, holdout: int = 64,
                      seed: int = 0) -> CalibrationSplit:
    """``size`` images of ``folder`` (searched recursively, drawn with ``seed``) to calibrate and
    up to ``holdout`` others to check parity; a small folder keeps a quarter back."""
    if size < MIN_CALIBRATION:
        raise ConfigError(f"--calib-size must be at least {MIN_CALIBRATION}, got {size}")
    paths = collect_images([folder])
    if len(paths) < MIN_CALIBRATION + 2:
        raise DataError(f"{folder}: {len(paths)} image(s); INT8 calibration needs at least "
                        f"{MIN_CALIBRATION + 2} aligned face crops")
    order = list(paths)
    random.Random(seed).shuffle(order)
    held = min(holdout, max(2, len(order) // 4), len(order) - MIN_CALIBRATION)
    calib = order[held:held + size]
    return CalibrationSplit(sorted(calib), sorted(order[:held]))


def _batches(paths: list[str], input_size: int, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(paths), batch_size):
        yield np.stack([preprocess(load_image(p), input_size)
                        for p in paths[i:i + batch_size]]).astype(np.float32)


def _reader(paths: list[str], input_size: int, batch_size: int, progress: bool):
    """An onnxruntime ``CalibrationDataReader`` over preprocessed image batches."""
    from onnxruntime.quantization import CalibrationDataReader
    from tqdm.auto import tqdm

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.bar = tqdm(total=len(paths), desc="INT8 calibration", unit="img",
                            disable=not progress, leave=False)
            self.batches = _batches(paths, input_size, batch_size)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            if batch is None:
                self.bar.close()
                return None
            self.bar.update(len(batch))
            return {INPUT_NAME: batch}

    return _Reader()


def quantize_int8(fp32_onnx: str | Path, out: str | Path, calibration: list[str],
                  batch_size: int = 32, progress: bool = True) -> Path:
    """Write the INT8 (QDQ, per-channel weights) version of ``fp32_onnx`` to ``out``.

    The fp32 model's ``metadata_props`` are kept (``precision`` becomes ``int8``), so ``ekd
    eval``, ``embed``, ``verify`` and ``stats`` feed it as they feed the fp32 model.
    """
    onnx = require_onnx()
    require_onnxruntime()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = OnnxEmbeddingModel(fp32_onnx)
    if len(calibration) < MIN_CALIBRATION:
        raise DataError(f"INT8 calibration needs at least {MIN_CALIBRATION} images, got "
                        f"{len(calibration)}")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".ekd-int8-", dir=out.parent) as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized),
                        _reader(calibration, source.input_size, batch_size, progress),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(str(quantized))
    meta = dict(source.metadata)
    meta.update(precision="int8", quantization=(
        f"onnxruntime static quantization, QDQ, per-channel int8 weights, uint8 activations "
        f"calibrated (min/max) on {len(calibration)} image(s)"))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"INT8 (QDQ) version of {Path(fp32_onnx).name}"
    return write_atomic(out, lambda fh: fh.write(proto.SerializeToString()))


def parity(fp32_onnx: str | Path, int8_onnx: str | Path, images: list[str],
           batch_size: int = 32) -> Int8Parity:
    """Cosine of the fp32 and INT8 embeddings (flip-summed, L2-normalised) of ``images``."""
    if not images:
        raise DataError("no held-back images to measure INT8 parity on")
    ref, got = OnnxEmbeddingModel(fp32_onnx), OnnxEmbeddingModel(int8_onnx)
    pairs = [(ref.embed_batch(x), got.embed_batch(x))
             for x in _batches(images, ref.input_size, batch_size)]
    a, b = np.concatenate([p for p, _ in pairs]), np.concatenate([q for _, q in pairs])
    cos = np.sum(a * b, axis=1)
    return Int8Parity(len(images), float(cos.mean()), float(cos.min()),
                      float(np.percentile(cos, 5)))


@dataclass
class Int8Export:
    """What :func:`export_int8` wrote and measured."""

    path: Path
    backbone: str
    input_size: int
    embedding_size: int
    calibration_images: int
    parity: Int8Parity


def export_int8(checkpoint: str | Path, out: str | Path, calib_folder: str | Path,
                calib_size: int = 256, backbone: str | None = None, opset: int | None = None,
                progress: bool = True) -> Int8Export:
    """Export ``checkpoint`` to fp32 ONNX (a temporary file), quantize it to INT8 at ``out``
    with ``calib_size`` images of ``calib_folder``, and measure parity on held-back images."""
    from ekd.deploy.onnx_export import OPSET, export_checkpoint

    split = split_calibration(calib_folder, calib_size)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".ekd-fp32-", dir=out.parent) as tmp:
        fp32 = export_checkpoint(checkpoint, Path(tmp) / "fp32.onnx", backbone=backbone,
                                 opset=opset or OPSET)
        quantize_int8(fp32.path, out, split.calibrate, progress=progress)
        check = parity(fp32.path, out, split.holdout)
    return Int8Export(out, fp32.backbone, fp32.input_size, fp32.embedding_size,
                      len(split.calibrate), check)
