"""The distiller contract and registry.

A distiller is an ``nn.Module`` called as
``forward(student_emb, teacher_emb, labels, **extras) -> dict[str, Tensor]`` and returns named,
already weighted scalar loss terms (the trainer sums them and logs each one). The teacher is
frozen by the trainer; distillers only see its outputs. State that must survive a checkpoint
(EMA buffers, learnable regressors) lives in the module's ``state_dict``.

Distillers that need more than embeddings (teacher logits, features, ...) list the keys in
``requires``; the trainer refuses to start when it cannot provide them. Keys in ``optional``
are passed when the trainer has them: ``class_shard`` (a
:class:`ekd.heads.sharded_ce.ClassShard`) under several processes or Partial FC sampling, when
``teacher_centers``/``teacher_logits``/``student_logits`` hold only this rank's class range
and the method completes its softmax across ranks. A class-based distiller without
``class_shard`` in ``optional`` gets the full teacher centres and is refused when it needs the
student's (sharded) classifier.
"""

from __future__ import annotations

import inspect
from typing import Callable, ClassVar

import torch
from torch import nn

from ekd.errors import ConfigError

DISTILLERS: dict[str, type["Distiller"]] = {}


class Distiller(nn.Module):
    """Base class: subclasses implement :meth:`losses`; ``weight`` scales every term."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        #: Set by the trainer on the steps it logs: a distiller may then record what its terms
        #: are doing (plain floats, see :meth:`diagnostics`). Off on every other step.
        self.record_diagnostics = False
        self._diagnostics: dict[str, float] = {}

    def diagnostics(self) -> dict[str, float]:
        """What the last step recorded while :attr:`record_diagnostics` was on (``{}`` for
        methods that record nothing); keys are short names, the trainer prefixes them."""
        return dict(self._diagnostics)

    def losses(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
               **extras: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, labels: torch.Tensor,
                **extras: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = sorted(self.requires - extras.keys())
        if missing:
            raise ConfigError(f"distiller '{self.name}' needs {', '.join(missing)}, which the "
                              "trainer did not provide")
        terms = self.losses(student_emb, teacher_emb, labels, **extras)
        if self.weight == 1.0:
            return terms
        return {k: v * self.weight for k, v in terms.items()}


def register_distiller(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator adding a distiller to :data:`DISTILLERS` under ``name``."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in DISTILLERS:
            raise ValueError(f"distiller '{name}' registered twice")
        cls.name = name
        DISTILLERS[name] = cls
        return cls

    return wrap


def distiller_params(name: str) -> dict[str, object]:
    """The configurable parameters of distiller ``name`` with their defaults."""
    cls = _lookup(name)
    sig = inspect.signature(cls.__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:]
            if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}


def _lookup(name: str) -> type[Distiller]:
    if name not in DISTILLERS:
        raise ConfigError(f"unknown distiller '{name}'; valid: {', '.join(sorted(DISTILLERS))}")
    return DISTILLERS[name]


def build_distiller(name: str, weight: float = 1.0, **params: object) -> Distiller:
    """Instantiate a registered distiller; unknown parameters are errors listing valid ones."""
    cls = _lookup(name)
    valid = distiller_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"distiller '{name}': unknown parameter(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(k for k in valid if k != 'weight')}")
    return cls(weight=weight, **params)
