"""Training-set kinds keyed by ``data.kind``: ``folder``, ``rec``, ``synthetic``.

Each kind is one module that registers a :class:`~ekd.data.kinds.registry.DatasetKind`; a new
format is one more module imported here.
"""

from ekd.data.kinds import folder, rec, synthetic  # noqa: F401  (register the kinds)
from ekd.data.kinds.registry import (
    DATASET_KINDS,
    DatasetKind,
    build_dataset,
    fingerprint_of,
    kind_of,
    register_kind,
)

__all__ = ["DATASET_KINDS", "DatasetKind", "build_dataset", "fingerprint_of", "kind_of", "register_kind"]
