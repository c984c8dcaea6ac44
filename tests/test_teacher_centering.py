"""``teacher.center: train_mean``: the teacher's embeddings and class centres less their mean
direction over the training images (ekd.teachers.centering)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ekd.config import _CHOICES, load_config
from ekd.data import ImageFolderDataset, generate_identity_folder
from ekd.engine.trainer import Trainer
from ekd.errors import ConfigError
from ekd.teachers import Teacher
from ekd.teachers.cache import TeacherCache
from ekd.teachers.cache_builder import build_cache
from ekd.teachers.centering import CENTER_CHOICES, CenteredTeacher, cache_mean_direction, live_mean_direction

DIM = 12


def _cone_teacher():
    """A random projection plus one large shared direction: every face in a narrow cone, as the
    dlib teacher's embeddings are."""
    g = torch.Generator().manual_seed(0)
    proj, shared = torch.randn(3 * 32 * 32, DIM, generator=g) * 0.02, torch.randn(DIM, generator=g)
    return lambda x: x.flatten(1) @ proj + 3 * shared


class LiveTeacher(Teacher):
    def __init__(self, fn, head_state=None):
        self.fn, self.embedding_size, self.input_size, self.head_state = fn, DIM, 32, head_state

    def embed(self, images, indices, flipped):
        return self.fn(images)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "train"
    generate_identity_folder(root, num_identities=6, images_per_identity=4, image_size=32, seed=5)
    dataset = ImageFolderDataset(root, input_size=32)
    cache = build_cache(_cone_teacher(), dataset, root.parent / "cache", teacher_fp="t",
                        teacher_name="cone", progress=False)
    return root, dataset, cache


def _units(cache_dir, n):
    cache = TeacherCache(cache_dir)
    views = [cache.lookup(torch.arange(n), torch.full((n,), f, dtype=torch.bool)) for f in (False, True)]
    return [F.normalize(v, dim=1).double().numpy() for v in views]


def _overrides(root, cache, out, *extra):
    return ["data.kind=folder", f"data.root={root}", "data.input_size=32", f"model.embedding_size={DIM}",
            "sampler.random_size=8", "sampler.identities_per_batch=2", "train.epochs=1",
            "train.progress=false", "train.device=cpu", f"train.output_dir={out}",
            "train.max_steps_per_epoch=2", "teacher.kind=cache", f"teacher.path={cache}", *extra]


def test_config_choices_match_the_module():
    assert tuple(_CHOICES["teacher.center"]) == CENTER_CHOICES


def test_trainer_distils_from_the_centred_cache(cached, tmp_path, caplog):
    root, dataset, cache = cached
    n = len(dataset)
    units = _units(cache, n)
    mu = (units[0].sum(0) + units[1].sum(0)) / (2 * n)
    assert np.linalg.norm(mu) > 0.9  # the planted cone
    with caplog.at_level(logging.INFO, logger="ekd.teachers.centering"):
        trainer = Trainer(load_config(None, _overrides(root, cache, tmp_path / "c", "distill=[{name: cosine}]",
                                                       "teacher.center=train_mean")))
    assert f"norm {np.linalg.norm(mu):.3f}" in caplog.text and f"over {n} training images" in caplog.text
    assert isinstance(trainer.teacher, CenteredTeacher)
    idx = torch.tensor([0, 5, 9, 23])
    for flag in (False, True):
        got = trainer.teacher.embed(torch.zeros(4, 3, 32, 32), idx, torch.full((4,), flag)).numpy()
        assert np.allclose(got, units[int(flag)][idx.numpy()] - mu, atol=1e-5)
    centred = np.concatenate(units) - mu
    assert np.abs(centred.mean(0)).max() < 1e-6  # the training set's centred embeddings average to 0
    result = trainer.fit()
    assert np.isfinite(result.final_terms["cosine"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ekd.teachers.centering"):
        plain = Trainer(load_config(None, _overrides(root, cache, tmp_path / "p", "distill=[{name: cosine}]")))
    assert not isinstance(plain.teacher, CenteredTeacher)  # the default leaves the teacher as it is
    assert f"mean unit embedding of norm {np.linalg.norm(mu):.2f} over {n} cached images" in caplog.text
    assert "consider teacher.center=train_mean" in caplog.text


def test_mean_embedding_centres_are_class_means_of_the_centred_embeddings(cached, tmp_path):
    root, dataset, cache = cached
    directions = np.asarray(TeacherCache(cache).embeddings, dtype=np.float64)  # [N, 2, D] as stored
    mu = directions.mean(axis=(0, 1))
    trainer = Trainer(load_config(None, _overrides(root, cache, tmp_path / "k", "distill=[{name: kd}]",
                                                   "teacher.centers=mean_embedding", "teacher.center=train_mean")))
    for c in range(dataset.num_classes):
        rows = dataset.labels == c
        want = directions[rows].mean(axis=(0, 1)) - mu
        assert np.allclose(trainer.teacher_centers[c].numpy(), want / np.linalg.norm(want), atol=1e-5)


def test_live_teacher_mean_over_evenly_spaced_images_and_its_classifier(cached):
    _, dataset, cache = cached
    fn = _cone_teacher()
    n = len(dataset)
    images = torch.stack([dataset[i][0] for i in range(n)])
    units = [F.normalize(fn(im), dim=1).double() for im in (images, images.flip(-1))]
    mu_all, used = live_mean_direction(LiveTeacher(fn), dataset, torch.device("cpu"), 10_000, batch_size=5,
                                       progress=False)
    assert used == n
    assert torch.allclose(mu_all.double(), (units[0].sum(0) + units[1].sum(0)) / (2 * n), atol=1e-6)
    mu_few, used = live_mean_direction(LiveTeacher(fn), dataset, torch.device("cpu"), 4, progress=False)
    chosen = [0, 8, 15, 23]  # 4 images spaced evenly over 24
    assert used == 4
    assert torch.allclose(mu_few.double(), (units[0][chosen].sum(0) + units[1][chosen].sum(0)) / 8, atol=1e-6)
    # the same mean as the cache of the same teacher (which stores float16 directions)
    cache_mu = cache_mean_direction(TeacherCache(cache).embeddings)
    assert torch.allclose(cache_mu, mu_all, atol=2e-3)
    weight = torch.randn(6, DIM)
    centred = CenteredTeacher(LiveTeacher(fn, {"weight": weight}), mu_all, n)
    assert torch.allclose(centred.head_state["weight"], F.normalize(F.normalize(weight, dim=1) - mu_all, dim=1))
    x = images[:3]
    assert torch.allclose(centred.embed(x, torch.arange(3), torch.zeros(3, dtype=torch.bool)),
                          F.normalize(fn(x), dim=1) - mu_all)


def test_a_spread_teacher_gets_no_cone_warning(tmp_path, caplog):
    root = tmp_path / "train"
    generate_identity_folder(root, num_identities=6, images_per_identity=4, image_size=32, seed=5)
    proj = torch.randn(3 * 32 * 32, DIM, generator=torch.Generator().manual_seed(1))
    cache = build_cache(lambda x: x.flatten(1) @ proj, ImageFolderDataset(root, input_size=32), tmp_path / "cache",
                        teacher_fp="t", teacher_name="spread", progress=False)
    with caplog.at_level(logging.INFO, logger="ekd.teachers.centering"):
        Trainer(load_config(None, _overrides(root, cache, tmp_path / "run", "distill=[{name: cosine}]")))
    assert "share one direction" not in caplog.text


def test_bad_values_name_the_key(cached, tmp_path):
    root, _, cache = cached
    with pytest.raises(ConfigError, match=r"teacher.center: 'mean' is not one of none, train_mean"):
        load_config(None, _overrides(root, cache, tmp_path / "x", "teacher.center=mean"))
    with pytest.raises(ConfigError, match=r"teacher.center_images must be > 0, got 0"):
        load_config(None, _overrides(root, cache, tmp_path / "x", "teacher.center_images=0"))
