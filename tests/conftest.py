"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings


def shared_data_dir() -> Path:
    """The third-party reference data beside the project, or $EXEMPLAR_SHARED_DATA."""
    env = os.environ.get("EXEMPLAR_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The reference data folder; tests using it skip where it is absent (a user's clone)."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path} (set EXEMPLAR_SHARED_DATA to its folder)")
    return path


# Property tests explore the same examples on every run: a failure seen once is seen again.
settings.register_profile("exemplar", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("exemplar")
