"""Evaluation layer: verification metrics, pair protocols (LFW, CFP, IJB, pair lists), embedding
extraction with flip test-time augmentation (:mod:`.flip_embed`) and evaluation on verification sets.

``extract_embeddings`` (which needs torch) is imported lazily on first use, so the numpy-only
metrics and protocols can be used without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ekd.eval.cfp import read_cfp_pairs
from ekd.eval.ijb import read_ijb_meta, tpr_at_fpr_nearest
from ekd.eval.metrics import (
    DEFAULT_FPRS,
    kfold_bounds,
    l2_normalize,
    roc_auc,
    roc_curve,
    threshold_at_fpr,
    tpr_at_fpr,
    verification_accuracy,
)
from ekd.eval.protocols import (
    PairList,
    all_pairs_scores,
    cap_per_identity,
    read_lfw_pairs,
    read_pair_list,
)

if TYPE_CHECKING:
    from ekd.eval.flip_embed import extract_embeddings

__all__ = [
    "DEFAULT_FPRS",
    "PairList",
    "all_pairs_scores",
    "cap_per_identity",
    "extract_embeddings",
    "kfold_bounds",
    "l2_normalize",
    "read_cfp_pairs",
    "read_ijb_meta",
    "read_lfw_pairs",
    "read_pair_list",
    "roc_auc",
    "roc_curve",
    "threshold_at_fpr",
    "tpr_at_fpr",
    "tpr_at_fpr_nearest",
    "verification_accuracy",
]


def __getattr__(name: str) -> Any:
    if name == "extract_embeddings":
        from ekd.eval.flip_embed import extract_embeddings

        return extract_embeddings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
