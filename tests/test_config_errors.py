"""Config validation: each impossible value is a ConfigError naming the key and what is valid."""

from __future__ import annotations

import pytest

from ekd.engine.preflight import load_checked_config as load_config
from ekd.errors import ConfigError
from ekd.models import MIN_INPUT_SIZE

TEACHER = ["teacher.kind=checkpoint", "teacher.path=t.pt"]


@pytest.mark.parametrize("overrides, message", [
    # unknown keys and wrong types
    (["data.on_corupt=skip"], r"unknown key 'data.on_corupt'; valid keys of data: .*on_corrupt"),
    (["sampler.batch_size=8"], r"'sampler.batch_size'.*random_size, identities_per_batch"),
    (["data.input_size=big"], r"data.input_size: expected an integer, got 'big'"),
    (["distill=[{name: ekd, wieght: 2}]", *TEACHER], r"'distill\[0\].wieght'.*name, weight, params"),
    # impossible values
    (["sampler.random_size=-64"], r"sampler.random_size must be >= 0, got -64"),
    (["sampler.identities_per_batch=-1"], r"sampler.identities_per_batch must be >= 0"),
    (["sampler.samples_per_identity=0"], r"sampler.samples_per_identity must be > 0"),
    (["eval.batch_size=-1"], r"eval.batch_size must be > 0"),
    (["optim.lr=.nan"], r"optim.lr must be a finite number, got nan"),
    (["head.scale=.inf"], r"head.scale must be a finite number"),
    (["distill=[{name: ekd, weight: .nan}]", *TEACHER], r"distill\[0\].weight must be a finite"),
    (["head.scale=0"], r"head.scale must be > 0"),
    (["head.margin=-0.1"], r"head.margin must be >= 0"),
    (["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
    (["optim.momentum=1.5"], r"optim.momentum must be in \[0, 1\)"),
    (["optim.gamma=0"], r"optim.gamma must be > 0"),
    (["optim.warmup_epochs=20", "train.epochs=10"], r"optim.warmup_epochs=20.0 exceeds train.epochs=10"),
    (["optim.milestones=[5, 3]"], r"optim.milestones must be increasing"),
    (["optim.milestones=[5, 30]", "train.epochs=10"], r"optim.milestones: 30 is not an epoch in \(0, train.epochs=10\)"),
    (["optim.milestones=[soon]"], r"optim.milestones: 'soon' is not an epoch"),
    (["train.device=gpu"], r"train.device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    (["train.max_steps_per_epoch=0"], r"train.max_steps_per_epoch must be >= 1 or null"),
    (["eval.max_per_identity=1"], r"eval.max_per_identity must be >= 2 or null"),
    (["teacher.embedding_size=0", *TEACHER], r"teacher.embedding_size must be > 0"),
    (["data.synthetic.train_images=0"], r"data.synthetic.train_images must be > 0"),
    # backbone and input size
    (["model.backbone=resnet50"], r"model.backbone: 'resnet50' is not one of iresnet100, iresnet18, "
                                  r"iresnet34, iresnet50, mbf, mobilefacenet"),
    (["teacher.backbone=vit", *TEACHER], r"teacher.backbone: 'vit' is not one of iresnet100"),
    ([f"data.input_size={MIN_INPUT_SIZE - 1}"],
     rf"data.input_size={MIN_INPUT_SIZE - 1} is too small .* the minimum is {MIN_INPUT_SIZE}"),
    # P x K against the (synthetic) data the config describes
    (["sampler.identities_per_batch=300", "data.synthetic.train_identities=200"],
     r"sampler.identities_per_batch=300 exceeds data.synthetic.train_identities=200"),
    (["data.synthetic.train_images=1"], r"identities_per_batch > 0 needs identities with 2 or more images"),
    (["sampler.random_size=5000"], r"one batch \(5000 samples: sampler.random_size=5000.*larger than the "
                                   r"synthetic training set \(3200 images\)"),
    (["sampler.random_size=0", "sampler.identities_per_batch=200", "sampler.samples_per_identity=17",
      "train.ce_on=all"], r"one batch \(3400 samples.*200 x 17\) is larger than"),
    # distillers
    (["distill=[{name: ekdd}]", *TEACHER], r"distill\[0\].name: 'ekdd' is not one of .*ekd"),
    (["distill=[{name: ekd}]", "sampler.samples_per_identity=1", *TEACHER],
     r"distill\[0\] 'ekd' needs positive pairs .*samples_per_identity=1: set identities_per_batch >= 1 "
     r"and samples_per_identity >= 2"),
    (["distill=[{name: cosine}, {name: ekd}]", "sampler.identities_per_batch=0", *TEACHER],
     r"distill\[1\] 'ekd' needs positive pairs .*identities_per_batch=0"),
])
def test_impossible_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_valid_edge_values_still_load():
    cfg = load_config(None, [f"data.input_size={MIN_INPUT_SIZE}", "train.device=cuda:1",
                             "optim.milestones=[2, 4.5]", "distill=[{name: cosine}]",
                             "sampler.samples_per_identity=1", *TEACHER])
    assert cfg.data.input_size == MIN_INPUT_SIZE and cfg.distill[0].name == "cosine"
    # a folder's size is unknown until it is listed: the sampler checks P x K there
    load_config(None, ["data.kind=folder", "data.root=/x", "sampler.identities_per_batch=100000"])
