"""What each loss term is doing, measured on the steps a run logs (``train.diagnostics``).

On every ``train.log_every``-th step the trainer adds to that ``metrics.jsonl`` row (and to
TensorBoard):

- ``grad/<term>``: the norm of the gradient term ``<term>`` sends into the student's embedding
  (the batch's ``[B, d]`` output, before any normalisation; summed over ranks under ``torchrun``),
  and ``grad_share/<term>``: that norm over the margin softmax's (``grad/ce``). A distillation
  term whose share is 0.3% barely moves the student, whatever its loss value says;
- ``<distiller>/<key>``: what a distiller recorded (:meth:`ekd.distill.base.Distiller.diagnostics`);
  EKD: its anchors per FPR, the share of distilled pairs in a sigmoid's active band and the
  squared step difference per anchor.

With a ``val`` section and an EKD distiller, validation rows also hold the thresholds the
student's (and, for a teacher that is a network, the teacher's) evaluation uses at EKD's FPRs
(``<set>/thr@F``, ``<set>/teacher_thr@F``), so anchors can be read next to them.
``ekd diagnose RUN_DIR`` (:mod:`ekd.commands.diagnostics_report`) turns the rows into a summary and plots.

Cost: one extra backward pass per term from the loss to the embedding (not through the
backbone), on logged steps only.
"""

from __future__ import annotations

import torch
from torch import nn

from ekd.utils import distributed

__all__ = ["distiller_diagnostics", "set_recording", "term_gradient_norms"]


def term_gradient_norms(terms: dict[str, torch.Tensor], emb: torch.Tensor,
                        dist: distributed.DistInfo) -> dict[str, float]:
    """``grad/<term>`` (L2 norm of d term / d emb over the global batch) and, with a ``ce`` term,
    ``grad_share/<term>`` = that norm / the CE's. A term that does not depend on ``emb`` (or has
    zero weight) reports 0. Every rank must call this with the same term names (collectives)."""
    if not emb.requires_grad:
        return {}
    names = list(terms)
    squares = []
    for name in names:
        value = terms[name]
        grad = None
        if value.requires_grad:
            grad = torch.autograd.grad(value, emb, retain_graph=True, allow_unused=True)[0]
        squares.append(torch.zeros((), device=emb.device) if grad is None
                       else grad.detach().float().pow(2).sum())
    total = torch.stack(squares)
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(total)
    # Under torchrun every rank's embedding gradient is world_size x its share of the true one
    # (the gather's backward sums the ranks' identical losses; DDP divides the weights' by W).
    norms = {name: float(v) / dist.world_size for name, v in zip(names, total.sqrt())}
    out = {f"grad/{n}": v for n, v in norms.items()}
    ce = norms.get("ce")
    if ce:
        out.update({f"grad_share/{n}": v / ce for n, v in norms.items() if n != "ce"})
    return out


def set_recording(distillers: nn.ModuleList, on: bool) -> None:
    """Switch the distillers' :attr:`record_diagnostics` for the coming step."""
    for d in distillers:
        d.record_diagnostics = on


def distiller_diagnostics(distillers: nn.ModuleList) -> dict[str, float]:
    """``<name>/<key>`` of what every distiller recorded (``<name>_<i>`` for a repeated method)."""
    out: dict[str, float] = {}
    seen: dict[str, int] = {}
    for d in distillers:
        prefix = d.name if d.name not in seen else f"{d.name}_{seen[d.name]}"
        seen[d.name] = seen.get(d.name, 0) + 1
        out.update({f"{prefix}/{k}": v for k, v in d.diagnostics().items()})
    return out


def anchor_fprs(distillers: nn.ModuleList) -> tuple[float, ...]:
    """The FPRs of every distiller's threshold anchors (:attr:`ekd.distill.base.Distiller.fprs`:
    EKD's), for the validation thresholds."""
    fprs: set[float] = set()
    for d in distillers:
        fprs.update(d.fprs)
    return tuple(sorted(fprs, reverse=True))
