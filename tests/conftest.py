"""Shared fixtures: small, fast record configurations and recorded runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynscope.config import RecordConfig

SMALL = RecordConfig(
    steps=60,
    points_per_class=20,
    width=12,
    loss="dce",
    amplitude=5.0,
    period=20,
    lr=0.5,
    hessian_every=10,
    snapshot_every=10,
    flush_every=20,
)


@pytest.fixture
def small_config() -> RecordConfig:
    """Return a run of 60 steps on a 60-point spiral with a 12-unit network."""
    return SMALL


@pytest.fixture(scope="session")
def small_record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Record the small run once per test session and return its path."""
    from dynscope.recorder import record

    path = tmp_path_factory.mktemp("records") / "small.nc"
    record(SMALL, path, quiet=True)
    return path
