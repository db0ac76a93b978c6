"""Shared fixtures: the synthetic dataset is generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the built-in synthetic dataset (DAVIS-2017 layout, splits val and test-dev)."""
    from harness.data.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests that need it skip when it is absent (users don't have it)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present (only the developers' machines and CI have it)")
    return SHARED
