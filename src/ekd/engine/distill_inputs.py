"""Building the configured distillers and the extra inputs they declare (``requires``).

The vocabulary of extras is :data:`ekd.distill.EXTRAS`: margin-free logits of student and
teacher against their own class centres, the teacher's class centres, the student's margin head
and the size of the random part of the batch. Only extras some distiller needs are computed;
what cannot be provided (e.g. teacher logits for a teacher without classifier) is refused when
training starts, naming the distiller and the teacher file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ekd.config import Config, DistillerConfig
from ekd.distill import EXTRAS, Distiller, build_distiller, distiller_params
from ekd.errors import ConfigError
from ekd.heads import MarginHead


def build_distillers(cfg: Config, teacher_dim: int | None, num_classes: int) -> nn.ModuleList:
    """Every configured distiller; ``student_dim``/``teacher_dim``/``num_classes`` are filled in
    when the distiller's ``__init__`` accepts them and the config does not set them."""
    known = {"student_dim": cfg.model.embedding_size, "teacher_dim": teacher_dim,
             "num_classes": num_classes}

    def build(d: DistillerConfig) -> Distiller:
        accepted = distiller_params(d.name)
        auto = {k: v for k, v in known.items() if k in accepted and k not in d.params and v is not None}
        return build_distiller(d.name, d.weight, **auto, **d.params)

    return nn.ModuleList(build(d) for d in cfg.distill)


def teacher_centers_for(distillers: nn.ModuleList, head_state: dict | None, teacher_path: str | None,
                        num_classes: int, teacher_dim: int | None) -> torch.Tensor | None:
    """The teacher's class centres when some distiller needs its classifier; checks shapes."""
    centers = None
    for d in distillers:
        unknown = sorted(d.requires - EXTRAS)
        if unknown:
            raise ConfigError(f"distiller '{d.name}' requires {', '.join(unknown)}, which the "
                              f"trainer does not provide (it provides {', '.join(sorted(EXTRAS))})")
        if not d.requires & {"teacher_logits", "teacher_centers"}:
            continue
        if not head_state or "weight" not in head_state:
            raise ConfigError(
                f"distiller '{d.name}' needs the teacher's classifier (class centres), but the "
                f"teacher {teacher_path} has none (e.g. an arcface_torch backbone.pth, an ONNX "
                "model or an embedding cache); use an ekd checkpoint trained with its margin "
                "head, or a distiller that needs only embeddings")
        weight = head_state["weight"]
        if tuple(weight.shape) != (num_classes, teacher_dim):
            raise ConfigError(
                f"distiller '{d.name}': the classifier of teacher {teacher_path} has shape "
                f"{tuple(weight.shape)}, expected ({num_classes} classes of the training data, "
                f"{teacher_dim}); the teacher must be trained on the same identities")
        centers = weight.detach().float()
    return centers


def distiller_extras(distillers: nn.ModuleList, emb: torch.Tensor, teacher_emb: torch.Tensor,
                     head: MarginHead, teacher_centers: torch.Tensor | None,
                     random_size: int) -> dict[str, object]:
    """The extra inputs some distiller requires (and only those)."""
    needed = set().union(*(d.requires for d in distillers))
    extras: dict[str, object] = {}
    if "student_logits" in needed:  # margin-free s * cos against the student's own centres
        extras["student_logits"] = head.cosine(emb) * head.scale
    if "teacher_logits" in needed:
        with torch.no_grad():
            cos = F.linear(F.normalize(teacher_emb.float()), F.normalize(teacher_centers))
            extras["teacher_logits"] = cos.clamp(-1, 1) * head.scale
    if "teacher_centers" in needed:
        extras["teacher_centers"] = teacher_centers
    if "student_head" in needed:
        extras["student_head"] = head
    if "random_size" in needed:
        extras["random_size"] = random_size
    return extras
