"""Students trained side by side (one process each, one thread) equal the same trainings run one
after another in this process with one thread."""

from __future__ import annotations

import logging

import pytest
import torch

from ekd.commands import demo as D
from ekd.commands.side_by_side import train_side_by_side
from ekd.errors import CheckpointError


def _configs(out):
    return [D.demo_config(D.QUICK, out, f"s{seed}", "mobilefacenet", 1, "cpu", seed)
            for seed in (0, 1)]


def test_side_by_side_equals_one_after_another(tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO, logger="ekd")  # the children log at the parent's level
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = train_side_by_side(_configs(tmp_path / "alone"), jobs=1)
    finally:
        torch.set_num_threads(threads)
    together = train_side_by_side(_configs(tmp_path / "together"), jobs=2, threads=1)
    assert [r.run_dir.name for r in together] == ["s0", "s1"]
    err = capfd.readouterr().err  # each child's epoch and end-of-run lines, named by its run
    assert "[s0] ekd.train: training mobilefacenet for 1 epoch" in err
    assert "[s0] ekd.train: epoch 1/1" in err and "[s1] ekd.train: finished 1 epoch" in err, err
    assert alone[0].final_terms != alone[1].final_terms  # the seeds differ, so order matters
    for a, b in zip(alone, together):
        assert a.final_terms == b.final_terms
        sa = torch.load(a.model_path, weights_only=True)
        sb = torch.load(b.model_path, weights_only=True)
        sa, sb = sa.get("state_dict", sa), sb.get("state_dict", sb)
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(sa[key], sb[key]), key


def test_a_failing_child_names_its_run(tmp_path):
    cfgs = _configs(tmp_path)
    cfgs[1].teacher.kind, cfgs[1].teacher.path = "checkpoint", str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=f"training {tmp_path / 's1'}: .*missing.pt"):
        train_side_by_side(cfgs, jobs=2)
