"""The Trainer's public step API, for code that drives steps itself (the benchmarks in bench/):
``mirror`` draws the flips ``fit`` feeds the current step, ``step_embedding`` is the student
embedding of the batch ``compute_terms`` last saw, gone once ``train_step`` has used it."""

from __future__ import annotations

import pytest
import torch

from ekd.config import load_config
from ekd.data import generate_identity_folder
from ekd.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "train"
    generate_identity_folder(root, num_identities=6, images_per_identity=4, image_size=32, seed=3)
    out = tmp_path_factory.mktemp("run")
    return Trainer(load_config(None, [
        "data.kind=folder", f"data.root={root}", "data.input_size=32", "model.backbone=mobilefacenet",
        "model.embedding_size=16", "sampler.random_size=8", "sampler.identities_per_batch=4",
        "train.epochs=1", "train.progress=false", "train.device=cpu", f"train.output_dir={out}",
        "train.max_steps_per_epoch=2"]))


def test_mirror_draws_the_steps_flips(trainer):
    images, _, _ = next(iter(trainer.loader))
    mirrored, flipped = trainer.mirror(images)
    again, flipped_again = trainer._mirror(images)  # what fit() feeds train_step at this step
    assert torch.equal(mirrored, again) and torch.equal(flipped, flipped_again)
    assert flipped.dtype == torch.bool and flipped.shape == (len(images),)
    assert torch.equal(mirrored[~flipped], images[~flipped])
    assert torch.equal(mirrored[flipped], images[flipped].flip(-1))
    assert torch.equal(trainer.mirror(images)[1], flipped)  # same step, same flips


def test_step_embedding_is_the_last_batchs_until_the_step_uses_it(trainer):
    images, labels, indices = next(iter(trainer.loader))
    images, flipped = trainer.mirror(images)
    assert trainer.step_embedding is None
    terms = trainer.compute_terms(images, labels, indices, flipped)
    emb = trainer.step_embedding
    assert emb is not None and emb.shape == (len(labels), 16) and emb.dtype == torch.float32
    assert emb.requires_grad and "ce" in terms
    trainer.train_step(images, labels, indices, flipped)
    assert trainer.step_embedding is None
