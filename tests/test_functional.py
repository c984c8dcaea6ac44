"""``unit``: F.normalize's values and gradients, but a bounded gradient at zero vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ekd.functional import cosine, unit


def test_matches_f_normalize_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    w = torch.randn(16, 8, dtype=torch.float64)
    (unit(x) * w).sum().backward()
    (F.normalize(y) * w).sum().backward()
    assert torch.allclose(unit(x), F.normalize(y), rtol=0, atol=1e-15)
    assert torch.allclose(x.grad, y.grad, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda t: unit(t), (x.detach().clone().requires_grad_(True),))


def test_zero_rows_get_zero_gradient_in_float32_and_float16():
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(4, 8).to(dtype)
        x[1] = 0
        x.requires_grad_(True)
        (unit(x) * torch.randn(4, 8).to(dtype)).sum().backward()
        assert torch.isfinite(x.grad).all() and float(x.grad[1].abs().max()) == 0.0


def test_cosine_is_rowwise():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(cosine(a, b), F.cosine_similarity(a, b, dim=1), atol=1e-6)
