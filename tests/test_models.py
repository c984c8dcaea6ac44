"""Backbones: arcface_torch state_dict compatibility, reference outputs, sizes and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ekd.errors import ConfigError
from ekd.models import BACKBONES, build_backbone, count_parameters, feature_map_side

KEYS_FILE = "arcface_torch_state_dict_keys.json"
FORWARD_FILE = "arcface_torch_forward.npz"
JSON_ARCHS = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "mbf"]


def _reference_shapes(testvectors: Path, name: str) -> dict[str, list[int]]:
    with open(testvectors / KEYS_FILE) as handle:
        return json.load(handle)["models"][name]


def _recipe_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Deterministic weights from the test-vector README, in the JSON's key order."""
    out: dict[str, torch.Tensor] = {}
    for i, (key, shape) in enumerate(shapes.items()):
        n = np.random.default_rng(i).standard_normal(shape)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
            continue
        if key.endswith("running_var"):
            value = 1.0 + 0.1 * np.abs(n)
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = 0.1 * n
        elif len(shape) == 1:
            value = 0.5 + 0.05 * n
        else:
            value = n * np.sqrt(1.0 / np.prod(shape[1:]))
        out[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return out


@pytest.mark.parametrize("name", JSON_ARCHS)
def test_state_dict_matches_arcface_torch(testvectors: Path, name: str) -> None:
    ref = _reference_shapes(testvectors, name)
    ours = build_backbone(name).state_dict()
    assert list(ours) == list(ref)
    for key, shape in ref.items():
        assert list(ours[key].shape) == shape, key


@pytest.mark.parametrize("name", ["iresnet18", "iresnet50", "mbf"])
def test_forward_matches_arcface_torch(testvectors: Path, name: str) -> None:
    model = build_backbone(name)
    model.load_state_dict(_recipe_state_dict(_reference_shapes(testvectors, name)), strict=True)
    model.eval()
    vectors = np.load(testvectors / FORWARD_FILE)
    with torch.no_grad():
        out = model(torch.from_numpy(vectors["input"])).numpy()
    expected = vectors[name]
    assert out.shape == expected.shape == (2, 512)
    rel = np.abs(out - expected).max() / np.abs(expected).max()
    assert rel <= 1e-4, f"{name}: max abs diff / max abs value = {rel:.2e}"


# iresnet100 is costly to build on CPU, so it is run at one small size (its layout is covered
# by the state_dict test above).
SHAPE_CASES = [
    (name, size)
    for name in sorted(BACKBONES)
    for size in (112, 64, 56)
    if name != "iresnet100" or size == 56
]


@pytest.mark.parametrize("name, size", SHAPE_CASES)
def test_output_shape_follows_input_and_embedding_size(name: str, size: int) -> None:
    x = torch.randn(1, 3, size, size)
    for emb in (512, 128):
        model = build_backbone(name, embedding_size=emb, input_size=size).eval()
        assert model.embedding_size == emb and model.input_size == size
        with torch.no_grad():
            assert model(x).shape == (1, emb)


@pytest.mark.parametrize("size, side", [(112, 7), (64, 4), (56, 4), (48, 3), (32, 2), (100, 7)])
def test_feature_map_side(size: int, side: int) -> None:
    assert feature_map_side(size) == side


def test_iresnet_fc_and_gdc_follow_input_size() -> None:
    assert build_backbone("iresnet18", input_size=48).fc.in_features == 512 * 3 * 3
    gdc_conv = build_backbone("mobilefacenet", input_size=48).features.layers[0].layers[0]
    assert gdc_conv.kernel_size == (3, 3)


def test_iresnet_features_weight_is_frozen_at_one() -> None:
    model = build_backbone("iresnet18", embedding_size=128, input_size=64)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(128))
    trainable = count_parameters(model, trainable_only=True)
    assert trainable == count_parameters(model) - 128


def test_mobilefacenet_backward_with_dropout() -> None:
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet", embedding_size=128, input_size=48, dropout=0.2)
    model.train()
    loss = model(torch.randn(4, 3, 48, 48)).pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mobilefacenet_is_narrower_than_mbf() -> None:
    small, wide = build_backbone("mobilefacenet"), build_backbone("mbf")
    assert small.layers[0].layers[0].out_channels == 64
    assert wide.layers[0].layers[0].out_channels == 128
    assert count_parameters(small) < count_parameters(wide)


def test_unknown_backbone_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="resnet9000.*iresnet18.*mobilefacenet"):
        build_backbone("resnet9000")


@pytest.mark.parametrize("size", [16, 31, 0, -112])
def test_too_small_input_raises_config_error(size: int) -> None:
    with pytest.raises(ConfigError, match=str(size)):
        build_backbone("mobilefacenet", input_size=size)


@pytest.mark.parametrize(
    "kwargs", [{"embedding_size": 0}, {"input_size": 112.0}, {"dropout": 1.0}, {"dropout": -0.1}]
)
def test_bad_arguments_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        build_backbone("iresnet18", **kwargs)
