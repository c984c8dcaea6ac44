"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder beside the repository; skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} not present")
    return SHARED
