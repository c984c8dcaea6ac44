"""``model.width``: a thinner MobileFaceNet with the same state_dict keys, validated, trained
and reloaded from its checkpoint by ``ekd eval``'s loader."""

from __future__ import annotations

import pytest
import torch

from ekd.commands.cli import main
from ekd.commands.eval_report import evaluate_checkpoint
from ekd.config import validate
from ekd.engine.preflight import load_checked_config as load_config
from ekd.data import generate_identity_folder
from ekd.errors import ConfigError
from ekd.models import build_backbone, count_parameters
from ekd.models.loading import load_model


def _state(width: float, name: str = "mobilefacenet") -> dict[str, torch.Tensor]:
    return build_backbone(name, embedding_size=64, input_size=32, width=width).state_dict()


@pytest.mark.parametrize("name", ["mobilefacenet", "mbf"])
def test_half_width_keeps_keys_and_halves_every_inner_channel(name: str) -> None:
    full, half = _state(1.0, name), _state(0.5, name)
    assert list(full) == list(half)
    for key, w in full.items():
        h = half[key]
        if w.ndim == 0:  # BatchNorm's num_batches_tracked
            continue
        if key.startswith("conv_sep") or key.startswith("features"):
            # 512-channel head and embedding are kept (conv_sep's input is thinned)
            assert h.shape[0] == w.shape[0], key
            continue
        assert h.shape[0] * 2 == w.shape[0], key  # every inner channel count halves
        if w.ndim == 4 and w.shape[1] > 3:  # grouped conv: in-channels per group
            assert h.shape[1] in (w.shape[1], w.shape[1] // 2), key


def test_width_one_is_todays_network_and_half_width_is_smaller() -> None:
    ref = build_backbone("mobilefacenet", 64, 32)
    same = build_backbone("mobilefacenet", 64, 32, width=1.0)
    assert {k: v.shape for k, v in ref.state_dict().items()} == \
        {k: v.shape for k, v in same.state_dict().items()}
    full, half = count_parameters(ref), count_parameters(build_backbone("mobilefacenet", 64, 32, width=0.5))
    # the pointwise convolutions (most parameters) shrink 4x, the 512-wide head does not
    assert 0.3 * full < half < 0.6 * full
    out = build_backbone("mobilefacenet", 64, 32, width=0.5).eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 64)


@pytest.mark.parametrize("over,needle", [
    (["model.width=0"], "model.width"),
    (["model.width=-1"], "model.width"),
    (["model.width=nan"], "model.width"),
    (["model.width=100"], "model.width"),
    (["model.backbone=iresnet18", "model.width=0.5"], "model.width"),
])
def test_bad_width_is_a_config_error_naming_the_key(over: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        validate(load_config(None, over))


def test_width_checkpoint_round_trip_through_ekd_eval(tmp_path) -> None:
    root = tmp_path / "faces" / "train"
    generate_identity_folder(root, num_identities=6, images_per_identity=4, image_size=32, seed=3)
    out = tmp_path / "run"
    cfg = tmp_path / "width.yaml"
    cfg.write_text("model: {width: 0.5, embedding_size: 32}\n")
    sets = [f"data.root={root}", "data.kind=folder", "data.input_size=32", "sampler.random_size=8",
            "sampler.identities_per_batch=2", "train.epochs=1", "train.max_steps_per_epoch=2",
            "train.progress=false", "train.device=cpu", f"train.output_dir={out}"]
    rc = main(["train", str(cfg), *(a for s in sets for a in ("--set", s))])
    assert rc == 0
    model_file = next(out.rglob("model.pt"))
    loaded = load_model(model_file)
    assert loaded.width == 0.5
    assert loaded.model.layers[0].layers[0].weight.shape[0] == 32
    res = evaluate_checkpoint(model_file, {"f": ("folder", str(root), None)}, progress=False, device="cpu")
    assert res["parameters"] == count_parameters(build_backbone("mobilefacenet", 32, 32, width=0.5))
