"""MobileFaceNet with a global depthwise-convolution (GDC) embedding head.

Module names and nesting follow InsightFace arcface_torch's ``mobilefacenet`` backbone, so the
``mbf`` variant (width scale 2) has the very ``state_dict`` of its published checkpoints, while
``mobilefacenet`` (scale 1) is the original, narrower network (64/128 channels) used by the EKD
authors.  The GDC kernel follows the input size (``ceil(size / 16)``), so small crops work too.

``width`` (``model.width``) thins the network: the 64-channel unit, and with it every channel
count and every bottleneck expansion width (128/256/512), is multiplied by ``width`` and rounded
to a multiple of 8; the 512-channel ``conv_sep`` / GDC and the embedding are kept, as arcface_torch
keeps them for ``mbf``.  Module names, and so ``state_dict`` keys, do not depend on ``width``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ekd.models.init import init_backbone

from ekd.models.iresnet import feature_map_side

__all__ = [
    "ConvBlock",
    "DepthWise",
    "GDC",
    "LinearBlock",
    "MobileFaceNet",
    "Residual",
    "mbf",
    "mobilefacenet",
    "width_unit",
]

_Pair = int | tuple[int, int]


class LinearBlock(nn.Module):
    """Convolution (no bias) and batch norm without a non-linearity, kept in ``self.layers``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: _Pair = 1,
        stride: _Pair = 1,
        padding: _Pair = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block's layers."""
        return self.layers(x)


class ConvBlock(LinearBlock):
    """Convolution (no bias), batch norm and PReLU, kept in ``self.layers``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: _Pair = 1,
        stride: _Pair = 1,
        padding: _Pair = 0,
        groups: int = 1,
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride, padding, groups)
        self.layers.append(nn.PReLU(out_ch))


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``groups``, depthwise kxk, 1x1 linear projection."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        residual: bool = False,
        kernel: _Pair = 3,
        stride: _Pair = 2,
        padding: _Pair = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_ch, groups),
            ConvBlock(groups, groups, kernel, stride, padding, groups=groups),
            LinearBlock(groups, out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck output, plus the input when residual."""
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """A stack of ``num_block`` stride-1 residual :class:`DepthWise` blocks."""

    def __init__(
        self,
        channels: int,
        num_block: int,
        groups: int,
        kernel: _Pair = 3,
        stride: _Pair = 1,
        padding: _Pair = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[
                DepthWise(channels, channels, True, kernel, stride, padding, groups)
                for _ in range(num_block)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks in order."""
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the whole map, flatten, linear (no bias), BatchNorm1d."""

    def __init__(self, embedding_size: int, kernel: int = 7, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=kernel, groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        # Parameter-free, so it leaves the state_dict unchanged.
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, 512, k, k]`` to ``[B, embedding_size]``."""
        x = self.layers[1](self.layers[0](x))
        return self.layers[3](self.layers[2](self.dropout(x)))


class MobileFaceNet(nn.Module):
    """MobileFaceNet; ``scale`` multiplies the 64/128 channel widths (1: original, 2: mbf) and
    ``width`` thins channels and expansion widths alike (0.5: half-width; see the module doc)."""

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int = 112,
        scale: int = 1,
        blocks: Sequence[int] = (1, 4, 6, 2),
        dropout: float = 0.0,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet needs 4 block counts, got {list(blocks)}")
        if not width > 0:
            raise ValueError(f"MobileFaceNet width must be > 0, got {width!r}")
        self.embedding_size = int(embedding_size)
        self.input_size = int(input_size)
        self.width = float(width)
        unit = width_unit(width)  # 64 at width 1
        c64, c128 = unit * scale, 2 * unit * scale
        e128, e256, e512 = 2 * unit, 4 * unit, 8 * unit
        self.layers = nn.ModuleList([ConvBlock(3, c64, kernel=3, stride=2, padding=1)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c64, c64, kernel=3, stride=1, padding=1, groups=unit))
        else:
            self.layers.append(Residual(c64, blocks[0], groups=e128))
        self.layers.extend(
            [
                DepthWise(c64, c64, stride=2, groups=e128),
                Residual(c64, blocks[1], groups=e128),
                DepthWise(c64, c128, stride=2, groups=e256),
                Residual(c128, blocks[2], groups=e256),
                DepthWise(c128, c128, stride=2, groups=e512),
                Residual(c128, blocks[3], groups=e256),
            ]
        )
        self.conv_sep = ConvBlock(c128, 512)
        kernel = feature_map_side(self.input_size)
        self.features = GDC(self.embedding_size, kernel=kernel, dropout=dropout)
        init_backbone(self, linear="kaiming")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (un-normalised) embedding of each image."""
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def width_unit(width: float) -> int:
    """The base channel count at ``width``: ``64 * width`` rounded to a multiple of 8 (>= 8)."""
    return max(8, int(round(64 * float(width) / 8)) * 8)


def mobilefacenet(
    embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0, width: float = 1.0
) -> MobileFaceNet:
    """Original-width MobileFaceNet (scale 1), as used by the EKD authors."""
    return MobileFaceNet(embedding_size, input_size, scale=1, dropout=dropout, width=width)


def mbf(
    embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0, width: float = 1.0
) -> MobileFaceNet:
    """arcface_torch's ``mbf``: MobileFaceNet at width scale 2."""
    return MobileFaceNet(embedding_size, input_size, scale=2, dropout=dropout, width=width)
