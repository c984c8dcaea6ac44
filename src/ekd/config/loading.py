"""Loading a run configuration: YAML files read safely, ``--set a.b=c`` overrides, typed conversion
with unknown keys as errors (:mod:`ekd.config.convert`), then the checks of :mod:`ekd.config.checks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ekd.config.checks import validate
from ekd.config.convert import _valid_keys, from_dict, to_dict
from ekd.config.schema import Config
from ekd.errors import ConfigError


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` (list items by index: ``distill.0.weight``) in a nested mapping."""
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            index = int(part) if part.isdecimal() and len(part) < 10 else len(node)
            if not node:
                raise ConfigError(f"--set {dotted}: the list {'.'.join(parts[:depth])} is empty; "
                                  "add its entries in the YAML file (or --set "
                                  f"{'.'.join(parts[:depth])}=[...])")
            if index >= len(node):
                raise ConfigError(f"--set {dotted}: {where} is not an index of a list of {len(node)}")
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth])} is not a section")
        if last:
            node[part] = value
        elif node.get(part) is None and parts[depth + 1].isdecimal():
            raise ConfigError(f"--set {dotted}: the list {where} is empty; add its entries in the "
                              f"YAML file (or --set {where}=[...])")
        else:
            node = node.setdefault(part, {})


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``a.b=c`` strings; values are read as YAML scalars (``1e-4``, ``true``, ``[1,2]``)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = _safe_yaml(raw, f"--set {key}: cannot parse value {raw!r}") if raw.strip() else ""
        out.append((key.strip(), value))
    return out


def _safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` (plain data only: a ``!!python/...`` tag is an error, never code run);
    every failure, including PyYAML's ValueErrors on impossible dates, is a ConfigError."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{what}: {type(exc).__name__}: {exc}") from None


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    data = _safe_yaml(text, f"{path}: invalid YAML")
    if data is None:
        raise ConfigError(f"{path}: the file is empty (no settings); start from a file in "
                          "configs/, e.g. configs/ekd_synthetic.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({_valid_keys(Config)})")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Load a :class:`Config` from YAML (optional) plus ``--set`` overrides, then validate."""
    tree: dict = dict(base or {})
    if path is not None:
        tree.update(read_yaml(path))
    for key, value in parse_overrides(overrides or []):
        _set_path(tree, key, value)
    cfg = from_dict(Config, tree)
    if path is not None and "data" not in tree:
        raise ConfigError(f"{path}: no 'data' section, so nothing says what to train on; add "
                          "data: {kind: synthetic} (ekd's synthetic faces) or data: {kind: folder, "
                          "root: FOLDER, input_size: 112}")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
