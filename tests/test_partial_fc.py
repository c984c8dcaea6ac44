"""Partial FC (An et al., ICCVW 2021 / CVPR 2022): exactness against the full margin softmax,
negative-centre sampling, a 2-process gloo run, and checkpoint resharding."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ekd.errors import CheckpointError, ConfigError, DataError
from ekd.heads import ArcFace, CosFace, PartialFC
from ekd.heads.partial_fc import shard_range

HEADS = {"arcface": ArcFace, "cosface": CosFace}
MARGINS = {"arcface": 0.5, "cosface": 0.35}
D, C, B = 8, 11, 8  # 11 classes: uneven shards (6 + 5) over 2 ranks


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """rtol 1e-5, and atol 1e-6 relative to the largest entry: the weight gradients are O(100)
    (normalising 0.01-std centres multiplies their gradient by 1 / ||w||), so a small entry of
    such a tensor carries the float32 rounding of the sums that make the large ones (seen:
    2.8e-5 on an entry of 2.4 in a gradient whose largest entry is 85, summed over 2 shards)."""
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a, b, atol=1e-6 * scale, rtol=1e-5)


def _reference(kind: str, weight: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor,
               scale: float = 64.0):
    """Single-process full softmax: loss, d loss/d emb, d loss/d weight."""
    head = HEADS[kind](weight.shape[1], weight.shape[0], scale, MARGINS[kind])
    with torch.no_grad():
        head.weight.copy_(weight)
    emb = emb.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(head(emb, labels), labels)
    loss.backward()
    return loss.detach(), emb.grad, head.weight.grad


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_single_process_equals_full_softmax(kind):
    emb, labels = _batch()
    pfc = PartialFC(kind, D, C, 64.0, MARGINS[kind])
    x = emb.clone().requires_grad_(True)
    loss = pfc(x, labels)
    loss.backward()
    ref_loss, ref_emb, ref_w = _reference(kind, pfc.weight.detach(), emb, labels)
    _close(loss.detach(), ref_loss)
    _close(x.grad, ref_emb)
    _close(pfc.weight.grad, ref_w)
    assert list(pfc.state_dict()) == ["weight"]  # the margin helper is not registered


def test_sampling_keeps_positives_and_documented_count():
    torch.manual_seed(1)
    classes, labels = 20, torch.tensor([3, 3, 17, 9, 0, 17])
    emb = torch.randn(labels.numel(), D)
    pfc = PartialFC("arcface", D, classes, 64.0, 0.5, sample_rate=0.5).train()
    assert pfc.num_sample == math.ceil(0.5 * classes) == 10
    x = emb.clone().requires_grad_(True)
    loss = pfc(x, labels)
    loss.backward()
    index = pfc.last_index
    assert torch.isfinite(loss) and index.numel() == 10
    assert torch.equal(index, torch.unique(index))  # sorted, no repeats
    assert set(labels.tolist()) <= set(index.tolist())
    nonzero = (pfc.weight.grad.abs().sum(1) > 0).nonzero().flatten()
    assert torch.equal(nonzero, index)  # gradient on exactly the kept rows
    # The sampled loss is the full-softmax loss restricted to the kept centres.
    remap = {c: i for i, c in enumerate(index.tolist())}
    sub_labels = torch.tensor([remap[c] for c in labels.tolist()])
    ref_loss, ref_emb, ref_w = _reference("arcface", pfc.weight.detach()[index], emb, sub_labels)
    _close(loss.detach(), ref_loss)
    _close(x.grad, ref_emb)
    _close(pfc.weight.grad[index], ref_w)


def test_sampling_more_positives_than_budget_and_eval_keeps_all():
    labels = torch.arange(15)
    pfc = PartialFC("cosface", D, 20, 30.0, 0.35, sample_rate=0.25)
    assert pfc.num_sample == 5
    loss = pfc(torch.randn(15, D), labels)
    assert torch.isfinite(loss) and torch.equal(pfc.last_index, labels)  # every positive kept
    pfc.eval()
    pfc(torch.randn(4, D), torch.tensor([0, 1, 2, 3]))
    assert pfc.last_index.numel() == 20
    assert PartialFC("cosface", D, 30, sample_rate=0.1).num_sample == 3  # no float-noise ceil


def test_init_does_not_depend_on_world_size():
    classes = 2500  # crosses the 1024-row init blocks
    full = PartialFC("arcface", 4, classes, seed=7).weight.detach()
    assert abs(float(full.std()) - 0.01) < 1e-3
    for world in (2, 3):
        shards = [PartialFC("arcface", 4, classes, rank=r, world_size=world, seed=7).weight
                  for r in range(world)]
        assert torch.equal(torch.cat([s.detach() for s in shards]), full)
    assert not torch.equal(PartialFC("arcface", 4, classes, seed=8).weight.detach(), full)
    assert [shard_range(C, r, 2) for r in range(2)] == [(0, 6), (6, 11)]


def test_full_weight_round_trip_and_reshard_1_to_2():
    pfc = PartialFC("arcface", D, C)
    new = torch.randn(C, D)
    pfc.load_full_weight(new)
    assert torch.equal(pfc.full_weight(), new)
    with pytest.raises(CheckpointError, match=r"\[11, 8\]"):
        pfc.load_full_weight(torch.randn(C - 1, D))
    shards = []
    for rank in range(2):  # a world-size-1 checkpoint loads into either shard of 2 ranks
        part = PartialFC("arcface", D, C, rank=rank, world_size=2)
        part.load_state_dict({"weight": pfc.full_weight()})
        shards.append(part.weight.detach())
    assert torch.equal(torch.cat(shards), new)


def test_errors():
    with pytest.raises(ConfigError, match="valid: arcface, cosface"):
        PartialFC("sphereface", D, C)
    with pytest.raises(ConfigError, match="sample_rate"):
        PartialFC("arcface", D, C, sample_rate=0.0)
    with pytest.raises(ConfigError, match="at least one class"):
        PartialFC("arcface", D, 2, rank=0, world_size=3)
    pfc = PartialFC("arcface", D, C)
    with pytest.raises(DataError, match=r"labels must be in \[0, 11\)"):
        pfc(torch.randn(2, D), torch.tensor([0, 11]))
    with pytest.raises(DataError, match="embeddings must be"):
        pfc(torch.randn(2, D + 1), torch.tensor([0, 1]))


def _worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank: raw global-batch gradients, the DDP end-to-end rule, sampling, full_weight."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ekd.heads.partial_fc import gather_global_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result: dict = {}
    emb, labels = _batch()
    for kind in ("arcface", "cosface"):
        pfc = PartialFC(kind, D, C, 64.0, MARGINS[kind], rank=rank, world_size=world)
        x = emb.clone().requires_grad_(True)  # the same global batch on both ranks
        loss = pfc(x, labels)
        loss.backward()
        result[kind] = (loss.detach(), x.grad, pfc.weight.grad, pfc.weight.detach().clone())
    # End to end: local batches -> backbone under DDP -> gather -> PartialFC.
    torch.manual_seed(0)
    backbone = torch.nn.Linear(5, D)
    inputs = torch.randn(B, 5, generator=torch.Generator().manual_seed(3))
    ddp = DistributedDataParallel(backbone)
    pfc = PartialFC("arcface", D, C, 64.0, 0.5, rank=rank, world_size=world)
    per = B // world
    local = ddp(inputs[rank * per:(rank + 1) * per])
    glob_emb, glob_labels = gather_global_batch(local, labels[rank * per:(rank + 1) * per])
    pfc(glob_emb, glob_labels).backward()
    result["ddp"] = (backbone.weight.grad, backbone.bias.grad, pfc.weight.grad)
    # Sampling: same loss on every rank, finite.
    torch.manual_seed(100 + rank)
    sampled = PartialFC("arcface", D, C, 64.0, 0.5, sample_rate=0.5, rank=rank, world_size=world)
    result["sampled"] = (sampled(emb, labels).detach(), sampled.last_index)
    # Checkpoint: perturb the shard rank-dependently, then gather the full matrix.
    with torch.no_grad():
        sampled.weight.add_(rank + 1.0)
    result["shard"] = sampled.weight.detach().clone()
    result["full"] = sampled.full_weight()
    del ddp, local, glob_emb  # DDP holds the group: release it first, or the exit may abort
    gc.collect()
    dist.destroy_process_group()
    torch.save(result, f"{out}/rank{rank}.pt")


def test_two_process_gloo_equals_single_process(tmp_path: Path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    emb, labels = _batch()
    for kind in ("arcface", "cosface"):
        full = torch.cat([r[kind][3] for r in res])
        assert torch.equal(full, PartialFC(kind, D, C).weight.detach())  # shards = 1-rank init
        ref_loss, ref_emb, ref_w = _reference(kind, full, emb, labels)
        for r in res:
            _close(r[kind][0], ref_loss)
            _close(r[kind][1], ref_emb)  # grad w.r.t. the global embeddings, on each rank
        _close(torch.cat([r[kind][2] for r in res]), ref_w)
    # DDP rule: backbone and shard gradients equal the single-process ones.
    torch.manual_seed(0)
    backbone = torch.nn.Linear(5, D)
    inputs = torch.randn(B, 5, generator=torch.Generator().manual_seed(3))
    head = ArcFace(D, C, 64.0, 0.5)
    with torch.no_grad():
        head.weight.copy_(PartialFC("arcface", D, C).weight)
    F.cross_entropy(head(backbone(inputs), labels), labels).backward()
    for r in res:
        _close(r["ddp"][0], backbone.weight.grad)
        _close(r["ddp"][1], backbone.bias.grad)
    _close(torch.cat([r["ddp"][2] for r in res]), head.weight.grad)
    # Sampling under 2 ranks: identical finite loss; each shard keeps ceil(0.5 * size) rows.
    assert torch.isfinite(res[0]["sampled"][0])
    _close(res[0]["sampled"][0], res[1]["sampled"][0])
    for rank, r in enumerate(res):
        start, end = shard_range(C, rank, world)
        kept = r["sampled"][1]
        assert kept.numel() == max(math.ceil(0.5 * (end - start)),
                                   len({c - start for c in labels.tolist() if start <= c < end}))
        assert {c - start for c in labels.tolist() if start <= c < end} <= set(kept.tolist())
    # Resharding 2 -> 1: the gathered matrix is the concatenation and loads into one rank.
    shards = torch.cat([r["shard"] for r in res])
    assert torch.equal(res[0]["full"], shards) and torch.equal(res[1]["full"], shards)
    single = PartialFC("arcface", D, C)
    single.load_full_weight(res[0]["full"])
    assert torch.equal(single.weight.detach(), shards)
    single2 = PartialFC("arcface", D, C)
    single2.load_state_dict({"weight": res[1]["full"]})
    assert torch.equal(single2.weight.detach(), shards)
