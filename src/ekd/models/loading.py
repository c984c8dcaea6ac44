"""Backbones restored strictly from files.

Accepted files:
- an ekd model or training checkpoint (it records its backbone, embedding and input size);
- an InsightFace arcface_torch ``backbone.pth`` (a bare ``state_dict``); its architecture must be
  given, and it loads with ``strict=True``.

A missing file, a wrong architecture, or missing/unexpected keys raise
:class:`~ekd.errors.CheckpointError` naming the file and the keys. No path returns a randomly
initialised model. (A frozen teacher made of such a model: :mod:`ekd.teachers.checkpoint`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ekd.errors import CheckpointError, ConfigError
from ekd.models import build_backbone
from ekd.utils.checkpoint_io import FORMAT, load_file, load_state_strict

__all__ = ["LoadedModel", "freeze", "load_model"]


@dataclass
class LoadedModel:
    """A backbone restored from a file, with what is known about it."""

    model: nn.Module
    backbone: str
    embedding_size: int
    input_size: int
    head_state: dict | None = None
    width: float = 1.0


def load_model(path: str | Path, backbone: str | None = None, embedding_size: int | None = None,
               input_size: int | None = None, backbone_hint: str = "teacher.backbone") -> LoadedModel:
    """Restore a backbone from an ekd checkpoint or an arcface_torch ``backbone.pth``.

    ``backbone_hint`` names the setting that gives the architecture in the error raised for a
    bare state_dict (``teacher.backbone`` in configs, ``--backbone`` on the command line).
    """
    path = Path(path)
    obj = load_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            meta = obj["model_meta"]
            name, emb, size = meta["backbone"], meta["embedding_size"], meta["input_size"]
            width = meta.get("width", 1.0)  # checkpoints before model.width are full width
            obj["model"]
        except (KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path}: an ekd checkpoint without its model or model_meta "
                                  f"entries ({type(exc).__name__}: {exc}); the file is damaged") from None
        if backbone is not None and backbone != name:
            raise CheckpointError(f"{path}: holds a {name} but {backbone} was requested")
        if input_size is not None and input_size != size:
            raise CheckpointError(f"{path}: trained at input size {size}, requested {input_size}")
        state, head = obj["model"], obj.get("head")
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if backbone is None:
            raise ConfigError(f"{path}: a bare state_dict (e.g. arcface_torch backbone.pth) does not "
                              f"record its architecture; set {backbone_hint} (e.g. iresnet50)")
        name, state, head, width = backbone, obj, None, 1.0
        emb = embedding_size or _infer_embedding_size(obj, path)
        size = input_size or 112
    else:
        raise CheckpointError(f"{path}: neither an ekd checkpoint nor a state_dict of tensors "
                              f"(top level: {type(obj).__name__})")
    model = build_backbone(name, embedding_size=emb, input_size=size, width=width)
    what = f"{name} backbone" if width == 1.0 else f"{name} backbone (width {width:g})"
    load_state_strict(model, state, str(path), what=what)
    return LoadedModel(model, name, emb, size, head, width)


def _infer_embedding_size(state: dict, path: Path) -> int:
    for key in ("features.weight", "features.layers.3.weight"):  # iresnet, mobilefacenet
        if key in state:
            return int(state[key].shape[0])
    raise CheckpointError(f"{path}: cannot infer the embedding size; set teacher.embedding_size")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never trains (BN statistics stay fixed)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
