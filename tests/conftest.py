"""Shared fixtures: the synthetic dataset and a migrated MLflow store are made once per test session."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
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


@pytest.fixture(scope="session")
def fresh_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[str, str]]:
    """name -> (tracking URI, artifact location URI) of a new SQLite MLflow store, copied from one migrated
    template (MLflow's SQLite migrations take seconds: they run once per session)."""
    from mlflow import MlflowClient

    template = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not template.exists():
        building = template.with_suffix(".building")
        MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments()
        building.replace(template)

    def new(name: str) -> tuple[str, str]:
        folder = tmp_path_factory.mktemp(name)
        shutil.copy(template, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()

    return new


@pytest.fixture
def ctrl_c_enabled() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process, and commands started here have it at its default,
    as a terminal's foreground command does, even when the suite itself was started with SIGINT ignored
    (a background job of a script: the harness then keeps ignoring it, see harness.study.interrupts)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
