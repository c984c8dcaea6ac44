"""ArcFace and CosFace margin logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ekd.errors import ConfigError
from ekd.heads import ArcFace, CosFace, build_head


def _cos(head, emb):
    return F.linear(F.normalize(emb), F.normalize(head.weight))


def test_arcface_target_is_cos_theta_plus_m():
    torch.manual_seed(0)
    head = ArcFace(8, 5, scale=10.0, margin=0.5)
    emb, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = head(emb, y)
    cos = _cos(head, emb)
    for i, c in enumerate(y.tolist()):
        theta = math.acos(float(cos[i, c]))
        expected = math.cos(theta + 0.5) if theta + 0.5 < math.pi else float(cos[i, c]) - math.sin(math.pi - 0.5) * 0.5
        assert float(logits[i, c]) == pytest.approx(10 * expected, abs=1e-4)
        others = [j for j in range(5) if j != c]
        assert torch.allclose(logits[i, others], 10 * cos[i, others], atol=1e-5)


def test_arcface_is_safe_beyond_pi():
    head = ArcFace(2, 2, scale=1.0, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    emb = torch.tensor([[-1.0, 1e-3]], requires_grad=True)  # theta ~ pi
    logit = head(emb, torch.tensor([0]))[0, 0]
    logit.backward()
    assert torch.isfinite(emb.grad).all()
    assert float(logit) == pytest.approx(-1.0 - math.sin(math.pi - 0.5) * 0.5, abs=1e-4)


def test_cosface_subtracts_margin():
    torch.manual_seed(0)
    head = CosFace(8, 3, scale=30.0, margin=0.35)
    emb, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    logits = head(emb, y)
    cos = _cos(head, emb)
    assert torch.allclose(logits[torch.arange(4), y], 30 * (cos[torch.arange(4), y] - 0.35), atol=1e-4)


def test_build_head_errors():
    with pytest.raises(ConfigError, match="valid: arcface, cosface"):
        build_head("sphereface", 8, 3)
