"""docs/config.md is generated from the config dataclasses and must be current."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from ekd.config import Config
from ekd.config.reference import config_reference, field_comments
from ekd.errors import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_config_reference_is_current():
    assert DOC.read_text() == config_reference(), (
        "docs/config.md is out of date: run python -m ekd.config.reference docs/config.md")


def test_every_key_has_a_row_with_type_default_and_meaning():
    text = config_reference()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines()
            if line.startswith("| `")}
    for key in [k for k in _keys(Config) if k != "distill"]:  # distill: its entries' keys
        assert key in rows, key
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[key])[1:-1]]  # "\|": in a cell
        assert len(cells) == 4 and all(cells), rows[key]
    assert "distill[].weight" in rows and "val.sets[].path" in rows
    assert rows["optim.lr"].split("|")[3].strip() == "`0.1`"
    assert rows["train.resume"].split("|")[2].strip() == "string or null"


def test_comments_are_read_from_the_source_and_a_missing_one_is_an_error(monkeypatch):
    @dataclasses.dataclass
    class Example:
        # Two lines above the field
        # become one.
        alpha: int = 1
        beta: str = "x"  # after the field
        gamma: float = 0.5

    comments = field_comments(Example)
    assert comments["alpha"] == "Two lines above the field become one."
    assert comments["beta"] == "after the field" and comments["gamma"] == ""
    import ekd.config.reference as ref

    monkeypatch.setattr(ref, "field_comments", lambda cls: {})
    with pytest.raises(ConfigError, match="without a comment"):
        config_reference()


def test_a_key_of_several_types_is_one_table_cell():
    """``distill[].weight`` takes a number or "auto": its type must not break the Markdown row."""
    row = next(line for line in config_reference().splitlines() if line.startswith("| `distill[].weight`"))
    assert row.count("|") == 5 and "| number or string |" in row
