"""Every distiller of the zoo trains through ``ekd train`` from its YAML config (configs/zoo), on a
tiny synthetic identity folder; the trainer provides the extras each method requires and refuses
what it cannot provide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ekd.commands.cli import main
from ekd.config import load_config
from ekd.data import generate_identity_folder
from ekd.engine.distill_inputs import distiller_extras
from ekd.engine.trainer import Trainer
from ekd.errors import ConfigError
from ekd.models import build_backbone
from ekd.utils.checkpoint_io import FORMAT, VERSION, load_file, save_atomic

ZOO_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "zoo").glob("*.yaml"))
IDS, EMB, SIZE = 12, 32, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_faces") / "train"
    generate_identity_folder(root, num_identities=IDS, images_per_identity=6, image_size=SIZE, seed=3)
    return root


def _teacher(path: Path, classes: int | None = IDS, emb: int = EMB) -> Path:
    """A teacher file: an ekd checkpoint (with its classifier unless ``classes`` is None) in the
    format of :meth:`Trainer.save_checkpoint`, or a bare arcface_torch-style state_dict."""
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet", embedding_size=emb, input_size=SIZE)
    if classes is None:
        torch.save(model.state_dict(), path)
        return path
    save_atomic({"format": FORMAT, "version": VERSION,
                 "model_meta": {"backbone": "mobilefacenet", "embedding_size": emb,
                                "input_size": SIZE, "num_classes": classes},
                 "model": model.state_dict(), "head": {"weight": torch.randn(classes, emb)},
                 "config": {}}, path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("zoo_teacher") / "teacher.pt")


def _tiny(folder: Path, teacher: Path, out: Path) -> list[str]:
    return [f"data.kind=folder", f"data.root={folder}", f"data.input_size={SIZE}",
            f"model.embedding_size={EMB}", "sampler.random_size=8",
            "sampler.identities_per_batch=4", "sampler.samples_per_identity=2",
            "teacher.kind=checkpoint", f"teacher.path={teacher}", "teacher.backbone=mobilefacenet",
            "train.epochs=1", "train.max_steps_per_epoch=1", "train.progress=false",
            "train.device=cpu", "train.log_every=1", "optim.warmup_epochs=0",
            f"train.output_dir={out}"]


def test_there_is_a_config_per_method():
    from ekd.distill import DISTILLERS

    names = {p.stem for p in ZOO_CONFIGS}
    assert set(DISTILLERS) - {"ekd"} <= names


@pytest.mark.parametrize("config", ZOO_CONFIGS, ids=lambda p: p.stem)
def test_every_method_trains_from_its_yaml_through_ekd_train(config, folder, teacher, tmp_path):
    args = ["train", str(config)]
    for item in _tiny(folder, teacher, tmp_path / "run"):
        args += ["--set", item]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("epoch_end")]
    assert len(steps) == 1 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    cfg = load_config(config)
    for d in cfg.distill:
        assert any(k.startswith(d.name) for k in steps[-1]), (d.name, steps[-1].keys())
    replaces_ce = any(d.name in ("margin_distill", "proxylesskd", "adadistill")
                      and d.params.get("replace_ce", True) for d in cfg.distill)
    assert ("ce" in steps[-1]) != replaces_ce
    assert (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.parametrize("name", ["kd", "margin_distill", "proxylesskd"])
def test_classifier_methods_refuse_a_teacher_without_classifier(name, folder, tmp_path):
    bare = _teacher(tmp_path / "backbone.pth", classes=None)
    cfg = load_config(None, _tiny(folder, bare, tmp_path / "s") + [f"distill=[{{name: {name}}}]"])
    with pytest.raises(ConfigError, match=f"'{name}' needs the teacher's classifier.*backbone.pth"):
        Trainer(cfg)


def test_teacher_classifier_on_other_identities_is_refused(folder, tmp_path):
    other = _teacher(tmp_path / "other.pt", classes=IDS + 3)
    cfg = load_config(None, _tiny(folder, other, tmp_path / "s") + ["distill=[{name: kd}]"])
    with pytest.raises(ConfigError, match="same identities"):
        Trainer(cfg)


def test_shared_space_method_with_other_width_is_refused_at_start(folder, tmp_path):
    wide = _teacher(tmp_path / "wide.pt", emb=2 * EMB)
    cfg = load_config(None, _tiny(folder, wide, tmp_path / "s") + ["distill=[{name: adadistill}]"])
    with pytest.raises(ConfigError, match="widths must match"):
        Trainer(cfg)


def test_fitnet_regressor_is_built_and_optimised(folder, tmp_path):
    wide = _teacher(tmp_path / "wide.pt", classes=None, emb=2 * EMB)
    cfg = load_config(None, _tiny(folder, wide, tmp_path / "s") + ["distill=[{name: fitnet}]"])
    trainer = Trainer(cfg)
    reg = trainer.distillers[0].regressor
    assert reg is not None and reg.weight.shape == (2 * EMB, EMB)
    assert any(p is reg.weight for g in trainer.optimizer.param_groups for p in g["params"])
    before = reg.weight.detach().clone()
    images, labels, indices = next(iter(trainer.loader))
    terms = trainer.train_step(images, labels, indices, torch.zeros(len(labels), dtype=torch.bool))
    assert {"ce", "fitnet"} <= set(terms) and not torch.equal(before, reg.weight)


def test_extras_are_computed_only_when_required(folder, teacher, tmp_path):
    cfg = load_config(None, _tiny(folder, teacher, tmp_path / "s")
                      + ["distill=[{name: cosine, weight: 5}, {name: cosine}, {name: kd}]"])
    trainer = Trainer(cfg)
    images, labels, indices = next(iter(trainer.loader))
    emb, t_emb = torch.randn(len(labels), EMB), torch.randn(len(labels), EMB)

    def extras_of(distillers):
        return distiller_extras(distillers, emb, t_emb, trainer.head, trainer.teacher_centers,
                                trainer.cfg.sampler.random_size)

    extras = extras_of(trainer.distillers)  # one dict per distiller
    assert [set(e) for e in extras] == [set(), set(), {"student_logits", "teacher_logits"}]
    assert extras[2]["teacher_logits"].shape == (len(labels), IDS)
    terms = trainer.compute_terms(images, labels, indices, torch.zeros(len(labels), dtype=torch.bool))
    assert {"ce", "cosine", "cosine_1", "kd"} == set(terms)  # composed, each term named
    assert extras_of(trainer.distillers[:1]) == [{}]


def test_adadistill_centres_are_checkpointed(folder, teacher, tmp_path):
    cfg = load_config(None, _tiny(folder, teacher, tmp_path / "s") + ["distill=[{name: adadistill}]"])
    trainer = Trainer(cfg)
    assert trainer.ce_replaced and trainer.distillers[0].centres.shape == (IDS, EMB)
    result = trainer.fit()
    ckpt = load_file(result.run_dir / "checkpoints" / "last.pt")
    assert torch.equal(ckpt["distillers"]["0.centres"], trainer.distillers[0].centres)
