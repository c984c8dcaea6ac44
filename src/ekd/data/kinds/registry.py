"""The registry of training-set kinds (``data.kind``); each kind is one module beside this one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ekd.errors import ConfigError

if TYPE_CHECKING:
    from ekd.config import DataConfig

__all__ = ["DATASET_KINDS", "DatasetKind", "build_dataset", "fingerprint_of", "register_kind"]


@dataclass(frozen=True)
class DatasetKind:
    """How to build a training set of one kind and how to identify it for a teacher cache.

    ``build(data_config)`` returns a map-style dataset with ``labels`` (int64), ``num_classes``,
    ``input_size``, ``train``, ``read_uint8(i)`` and items ``(image, label, index)``;
    ``fingerprint(dataset)`` is a SHA-256 hex string that changes when any sample, its order or
    its label changes; ``source(dataset)`` names the data in messages.
    """

    name: str
    dataset_type: type
    build: Callable[[DataConfig], Any]
    fingerprint: Callable[[Any], str]
    source: Callable[[Any], str]


#: ``data.kind`` -> :class:`DatasetKind`, filled by the kind modules on import.
DATASET_KINDS: dict[str, DatasetKind] = {}


def register_kind(kind: DatasetKind) -> DatasetKind:
    if kind.name in DATASET_KINDS:
        raise ValueError(f"dataset kind {kind.name!r} is registered twice")
    DATASET_KINDS[kind.name] = kind
    return kind


def build_dataset(data_config: DataConfig) -> Any:
    """The training set described by the ``data`` config section (not mirrored: the trainer
    mirrors batches itself)."""
    kind = DATASET_KINDS.get(data_config.kind)
    if kind is None:
        raise ConfigError(f"data.kind: {data_config.kind!r} is not one of {', '.join(sorted(DATASET_KINDS))}")
    return kind.build(data_config)


def kind_of(dataset: Any) -> DatasetKind:
    """The registered kind whose dataset type ``dataset`` is (first registered wins)."""
    for kind in DATASET_KINDS.values():
        if isinstance(dataset, kind.dataset_type):
            return kind
    raise TypeError(f"{type(dataset).__name__} is not a registered training-set type")


def fingerprint_of(dataset: Any) -> str:
    """The dataset's identity for teacher caches (see :class:`DatasetKind`)."""
    return kind_of(dataset).fingerprint(dataset)
