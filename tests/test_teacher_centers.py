"""Class centres of an embedding-only teacher (``teacher.centers: mean_embedding``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekd.config import load_config
from ekd.data import ImageFolderDataset, generate_identity_folder
from ekd.engine.trainer import Trainer
from ekd.errors import ConfigError, DataError
from ekd.teachers.cache import TeacherCache, mean_embedding_centers
from ekd.teachers.cache_builder import build_cache


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "train"
    generate_identity_folder(root, num_identities=6, images_per_identity=4, image_size=32, seed=5)
    dataset = ImageFolderDataset(root, input_size=32)
    proj = torch.randn(3 * 32 * 32, 12, generator=torch.Generator().manual_seed(0))
    cache = build_cache(lambda x: x.flatten(1) @ proj, dataset, root.parent / "cache", teacher_fp="t",
                        teacher_name="random projection", progress=False)
    return root, dataset, cache


def _overrides(root, cache, out, *extra):
    return ["data.kind=folder", f"data.root={root}", "data.input_size=32", "model.embedding_size=12",
            "sampler.random_size=8", "sampler.identities_per_batch=2", "train.epochs=1",
            "train.progress=false", "train.device=cpu", f"train.output_dir={out}",
            "train.max_steps_per_epoch=2", "teacher.kind=cache", f"teacher.path={cache}", *extra]


def test_centers_are_normalised_means_of_both_views(cached):
    _, dataset, cache_dir = cached
    cache = TeacherCache(cache_dir)
    centers = mean_embedding_centers(cache, dataset.labels, dataset.num_classes)
    n = len(dataset)
    views = [cache.lookup(torch.arange(n), torch.full((n,), f, dtype=torch.bool)).numpy() for f in (False, True)]
    unit = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in views]
    for c in range(dataset.num_classes):
        rows = dataset.labels == c
        mean = unit[0][rows].sum(0) + unit[1][rows].sum(0)
        assert np.allclose(centers[c].numpy(), mean / np.linalg.norm(mean), atol=2e-3)
    with pytest.raises(DataError, match=r"no embedding for class\(es\) \[6, 7\]"):
        mean_embedding_centers(cache, dataset.labels, dataset.num_classes + 2)


def test_classifier_methods_train_from_a_cache_with_mean_centers(cached, tmp_path):
    root, dataset, cache = cached
    for name in ("kd", "margin_distill", "proxylesskd"):
        with pytest.raises(ConfigError, match="has none"):
            Trainer(load_config(None, _overrides(root, cache, tmp_path / name, f"distill=[{{name: {name}}}]")))
        trainer = Trainer(load_config(None, _overrides(root, cache, tmp_path / name, f"distill=[{{name: {name}}}]",
                                                       "teacher.centers=mean_embedding")))
        assert trainer.teacher_centers.shape == (dataset.num_classes, 12)
        assert torch.allclose(trainer.teacher_centers.norm(dim=1), torch.ones(dataset.num_classes))
        result = trainer.fit()
        assert result.final_terms and all(np.isfinite(v) for v in result.final_terms.values())


def test_mean_centers_need_a_cache_teacher(cached, tmp_path):
    root, _, cache = cached
    with pytest.raises(ConfigError, match="teacher.centers=mean_embedding needs teacher.kind=cache"):
        Trainer(load_config(None, _overrides(root, cache, tmp_path / "x", "teacher.kind=checkpoint",
                                             "teacher.centers=mean_embedding", "distill=[{name: kd}]")))
    with pytest.raises(ConfigError, match="teacher.centers"):
        load_config(None, _overrides(root, cache, tmp_path / "x", "teacher.centers=average"))
