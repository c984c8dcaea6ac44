"""Weight initialisation shared by the backbones."""

from __future__ import annotations

from torch import nn


def init_backbone(model: nn.Module, linear: str = "normal") -> None:
    """Kaiming-normal (fan-out) convolutions, unit/zero batch norms, and linear layers drawn
    ``N(0, 0.01^2)`` (``linear="normal"``) or Kaiming-normal (``linear="kaiming"``), zero linear biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear == "kaiming":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
