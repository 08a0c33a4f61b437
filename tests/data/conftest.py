"""Fixtures for the dynaneural.data tests: where the real benchmark data lives (tests skip when it is absent)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder: $DYNANEURAL_DATA, else the shared/data folder beside the repository."""
    env = os.environ.get("DYNANEURAL_DATA", "").strip()
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def require_real(shared_data: Path) -> Callable[..., Path]:
    """Return ``require(*relative_paths)``: skips the test unless all files exist, else returns the data folder."""

    def require(*relative_paths: str) -> Path:
        missing = [p for p in relative_paths if not (shared_data / p).is_file()]
        if missing:
            pytest.skip(f"real data not present under {shared_data}: {', '.join(missing)}")
        return shared_data

    return require
