"""The distiller contract (:mod:`ekd.distill.base`): every registered method declares what it uses
and uses what it declares; the facts other layers read (config checks, trainer, diagnostics,
benchmarks) come from those declarations only."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from ekd.distill import (DISTILLERS, EXTRAS, STUDENT_CLASSIFIER_EXTRAS, TRAINER_FILLED_PARAMS, Distiller,
                         distiller_params, needs_teacher_classifier, supports_class_shard)
from ekd.distill.base import EXTRA_INPUTS
from test_distill_zoo import CLASSES, DIM, Extras, make

#: Parameter choices that change what a method declares (each variant is checked).
VARIANTS = {"gkd": [{"logits": "heads"}, {"logits": "teacher_centers"}]}
NAMES = sorted(DISTILLERS)


def _instances(name: str) -> list[Distiller]:
    return [make(name, **params) for params in VARIANTS.get(name, [{}])]


def _extras(distiller: Distiller, s: torch.Tensor, t: torch.Tensor) -> dict:
    """What the trainer passes: the declared ``requires`` (one process, no class shard)."""
    given = Extras()
    everything = {**given("kd", s, t), **given("proxylesskd", s, t), "random_size": 4}
    return {k: everything[k] for k in distiller.requires}


def _source(cls: type) -> str:
    return inspect.getsource(inspect.getmodule(cls))


def test_the_contract_is_declared_on_the_base_class_with_defaults():
    base = Distiller()
    assert (base.requires, base.optional, base.replaces_ce, base.needs_positive_pairs,
            base.shard_hint, base.fprs) == (frozenset(), frozenset(), False, False, "", ())
    assert base.full_centres() is None and not supports_class_shard(base) and base.diagnostics() == {}
    assert set(EXTRA_INPUTS) == EXTRAS and all(EXTRA_INPUTS.values())
    assert set(TRAINER_FILLED_PARAMS) == {"student_dim", "teacher_dim", "num_classes", "class_shard"}


@pytest.mark.parametrize("name", NAMES)
def test_declared_extras_are_known_and_read(name):
    """``requires``/``optional`` name only extras the trainer provides; each required key is read
    (calling :meth:`losses` without it fails), each optional one appears in the method's code, and
    every ``extras[...]`` the code reads is declared."""
    cls = DISTILLERS[name]
    source = _source(cls)
    read = set(re.findall(r"extras(?:\[|\.get\()\"(\w+)\"", source))
    declared: set[str] = set()
    for distiller in _instances(name):
        assert (distiller.requires | distiller.optional) <= EXTRAS, name
        declared |= distiller.requires | distiller.optional
        torch.manual_seed(0)
        s, t = torch.randn(8, DIM, requires_grad=True), torch.randn(8, DIM)
        labels = torch.arange(8) % 4
        extras = _extras(distiller, s, t)
        assert distiller(s, t, labels, **extras), name  # the declared extras are enough
        for key in distiller.requires:
            with pytest.raises((KeyError, TypeError)):
                distiller.losses(s, t, labels, **{k: v for k, v in extras.items() if k != key})
    for key in declared - {k for d in _instances(name) for k in d.requires}:
        assert f'"{key}"' in source, f"{name} declares optional {key} but never reads it"
    assert read <= declared, f"{name} reads {sorted(read - declared)} without declaring them"


@pytest.mark.parametrize("name", NAMES)
def test_replaces_ce_follows_the_replace_ce_parameter(name):
    params = distiller_params(name)
    if "replace_ce" not in params:
        assert make(name).replaces_ce is False
        return
    assert make(name, replace_ce=True).replaces_ce is True
    assert make(name, replace_ce=False).replaces_ce is False


@pytest.mark.parametrize("name", NAMES)
def test_needs_positive_pairs_matches_the_loss(name):
    """A method declaring ``needs_positive_pairs`` has a term that is 0 on a batch of distinct
    identities and not 0 once the batch holds pairs; the others still train the student there."""
    distiller = make(name)
    torch.manual_seed(0)
    s, t = torch.randn(CLASSES, DIM, requires_grad=True), torch.randn(CLASSES, DIM)
    distinct = distiller(s, t, torch.arange(CLASSES), **_extras(distiller, s, t))
    paired = make(name)(s, t, torch.arange(CLASSES) % 3, **_extras(distiller, s, t))
    if distiller.needs_positive_pairs:
        silent = [k for k, v in distinct.items() if float(v.detach()) == 0.0]
        assert silent and all(float(paired[k].detach()) != 0.0 for k in silent), (name, distinct, paired)
    else:
        grad = torch.autograd.grad(sum(distinct.values()), s, allow_unused=True)[0]
        assert grad is not None and float(grad.norm()) > 0, name


@pytest.mark.parametrize("name", NAMES)
def test_fprs_shard_hint_and_full_centres_are_declared_where_used(name):
    cls = DISTILLERS[name]
    for distiller in _instances(name):
        # fprs: the anchors' FPRs, declared exactly by the methods configured with fprs
        assert bool(distiller.fprs) == ("fprs" in distiller_params(name)), name
        assert all(0 < f < 1 for f in distiller.fprs)
        # shard_hint: only where the method can be refused under Partial FC
        refusable = bool(distiller.requires & STUDENT_CLASSIFIER_EXTRAS) and not supports_class_shard(distiller)
        if cls.shard_hint and len(_instances(name)) == 1:
            assert refusable, name
    if cls.shard_hint:  # some variant of the method is refused under Partial FC
        assert any(d.requires & STUDENT_CLASSIFIER_EXTRAS and not supports_class_shard(d)
                   for d in _instances(name)), name
    # full_centres: overridden exactly by the methods that hold class centres
    holds = "centres" in make(name).state_dict()
    assert (cls.full_centres is not Distiller.full_centres) == holds, name
    if holds:
        assert make(name).full_centres().shape == (CLASSES, DIM)


def test_the_facts_other_layers_read_come_from_the_declarations():
    """The config check (positive pairs) and the benchmark's choice of teacher centres read the
    declarations; these are the methods they applied to when they kept their own lists."""
    assert {n for n, c in DISTILLERS.items() if c.needs_positive_pairs} == {"ekd", "triplet_distill"}
    assert {n for n, c in DISTILLERS.items() if needs_teacher_classifier(c)} == {
        "kd", "margin_distill", "proxylesskd", "gkd"}
    refusable = {n for n, c in DISTILLERS.items() if c.shard_hint}
    assert refusable == {"gkd"}
