"""Every registered distiller under 2 Gloo processes, fed as the trainer feeds it (local batches,
global batch gathered by the trainer's functions, class shards as under ``torchrun``), equals one
process on the concatenated batch: loss, gradients (embeddings, distiller and head parameters)
and distiller state after 2 steps. New methods in ``DISTILLERS`` are covered automatically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import registry_ddp_worker as W
from ekd.distill import DISTILLERS

WORKER = Path(W.__file__)
#: Methods that hold or see class centres and must run on Partial FC class shards.
SHARDED = {"adadistill", "kd", "margin_distill", "proxylesskd"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry_ddp")
    out = str(tmp / "res")
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp / "store"), out],
                          timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    single = W.run(0, 1, W.NAMES)
    return single, ranks


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", W.NAMES)
def test_two_processes_equal_one_process_on_the_global_batch(results, name):
    single, ranks = results
    ref = single[name]
    if "refused" in ranks[0][name]:
        pytest.fail(f"{name} is refused by the trainer under several processes: "
                    f"{ranks[0][name]['refused']}")
    n = W.BATCH // 2
    for step in range(W.STEPS):
        for r, res in enumerate(ranks):
            got = res[name]
            _close(got["loss"][step], ref["loss"][step], f"{name} step {step} rank {r} loss")
            _close(got["emb_grad"][step], ref["emb_grad"][step][r * n:(r + 1) * n],
                   f"{name} step {step} rank {r} embedding gradient")
            for i, (g, want) in enumerate(zip(got["param_grad"][step], ref["param_grad"][step])):
                _close(g, want, f"{name} step {step} rank {r} parameter {i} gradient")
        head = torch.cat([res[name]["head_grad"][step] for res in ranks])
        _close(head, ref["head_grad"][step], f"{name} step {step} head gradient")
    for r, res in enumerate(ranks):
        assert res[name]["state"].keys() == ref["state"].keys()
        for key, want in ref["state"].items():
            _close(res[name]["state"][key], want, f"{name} rank {r} state {key}")
    # the classifier-based methods of the audit really ran on class shards
    if name in SHARDED:
        assert ranks[0][name]["class_based"] and ranks[0][name]["sharded"], name
    if "rows_held" in ref:  # class centres held by the distiller: each rank only its shard
        assert sum(res[name]["rows_held"] for res in ranks) == ref["rows_held"] == W.CLASSES


def test_the_comparison_detects_a_distiller_that_updates_twice(results):
    """The harness is sensitive: AdaDistill's state after a second update per step differs."""
    single, _ = results
    d = W.build("adadistill", None)
    s, t, y = W.batch(0)
    d(s, t, y)
    d(s, t, y)
    assert not torch.allclose(d.state_dict()["centres"], single["adadistill"]["state"]["centres"],
                              atol=1e-3)


def test_gkd_with_the_students_heads_is_refused_under_shards_with_the_way_out():
    """gkd's default scores the student with its own classifier, which Partial FC shards: the
    trainer refuses it (check_sharding) and names the multi-process form tested above."""
    import torch.nn as nn

    from ekd.distill import build_distiller
    from ekd.engine.distill_inputs import check_sharding
    from ekd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gkd.*logits: teacher_centers"):
        check_sharding(nn.ModuleList([build_distiller("gkd")]))
    check_sharding(nn.ModuleList([build_distiller("gkd", logits="teacher_centers")]))
