"""Run every registered distiller as the trainer does, on one process or as one of 2 Gloo ranks.

Used by ``tests/test_distill_registry_ddp.py``: each rank receives its local batch, gathers the
global batch with the trainer's own functions (``gather_global_batch``, ``gather_no_grad``),
builds the extras with ``distiller_extras`` (class shards as under ``torchrun``: Partial FC head,
teacher centres of the rank's class range), calls the distiller, backpropagates and averages the
replicated gradients with ``average_replicated_grads``. Results are saved per rank.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ekd.distill import CLASS_EXTRAS, DISTILLERS, build_distiller, distiller_params
from ekd.utils import distributed as D
from ekd.distill.base import supports_class_shard as sharded
from ekd.engine.distill_inputs import check_sharding, distiller_extras
from ekd.errors import ConfigError
from ekd.heads import ArcFace, PartialFC
from ekd.heads.partial_fc import gather_global_batch, init_rows

DIM, CLASSES, BATCH, STEPS, SCALE, RANDOM = 8, 7, 12, 2, 16.0, 4
#: Per-method parameters beyond the defaults (and the trainer's num_classes/dims).
#: gkd's default (``logits: heads``) needs the student's full classifier and is refused under
#: several processes (tested in test_distill_registry_ddp.py); ``teacher_centers`` is its
#: multi-process form.
PARAMS: dict[str, dict] = {"adadistill": {"scale": 16.0}, "margin_distill": {"scale": 16.0},
                           "gkd": {"logits": "teacher_centers", "scale": 16.0}}
#: Option sets of a method run as extra entries ``method[label]`` (its variants touch the
#: global batch differently: memory pairs, teacher-ranked negatives, spread temperature).
VARIANTS: dict[str, tuple[str, dict]] = {
    "ekd[variants]": ("ekd", {"memory_size": 16, "memory_pairs": True, "hard_negatives": "teacher",
                              "temperature_mode": "spread", "anchor_source": "teacher",
                              "focus_fpr": 0.1, "reduction": "active", "bias_correction": True}),
}
NAMES = sorted(DISTILLERS) + sorted(VARIANTS)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global batch of a step: P x K labels (duplicates), teacher near class means, student near
    the teacher (so that AdaDistill's momenta are not all clipped)."""
    gen = torch.Generator().manual_seed(10 + step)
    means = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(99))
    labels = torch.randperm(CLASSES, generator=gen)[torch.arange(BATCH) // 2 % CLASSES]
    teacher = means[labels] + 0.5 * torch.randn(BATCH, DIM, generator=gen)
    student = teacher + 0.7 * torch.randn(BATCH, DIM, generator=gen)
    return student, teacher, labels


def teacher_centers() -> torch.Tensor:
    return torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(5))


def build(name: str, shard) -> torch.nn.Module:
    method, extra = VARIANTS.get(name, (name, {}))
    accepted = distiller_params(method)
    auto = {"num_classes": CLASSES, "student_dim": DIM, "teacher_dim": DIM, "class_shard": shard}
    params = {k: v for k, v in auto.items() if k in accepted and v is not None}
    return build_distiller(method, **params, **PARAMS.get(method, {}), **extra)


def run(rank: int, world: int, names: list[str]) -> dict:
    """Loss per step, gradients (local embedding rows, distiller and head parameters) and final
    state of every distiller in ``names``."""
    info = D.DistInfo(rank, world)
    out: dict = {}
    for name in names:
        torch.manual_seed(0)
        if world > 1:
            head = PartialFC("arcface", DIM, CLASSES, SCALE, 0.5, 1.0, rank, world, seed=0)
        else:
            head = ArcFace(DIM, CLASSES, SCALE, 0.5)
            with torch.no_grad():
                head.weight.copy_(init_rows(0, CLASSES, CLASSES, DIM, 0))
        shard = head.shard if world > 1 else None
        distiller = build(name, shard if world > 1 else None)
        if world > 1:
            try:
                check_sharding(torch.nn.ModuleList([distiller]))  # as the trainer does
            except ConfigError as exc:
                out[name] = {"refused": str(exc)}
                continue
        n = BATCH // world
        res: dict = {"loss": [], "emb_grad": [], "param_grad": [], "head_grad": []}
        for step in range(STEPS):
            s, t, y = batch(step)
            local = s[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            emb, labels = gather_global_batch(local, y[rank * n:(rank + 1) * n])
            t_glob = D.gather_no_grad(t[rank * n:(rank + 1) * n], info)
            [given] = distiller_extras(torch.nn.ModuleList([distiller]), emb, t_glob, head,
                                       teacher_centers(), RANDOM, shard)
            for p in list(distiller.parameters()) + list(head.parameters()):
                p.grad = None
            loss = sum(distiller(emb, t_glob, labels, **given).values())
            loss.backward()
            D.average_replicated_grads(distiller, info)
            # The gather's backward sums W identical copies; DDP divides by W.
            res["loss"].append(loss.detach())
            res["emb_grad"].append(local.grad / world if local.grad is not None else torch.zeros_like(local))
            res["param_grad"].append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                      for p in distiller.parameters()])
            res["head_grad"].append(head.weight.grad.clone() if head.weight.grad is not None
                                    else torch.zeros_like(head.weight))
        state = {k: v.clone() for k, v in distiller.state_dict().items()}
        if hasattr(distiller, "full_centres"):
            state["centres"] = distiller.full_centres()
        res["state"] = state
        res["sharded"] = bool(world > 1 and (sharded(distiller)
                                             or getattr(distiller, "class_shard", None) is not None))
        res["class_based"] = bool(distiller.requires & CLASS_EXTRAS) or hasattr(distiller, "class_shard")
        if hasattr(distiller, "centres"):  # rows held by this rank
            res["rows_held"] = int(distiller.centres.shape[0])
        out[name] = res
    return out


def _rank_main(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.save(run(rank, world, NAMES), f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(2, sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
