"""Exact resume with stateful distillers: EKD's FPR anchors and cross-batch memory, AdaDistill's
class centres. A run killed after epoch 1 and resumed equals the straight run, bit for bit, in
the student weights and in every distiller buffer."""

from __future__ import annotations

import pytest
import torch

from ekd.config import load_config
from ekd.data import generate_identity_folder
from ekd.engine.trainer import Trainer, train
from ekd.models import build_backbone
from ekd.utils.checkpoint_io import FORMAT, VERSION, load_file, save_atomic

from test_scale import _die_after_first_epoch

SIZE, EMB, IDS = 32, 16, 8
DISTILLERS = {
    "ekd_memory": ("distill=[{name: ekd, params: {memory_size: 32}}]",
                   ("student_anchor", "teacher_anchor", "memory_student", "memory_next")),
    "adadistill": ("distill=[{name: adadistill}]", ("centres",)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_kd")
    root = tmp / "train"
    generate_identity_folder(root, num_identities=IDS, images_per_identity=4, image_size=SIZE,
                             seed=5)
    torch.manual_seed(0)
    teacher = build_backbone("mobilefacenet", EMB, SIZE)
    save_atomic({"format": FORMAT, "version": VERSION, "model": teacher.state_dict(),
                 "model_meta": {"backbone": "mobilefacenet", "embedding_size": EMB,
                                "input_size": SIZE}}, tmp / "teacher.pt")
    return root, tmp / "teacher.pt"


def _overrides(setup, out, distill: str, *extra: str) -> list[str]:
    root, teacher = setup
    return [f"data.kind=folder", f"data.root={root}", f"data.input_size={SIZE}",
            "model.backbone=mobilefacenet", f"model.embedding_size={EMB}",
            "sampler.random_size=4", "sampler.identities_per_batch=3",
            "sampler.samples_per_identity=2", "teacher.kind=checkpoint", f"teacher.path={teacher}",
            "teacher.backbone=mobilefacenet", distill, "train.epochs=2",
            "train.max_steps_per_epoch=2", "train.progress=false", "train.device=cpu",
            "train.log_every=1", "optim.warmup_epochs=0", f"train.output_dir={out}", *extra]


@pytest.mark.parametrize("name", sorted(DISTILLERS))
def test_resume_with_distiller_equals_straight_run(setup, tmp_path, name):
    distill, buffers = DISTILLERS[name]
    train(load_config(None, _overrides(setup, tmp_path / "a", distill)))
    _die_after_first_epoch(Trainer(load_config(None, _overrides(setup, tmp_path / "b", distill))))
    after_one = load_file(tmp_path / "b" / "checkpoints" / "last.pt")["distillers"]
    train(load_config(None, _overrides(setup, tmp_path / "b", distill, "train.resume=auto")))
    a = load_file(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_file(tmp_path / "b" / "checkpoints" / "last.pt")
    for key in buffers:  # the state worth keeping exists and changed during epoch 2
        full = next(k for k in a["distillers"] if k.endswith(key))
        assert not torch.equal(after_one[full], a["distillers"][full]), full
    assert set(a["distillers"]) == set(b["distillers"])
    for key, value in a["distillers"].items():
        assert torch.equal(value, b["distillers"][key]), f"distiller buffer {key} differs"
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"student weight {key} differs"
