"""Deployment: ONNX export with parity checks, INT8 quantization, model statistics, and embedding /
verification of images (:mod:`.embedding_model`). Depends on models, eval and the shared helpers
(:mod:`ekd.utils`), never on the training engine.

``onnx`` and ``onnxruntime`` (the ``onnx`` extra: ``pip install 'ekd[onnx]'``) are imported only
by the functions that need them.
"""

from ekd.deploy.embedding_model import (EmbeddingModel, OnnxEmbeddingModel, TorchEmbeddingModel,
                                        collect_images, load_embedding_model, read_threshold)
from ekd.deploy.onnx_export import (OPSET, ExportResult, export_checkpoint, export_onnx,
                                    onnx_parity, random_parity, read_metadata)
from ekd.deploy.stats import ModelStats, count_macs, measure_latency, model_stats, stats_table

__all__ = [
    "EmbeddingModel",
    "ExportResult",
    "ModelStats",
    "OPSET",
    "OnnxEmbeddingModel",
    "TorchEmbeddingModel",
    "collect_images",
    "count_macs",
    "export_checkpoint",
    "export_onnx",
    "load_embedding_model",
    "measure_latency",
    "model_stats",
    "onnx_parity",
    "random_parity",
    "read_metadata",
    "read_threshold",
    "stats_table",
]
