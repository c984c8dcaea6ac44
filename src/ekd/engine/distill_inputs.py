"""Building the configured distillers and the extra inputs they declare (``requires``).

The vocabulary of extras is :data:`ekd.distill.base.EXTRA_INPUTS`: margin-free logits of student and
teacher against their own class centres, the teacher's class centres, the student's margin head
and the size of the random part of the batch. Only extras some distiller needs are computed;
what cannot be provided (e.g. teacher logits for a teacher without classifier) is refused when
training starts, naming the distiller and the teacher file.

Sharding. Under several processes or ``head.sample_rate < 1`` the student's head is Partial FC
and the class-based extras are per rank: a :class:`ekd.heads.sharded_ce.ClassShard` (the same
class range as the rank's Partial FC shard), the teacher's centres of that range, logits against
that range only. Distillers that list ``class_shard`` in ``optional`` complete their softmax
across ranks; the others get the full teacher centres and logits and are refused when they need
the student's classifier (:func:`check_sharding`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ekd.config import Config, DistillerConfig
from ekd.distill import (CLASS_EXTRAS, EXTRAS, STUDENT_CLASSIFIER_EXTRAS, TRAINER_FILLED_PARAMS, Distiller,
                         build_distiller, distiller_params, needs_teacher_classifier, supports_class_shard)
from ekd.errors import ConfigError
from ekd.heads import MarginHead, PartialFC
from ekd.heads.sharded_ce import ClassShard


def build_distillers(cfg: Config, teacher_dim: int | None, num_classes: int,
                      class_shard: ClassShard | None = None) -> nn.ModuleList:
    """Every configured distiller; ``student_dim``/``teacher_dim``/``num_classes`` (and the
    rank's ``class_shard`` under sharding) are filled in when the distiller's ``__init__``
    accepts them and the config does not set them."""
    known = dict(zip(TRAINER_FILLED_PARAMS, (cfg.model.embedding_size, teacher_dim, num_classes, class_shard)))

    def build(entry: DistillerConfig) -> Distiller:
        accepted = distiller_params(entry.name)
        auto = {k: v for k, v in known.items() if k in accepted and k not in entry.params and v is not None}
        weight = 1.0 if entry.weight == "auto" else entry.weight  # "auto": fixed after calibration (auto_weight.py)
        return build_distiller(entry.name, weight, **auto, **entry.params)

    return nn.ModuleList(build(entry) for entry in cfg.distill)


def teacher_centers_for(distillers: nn.ModuleList, head_state: dict | None, teacher_path: str | None,
                        num_classes: int, teacher_dim: int | None) -> torch.Tensor | None:
    """The teacher's class centres when some distiller needs its classifier; checks shapes."""
    centers = None
    for d in distillers:
        unknown = sorted((d.requires | d.optional) - EXTRAS)
        if unknown:
            raise ConfigError(f"distiller '{d.name}' requires {', '.join(unknown)}, which the "
                              f"trainer does not provide (it provides {', '.join(sorted(EXTRAS))})")
        if not needs_teacher_classifier(d):
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


def check_sharding(distillers: nn.ModuleList) -> None:
    """Refuse distillers that need the student's classifier but cannot work on its shards."""
    refused = [d.name for d in distillers
               if d.requires & STUDENT_CLASSIFIER_EXTRAS and not supports_class_shard(d)]
    if refused:
        hints = "".join(f"; {d.name}: {d.shard_hint}" for d in distillers
                        if d.name in refused and d.shard_hint)
        raise ConfigError(f"distiller(s) {', '.join(refused)} need the student's full classifier, "
                          "which Partial FC (head.sample_rate < 1 or several processes) shards "
                          "across ranks, and do not support class shards (class_shard); use "
                          f"head.sample_rate=1 on one process{hints}")


def distiller_extras(distillers: nn.ModuleList, emb: torch.Tensor, teacher_emb: torch.Tensor,
                     head: MarginHead | PartialFC, teacher_centers: torch.Tensor | None,
                     random_size: int, class_shard: ClassShard | None = None
                     ) -> list[dict[str, object]]:
    """The extra inputs each distiller requires (and only those), one dict per distiller.

    ``teacher_centers`` are the full ``[C, d]`` centres, or this rank's rows when every
    class-based distiller supports shards; with ``class_shard`` the distillers that support
    shards get this rank's rows and per-shard logits, the others the full ones.
    """
    cache: dict[tuple[str, bool], object] = {}

    def value(key: str, shard: ClassShard | None) -> object:
        if (key, shard is not None) in cache:
            return cache[(key, shard is not None)]
        centers = teacher_centers  # full [C, d], or already this rank's rows
        if shard is not None and centers is not None and centers.shape[0] == shard.num_classes:
            centers = shard.rows(centers)
        if key == "student_logits":  # margin-free s * cos against the student's own centres
            out: object = head.class_cosine(emb) * head.scale
        elif key == "teacher_logits":
            with torch.no_grad():
                cos = F.linear(F.normalize(teacher_emb.float()), F.normalize(centers))
                out = cos.clamp(-1, 1) * head.scale
        elif key == "teacher_centers":
            out = centers
        elif key == "student_head":
            out = head
        elif key == "random_size":
            out = random_size
        else:  # class_shard
            out = shard
        cache[(key, shard is not None)] = out
        return out

    per_distiller = []
    for d in distillers:
        shard = class_shard if supports_class_shard(d) else None
        keys = set(d.requires) | ({"class_shard"} & d.optional if shard is not None else set())
        per_distiller.append({k: value(k, shard if k in CLASS_EXTRAS | {"class_shard"} else None)
                              for k in sorted(keys)})
    return per_distiller
