"""Several workers on one study: local processes on a journal file, and the several-machines set-up for
real (PostgreSQL storage, an MLflow server on loopback), including a worker killed with SIGKILL.

The PostgreSQL tests need a server on 127.0.0.1:5432 that accepts the ``postgres`` or ``root`` user
without a password; they create a fresh database per test and drop it afterwards, and skip when the server
is unreachable or ``mlflow server`` cannot start.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from harness.study import run_sweep
from harness.study.objective import SLEEP_ENV
from harness.study.storage import open_storage, resolve_storage
from harness.study.sweep import worker_environment
from harness.tracking import TAG_ROLE, TAG_STUDY, TAG_TRIAL, TrackingConfig

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_USERS = ("postgres", "root")


def write_study(folder: Path, synth_root: Path, name: str, topks: list[int], **fixed: Any) -> Path:
    """A grid study over top-k on two synthetic sequences with the random-conv backbone (~1 s a trial)."""
    data = {
        "name": name,
        "description": f"worker test {name}",
        "dataset": {
            "root": str(synth_root),
            "split": "val",
            "sequences": ["synth-occlusion", "synth-crossing"],
        },
        "fixed": {
            "backbone.name": "random-conv",
            "backbone.device": "cpu",
            "input.short_side": 48,
            "method.radius": 3,
            "method.n_last_frames": 3,
            "cache.dir": str(folder / "cache"),
            **fixed,
        },
        "search_space": {"method.topk": {"type": "categorical", "choices": topks}},
        "sampler": {"type": "grid", "seed": 0},
        "objective": {"metric": "J&F-Mean", "direction": "maximize"},
        "pruning": False,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trial_runs(tracking_uri: str, experiment: str, study: str) -> dict[int, list[Any]]:
    """MLflow child runs of ``study`` grouped by trial number."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.`{TAG_STUDY}` = '{study}' and tags.`{TAG_ROLE}` = 'trial'",
        max_results=1000,
    )
    grouped: dict[int, list[Any]] = {}
    for run in runs:
        grouped.setdefault(int(run.data.tags[TAG_TRIAL]), []).append(run)
    return grouped


def assert_logged_once(trials: list[optuna.trial.FrozenTrial], runs: dict[int, list[Any]]) -> None:
    assert sorted(runs) == sorted(t.number for t in trials)
    duplicated = {number: len(found) for number, found in runs.items() if len(found) != 1}
    assert not duplicated, f"trials logged more than once: {duplicated}"


# -- (a) several worker processes on one machine, journal storage -------------------------------------------


def test_local_workers_share_a_journal_study(tmp_path: Path, synth_root: Path) -> None:
    study_file = write_study(tmp_path, synth_root, "local-workers", [1, 3, 5, 8])
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_sweep(
        study_file,
        storage=None,
        tracking=TrackingConfig(tracking_uri=tracking_uri, experiment="workers"),
        workers=2,
        output_root=tmp_path / "runs",
        storage_dir=tmp_path / "storage",
    )
    assert summary.worker_exit_codes == (0, 0)
    assert summary.storage.startswith("journal:")
    location = resolve_storage(None, "local-workers", tmp_path / "storage")
    study = optuna.load_study(study_name="local-workers", storage=open_storage(location))
    trials = study.get_trials()
    # exactly the budget (the grid), every point once, all complete
    assert len(trials) == 4 and summary.n_complete == 4
    assert sorted(t.params["method.topk"] for t in trials) == [1, 3, 5, 8]
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # two processes, two trials each
    runs = trial_runs(tracking_uri, "workers", "local-workers")
    assert_logged_once(trials, runs)
    assert all(found[0].info.status == "FINISHED" for found in runs.values())
    assert {found[0].data.tags["mlflow.parentRunId"] for found in runs.values()} == {summary.parent_run_id}


# -- PostgreSQL + MLflow server ----------------------------------------------------------------------------


def _pg_connect(dbname: str = "postgres") -> Any:
    import psycopg2

    errors = []
    for user in PG_USERS:
        try:
            connection = psycopg2.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname=dbname, connect_timeout=3
            )
            connection.autocommit = True
            return connection
        except psycopg2.Error as error:
            errors.append(f"{user}: {error}".strip())
    pytest.skip(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} ({'; '.join(errors)})")


@pytest.fixture(scope="module")
def pg_user() -> str:
    pytest.importorskip("psycopg2")
    connection = _pg_connect()
    with connection.cursor() as cursor:
        cursor.execute("select current_user")
        user = cursor.fetchone()[0]
    connection.close()
    return user


def _create_database(user: str) -> tuple[str, str]:
    name = f"diffvos_test_{secrets.token_hex(6)}"
    connection = _pg_connect()
    with connection.cursor() as cursor:
        cursor.execute(f'create database "{name}"')
    connection.close()
    return name, f"postgresql+psycopg2://{user}@{PG_HOST}:{PG_PORT}/{name}"


def _drop_database(name: str) -> None:
    connection = _pg_connect()
    with connection.cursor() as cursor:
        cursor.execute(f'drop database if exists "{name}" with (force)')
    connection.close()


@pytest.fixture()
def optuna_database(pg_user: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test's Optuna storage; dropped afterwards."""
    name, url = _create_database(pg_user)
    try:
        yield url
    finally:
        _drop_database(name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((PG_HOST, 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(pg_user: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on loopback with a PostgreSQL backend store; yields its URL."""
    name, url = _create_database(pg_user)
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    command = [
        str(mlflow_cli) if mlflow_cli.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        url,
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        PG_HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server_log = folder / "server.log"
    log = server_log.open("wb")
    try:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as error:
        _drop_database(name)
        pytest.skip(f"cannot start mlflow server: {error}")
    address = f"http://{PG_HOST}:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.skip(
                    f"mlflow server exited with {server.returncode}: {server_log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.skip(
                    f"mlflow server did not answer /health within 90 s: {server_log.read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield address
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
        _drop_database(name)


def sweep_process(
    study_file: Path,
    storage: str,
    tracking_uri: str,
    experiment: str,
    tmp_path: Path,
    *,
    sleep: float = 0.0,
    log_name: str,
) -> subprocess.Popen:
    """``python -m harness.study ...`` as another machine would run it (heartbeat 1 s, grace 2 s)."""
    env = worker_environment()
    env.pop(SLEEP_ENV, None)
    if sleep:
        env[SLEEP_ENV] = str(sleep)
    command = [
        sys.executable,
        "-m",
        "harness.study",
        str(study_file),
        "--storage",
        storage,
        "--tracking-uri",
        tracking_uri,
        "--experiment",
        experiment,
        "--output-root",
        str(tmp_path / "runs"),
        "--heartbeat-interval",
        "1",
        "--grace-period",
        "2",
    ]
    log = (tmp_path / f"{log_name}.log").open("wb")
    return subprocess.Popen(command, cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_all(processes: list[subprocess.Popen], tmp_path: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        process.wait(timeout=max(1, deadline - time.monotonic()))
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.log")))
    assert all(p.returncode == 0 for p in processes), logs


@pytest.mark.postgres
def test_several_machines_postgres_and_mlflow_server(
    tmp_path: Path, synth_root: Path, optuna_database: str, mlflow_server: str
) -> None:
    from harness.tracking.leaderboard import build_leaderboard

    topks = [1, 3, 5, 8]
    study_file = write_study(tmp_path, synth_root, "machines", topks)
    processes = [
        sweep_process(
            study_file, optuna_database, mlflow_server, "machines", tmp_path, log_name=f"machine-{i}"
        )
        for i in range(2)
    ]
    wait_all(processes, tmp_path)

    study = optuna.load_study(study_name="machines", storage=optuna_database)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.params["method.topk"] for t in complete} == set(topks)
    assert len(trials) == len(complete)  # nothing failed, pruned or left running
    runs = trial_runs(mlflow_server, "machines", "machines")
    assert_logged_once(trials, runs)
    assert len({found[0].data.tags["mlflow.parentRunId"] for found in runs.values()}) == 1

    board = build_leaderboard(mlflow_server, "machines", "machines")
    assert sorted(board["trial"].tolist()) == sorted(t.number for t in complete)
    best = max(complete, key=lambda t: t.value)
    assert board.iloc[0]["J&F-Mean"] == pytest.approx(best.value)


@pytest.mark.postgres
def test_killed_worker_trial_is_failed_retried_and_closed(
    tmp_path: Path, synth_root: Path, optuna_database: str, mlflow_server: str
) -> None:
    from mlflow import MlflowClient

    from harness.tracking import StudyTracker

    topks = [1, 3, 5, 8, 12]
    study_file = write_study(tmp_path, synth_root, "killed", topks)
    tracker = StudyTracker(TrackingConfig(tracking_uri=mlflow_server, experiment="killed"), "killed")

    def running_trial(process: subprocess.Popen, log_name: str) -> tuple[Any, str]:
        """A RUNNING trial of ``process`` that already has its MLflow run, read after the run exists."""
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, f"worker {log_name} never started a trial"
            assert process.poll() is None, (tmp_path / f"{log_name}.log").read_text()
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="killed", storage=optuna_database)
            except KeyError:
                continue
            for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                if trial.user_attrs.get("worker") != f"{socket.gethostname()}:{process.pid}":
                    continue  # the other worker's trial
                run_id = tracker.find_trial_run(trial.number)
                if run_id is not None:
                    # read the trial again: its parameters are set before its run is created, maybe
                    # after the listing above was read
                    (fresh,) = [t for t in study.get_trials() if t.number == trial.number]
                    return fresh, run_id

    # worker A sleeps 60 s after its first sequence, so it is surely inside a trial when killed. Worker B
    # starts once A's trial runs and is killed inside its own first trial: B then has three more trials
    # (~3 s each) to start, so it sees A's trial stale (heartbeat 1 s, grace 2 s) whatever the load
    doomed = sweep_process(
        study_file, optuna_database, mlflow_server, "killed", tmp_path, sleep=60, log_name="a"
    )
    victim = running_trial(doomed, "a")
    survivor = sweep_process(
        study_file, optuna_database, mlflow_server, "killed", tmp_path, sleep=1.2, log_name="b"
    )
    running_trial(survivor, "b")
    doomed.kill()  # SIGKILL: no chance to record anything
    doomed.wait()
    wait_all([survivor], tmp_path)

    killed_trial, killed_run = victim
    study = optuna.load_study(study_name="killed", storage=optuna_database)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed_trial.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed_trial.number]
    assert len(retries) == 1
    assert retries[0].params == killed_trial.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    complete = [t for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["method.topk"] for t in complete) == topks  # the survivor finished the grid

    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(killed_run).info.status == "KILLED"
    runs = trial_runs(mlflow_server, "killed", "killed")
    assert_logged_once(list(trials.values()), runs)
    others = {number: found[0].info.status for number, found in runs.items() if number != killed_trial.number}
    assert set(others.values()) == {"FINISHED"}
