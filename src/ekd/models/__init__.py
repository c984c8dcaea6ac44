"""Face-recognition backbones and a name -> constructor registry; :mod:`.loading` restores a
backbone from an ekd checkpoint or an arcface_torch ``backbone.pth``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ekd.errors import ConfigError
from ekd.models.iresnet import (
    IResNet,
    feature_map_side,
    iresnet18,
    iresnet34,
    iresnet50,
    iresnet100,
)
from ekd.models.mobilefacenet import MobileFaceNet, mbf, mobilefacenet

__all__ = [
    "BACKBONES",
    "IResNet",
    "MIN_INPUT_SIZE",
    "WIDTH_BACKBONES",
    "MobileFaceNet",
    "build_backbone",
    "check_width",
    "count_parameters",
    "feature_map_side",
]

#: Smallest accepted square input side, in pixels.
MIN_INPUT_SIZE = 32

#: Each constructor takes ``(embedding_size, input_size, dropout)``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
    "mobilefacenet": mobilefacenet,
    "mbf": mbf,
}


#: Backbones that accept a channel ``width`` multiplier (``model.width``).
WIDTH_BACKBONES = ("mobilefacenet", "mbf")
#: Largest accepted ``model.width`` (4x is already a 16x larger body).
MAX_WIDTH = 4.0


def build_backbone(
    name: str,
    embedding_size: int = 512,
    input_size: int = 112,
    dropout: float = 0.0,
    width: float = 1.0,
) -> nn.Module:
    """Build backbone ``name`` for square ``input_size`` crops, emitting ``embedding_size`` dims.

    ``width`` thins the MobileFaceNet family (see :mod:`ekd.models.mobilefacenet`).
    Raises :class:`ConfigError` for an unknown name or an unusable size / dropout / width.
    """
    key = str(name).strip().lower()
    if key not in BACKBONES:
        valid = ", ".join(sorted(BACKBONES))
        raise ConfigError(f"unknown backbone {name!r}; valid names: {valid}")
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ConfigError(f"input_size must be an integer, got {input_size!r}")
    if input_size < MIN_INPUT_SIZE or feature_map_side(input_size) < 1:
        raise ConfigError(
            f"input_size {input_size} is too small for {key}; it must be at least {MIN_INPUT_SIZE}"
        )
    valid_int = isinstance(embedding_size, int) and not isinstance(embedding_size, bool)
    if not valid_int or embedding_size < 1:
        raise ConfigError(f"embedding_size must be a positive integer, got {embedding_size!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
    check_width(key, width)
    build = BACKBONES[key]
    if key in WIDTH_BACKBONES:
        return build(embedding_size=embedding_size, input_size=input_size, dropout=float(dropout),
                     width=float(width))
    return build(embedding_size=embedding_size, input_size=input_size, dropout=float(dropout))


def check_width(backbone: str, width: object, key: str = "model.width") -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``width`` is a number in (0, MAX_WIDTH],
    and 1.0 for backbones outside :data:`WIDTH_BACKBONES`."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= MAX_WIDTH:
        raise ConfigError(f"{key} must be a number in (0, {MAX_WIDTH:g}], got {width!r}")
    name = str(backbone).strip().lower()
    if float(width) != 1.0 and name not in WIDTH_BACKBONES:
        raise ConfigError(f"{key} {width!r} applies only to the {', '.join(WIDTH_BACKBONES)} "
                          f"backbones, not {name}; leave it at 1.0")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``model`` (only those requiring grad if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
