"""Improved ResNets (IResNet) for face recognition.

The module layout reproduces the ``state_dict`` of InsightFace arcface_torch's ``iresnet``
backbones key for key, so that their published checkpoints load with ``strict=True``.  Unlike
the original, the width of the final fully connected layer follows the input size
(``ceil(size / 16)`` squared positions), so 64, 56 or 48 pixel crops work as well as 112.
"""

from __future__ import annotations

import torch
from torch import nn

from ekd.models.init import init_backbone

__all__ = [
    "IBasicBlock",
    "IResNet",
    "feature_map_side",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
]

_BN_EPS = 1e-5
_LAYOUTS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


def feature_map_side(input_size: int) -> int:
    """Side of the map left after four stride-2, 3x3, padding-1 stages: ``ceil(size / 16)``."""
    side = int(input_size)
    for _ in range(4):
        side = (side + 1) // 2
    return side


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation style residual block: BN, conv, BN, PReLU, strided conv, BN (+ shortcut)."""

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_ch, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch plus (possibly projected) shortcut."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone mapping ``[B, 3, S, S]`` images to ``[B, embedding_size]`` embeddings."""

    def __init__(
        self,
        layers: tuple[int, int, int, int] | list[int],
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {list(layers)}")
        self.embedding_size = int(embedding_size)
        self.input_size = int(input_size)
        side = feature_map_side(self.input_size)

        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.prelu = nn.PReLU(64)
        in_ch = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            blocks = [IBasicBlock(in_ch, planes, stride=2)]
            blocks += [IBasicBlock(planes, planes) for _ in range(depth - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_ch = planes
        self.bn2 = nn.BatchNorm2d(512, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * side * side, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size, eps=_BN_EPS)
        init_backbone(self, linear="normal")
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (un-normalised) embedding of each image."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def _build(name: str, embedding_size: int, input_size: int, dropout: float) -> IResNet:
    return IResNet(_LAYOUTS[name], embedding_size, input_size, dropout)


def iresnet18(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    """IResNet-18 (stage depths 2, 2, 2, 2)."""
    return _build("iresnet18", embedding_size, input_size, dropout)


def iresnet34(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    """IResNet-34 (stage depths 3, 4, 6, 3)."""
    return _build("iresnet34", embedding_size, input_size, dropout)


def iresnet50(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    """IResNet-50 (stage depths 3, 4, 14, 3)."""
    return _build("iresnet50", embedding_size, input_size, dropout)


def iresnet100(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> IResNet:
    """IResNet-100 (stage depths 3, 13, 30, 3)."""
    return _build("iresnet100", embedding_size, input_size, dropout)
