"""The distiller contract and registry.

A distiller is an ``nn.Module`` called as
``forward(student_emb, teacher_emb, labels, **extras) -> dict[str, Tensor]`` and returns named,
already weighted scalar loss terms (the trainer sums them and logs each one). The teacher is
frozen by the trainer; distillers only see its outputs. State that must survive a checkpoint
(EMA buffers, learnable regressors) lives in the module's ``state_dict``.

Everything the trainer, the config checks, the diagnostics and the benchmarks read from a
distiller is declared on :class:`Distiller` below, with its default; a subclass overrides only
what differs (``tests/test_distiller_contract.py`` checks each registered method declares what it
uses and uses what it declares). The extra inputs are the keys of :data:`EXTRA_INPUTS`: a
distiller lists the ones it needs in ``requires`` (the trainer refuses to start when it cannot
provide them) and those it takes when available in ``optional``. ``class_shard`` (a
:class:`ekd.heads.sharded_ce.ClassShard`) is passed under several processes or Partial FC sampling,
when ``teacher_centers``/``teacher_logits``/``student_logits`` hold only this rank's class range
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

#: The extra inputs the trainer provides (the keys of ``requires``/``optional``), with what each holds.
EXTRA_INPUTS: dict[str, str] = {
    "teacher_logits": "s * cos of the teacher's embeddings against its class centres [B, C] (no margin)",
    "student_logits": "s * cos of the student's embeddings against its own margin head [B, C] (no margin)",
    "teacher_centers": "the teacher's class centres [C, d] (its classifier, or mean embeddings)",
    "student_head": "the student's margin head (a trained module)",
    "random_size": "the size of the random part of the batch (sampler.random_size)",
    "class_shard": "this rank's class range (ekd.heads.sharded_ce.ClassShard) under sharding",
}
#: Keys a distiller may list in ``requires`` (or ``optional``); the trainer provides exactly these.
EXTRAS = frozenset(EXTRA_INPUTS)
#: Extras that depend on the class range a rank holds under sharding.
CLASS_EXTRAS = frozenset({"teacher_logits", "student_logits", "teacher_centers", "student_head"})
#: Extras that need the teacher's classifier (its class centres).
TEACHER_CLASSIFIER_EXTRAS = frozenset({"teacher_logits", "teacher_centers"})
#: Extras that need the student's classifier (sharded by Partial FC).
STUDENT_CLASSIFIER_EXTRAS = frozenset({"student_head", "student_logits"})
#: ``__init__`` parameters the trainer fills in when a distiller accepts them and the config
#: does not set them: the embedding widths, the number of training classes, the rank's class shard.
TRAINER_FILLED_PARAMS = ("student_dim", "teacher_dim", "num_classes", "class_shard")


class Distiller(nn.Module):
    """Base class: subclasses implement :meth:`losses`; ``weight`` scales every term.

    The class attributes below are the whole contract; a subclass (or its ``__init__``, for a
    choice made by a parameter) overrides the ones that differ from the default.
    """

    #: The registry name (set by :func:`register_distiller`).
    name: ClassVar[str] = ""
    #: Extra inputs every call needs (keys of :data:`EXTRA_INPUTS`); an ``__init__`` may choose them.
    requires: frozenset[str] = frozenset()
    #: Extra inputs passed when the trainer has them (``class_shard``: supports per-rank class shards).
    optional: frozenset[str] = frozenset()
    #: True when the method trains the student on its own margin classifier: the trainer then
    #: drops the margin cross-entropy (``replace_ce`` parameter where a method offers it).
    replaces_ce: bool = False
    #: True when the loss needs positive pairs (two images of one identity) in every batch; the
    #: config check then asks for ``sampler.identities_per_batch >= 1`` and ``samples_per_identity >= 2``.
    needs_positive_pairs: ClassVar[bool] = False
    #: What to change when the method is refused under Partial FC (its student classifier is sharded).
    shard_hint: ClassVar[str] = ""
    #: The FPRs of the method's threshold anchors: validation reports the thresholds there.
    fprs: tuple[float, ...] = ()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        #: Scales every term (``distill[].weight``; fixed after calibration for ``weight: auto``).
        self.weight = float(weight)
        #: Set by the trainer on the steps it logs: a distiller may then record what its terms
        #: are doing (plain floats, see :meth:`diagnostics`). Off on every other step.
        self.record_diagnostics = False
        self._diagnostics: dict[str, float] = {}

    def full_centres(self) -> torch.Tensor | None:
        """Class centres the method holds per rank, gathered to the full ``[C, d]`` for a
        checkpoint (a collective under sharding); ``None`` for methods that hold none."""
        return None

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


def needs_teacher_classifier(distiller: Distiller | type[Distiller]) -> bool:
    """Whether a distiller (class or instance) needs the teacher's class centres."""
    return bool(distiller.requires & TEACHER_CLASSIFIER_EXTRAS)


def supports_class_shard(distiller: Distiller | type[Distiller]) -> bool:
    """Whether a distiller takes per-rank class extras (``class_shard`` in ``optional``)."""
    return "class_shard" in distiller.optional


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
