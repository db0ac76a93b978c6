"""Sweeps under real signals and real concurrency, on the journal file and a local SQLite MLflow store:
a worker SIGKILLed mid-trial, Ctrl-C (SIGINT) mid-trial, and two sweeps started at once on one study.

Each test runs ``python -m harness.study`` in subprocesses on two synthetic sequences with the random-conv
backbone; ``DIFFVOS_STUDY_SLEEP_PER_SEQUENCE`` keeps a trial running long enough to be hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from harness.study.objective import SLEEP_ENV
from harness.study.storage import open_storage, resolve_storage
from harness.study.sweep import worker_environment
from harness.tracking import TAG_ROLE, TAG_STUDY, TAG_TRIAL

# the Ctrl-C tests signal commands started as from a terminal (SIGINT at its default)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ctrl_c_enabled")]

PROJECT = Path(__file__).resolve().parents[1]
FAIL, COMPLETE, WAITING = (
    optuna.trial.TrialState.FAIL,
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.WAITING,
)


def write_study(folder: Path, synth_root: Path, name: str, search: dict[str, Any], **top: Any) -> Path:
    data = {
        "name": name,
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
        },
        "search_space": search,
        "sampler": {"type": "grid", "seed": 0},
        "objective": {"metric": "J&F-Mean", "direction": "maximize"},
        "pruning": False,
        **top,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_sweep(
    study_file: Path, tmp_path: Path, log: str, *extra: str, sleep: float = 0.0, own_group: bool = False
) -> subprocess.Popen:
    env = worker_environment()
    env.pop(SLEEP_ENV, None)
    if sleep:
        env[SLEEP_ENV] = str(sleep)
    command = [
        sys.executable,
        "-m",
        "harness.study",
        str(study_file),
        "--storage-dir",
        str(tmp_path / "storage"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--experiment",
        "signals",
        "--output-root",
        str(tmp_path / "runs"),
        *extra,
    ]
    handle = (tmp_path / f"{log}.log").open("wb")
    return subprocess.Popen(
        command, cwd=PROJECT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=own_group
    )


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp_path.glob("*.log")))


def load(tmp_path: Path, name: str) -> optuna.Study | None:
    location = resolve_storage(None, name, tmp_path / "storage")
    if location.path is None or not location.path.exists():
        return None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(location))
    except KeyError:
        return None


def mlflow_runs(tmp_path: Path, study: str, role: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("signals")
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id], f"tags.`{TAG_STUDY}` = '{study}' and tags.`{TAG_ROLE}` = '{role}'"
    )


def wait_for_running_trial(
    tmp_path: Path, name: str, process: subprocess.Popen, pid_of_worker: Any, timeout: float = 150
) -> tuple[optuna.trial.FrozenTrial, int]:
    """A RUNNING trial (and the pid running it) that already has its MLflow run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, logs(tmp_path)
        time.sleep(0.5)
        study = load(tmp_path, name)
        if study is None:
            continue
        for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker", "")
            pid = int(worker.rpartition(":")[2]) if worker else 0
            if not pid or not pid_of_worker(pid):
                continue
            # a trial runs only after the MLflow store and parent run exist: reading it now is safe
            if str(trial.number) in {r.data.tags.get(TAG_TRIAL) for r in _safe_runs(tmp_path, name)}:
                # read the trial again: its parameters are set before its run is created, maybe after
                # the listing above was read
                (fresh,) = [t for t in study.get_trials() if t.number == trial.number]
                return fresh, pid
    raise AssertionError(f"no running trial within {timeout} s\n{logs(tmp_path)}")


def _safe_runs(tmp_path: Path, name: str) -> list[Any]:
    try:
        return mlflow_runs(tmp_path, name, "trial")
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return []


def test_sigkilled_local_worker_is_reaped_and_its_trial_rerun(tmp_path: Path, synth_root: Path) -> None:
    topks = [1, 3, 5, 8]
    study_file = write_study(
        tmp_path, synth_root, "killed", {"method.topk": {"type": "categorical", "choices": topks}}
    )
    sweep = start_sweep(study_file, tmp_path, "sweep", "--workers", "2", sleep=1.5)
    victim, pid = wait_for_running_trial(tmp_path, "killed", sweep, lambda pid: pid != sweep.pid)
    os.kill(pid, signal.SIGKILL)
    assert sweep.wait(timeout=240) == 0, logs(tmp_path)
    assert "killed by signal [9]" in (tmp_path / "sweep.log").read_text()

    study = load(tmp_path, "killed")
    assert study is not None
    trials = {t.number: t for t in study.get_trials()}
    assert trials[victim.number].state == FAIL
    assert trials[victim.number].user_attrs["failure_kind"] == "killed"
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state == COMPLETE
    complete = [t for t in trials.values() if t.state == COMPLETE]
    assert sorted(t.params["method.topk"] for t in complete) == topks  # within the budget, no gap
    assert len(complete) == len(topks)

    runs = {}
    for run in mlflow_runs(tmp_path, "killed", "trial"):
        runs.setdefault(int(run.data.tags[TAG_TRIAL]), []).append(run)
    assert all(len(found) == 1 for found in runs.values())
    assert runs[victim.number][0].info.status == "KILLED"
    assert {found[0].info.status for n, found in runs.items() if n != victim.number} == {"FINISHED"}
    (parent,) = mlflow_runs(tmp_path, "killed", "parent")
    assert parent.info.status == "FINISHED"


def test_ctrl_c_requeues_the_interrupted_trial(tmp_path: Path, synth_root: Path) -> None:
    topks = [1, 3, 5]
    study_file = write_study(
        tmp_path, synth_root, "interrupted", {"method.topk": {"type": "categorical", "choices": topks}}
    )
    sweep = start_sweep(study_file, tmp_path, "first", sleep=2.0)
    victim, _ = wait_for_running_trial(tmp_path, "interrupted", sweep, lambda pid: pid == sweep.pid)
    sweep.send_signal(signal.SIGINT)
    assert sweep.wait(timeout=120) == 130, logs(tmp_path)

    study = load(tmp_path, "interrupted")
    assert study is not None
    trials = {t.number: t for t in study.get_trials()}
    assert trials[victim.number].state == FAIL
    assert trials[victim.number].user_attrs["failure_kind"] == "interrupted"
    waiting = [t for t in trials.values() if t.state == WAITING]
    assert len(waiting) == 1 and waiting[0].params == victim.params
    (run,) = [
        r
        for r in mlflow_runs(tmp_path, "interrupted", "trial")
        if r.data.tags[TAG_TRIAL] == str(victim.number)
    ]
    assert run.info.status == "KILLED"
    (parent,) = mlflow_runs(tmp_path, "interrupted", "parent")
    assert parent.info.status == "KILLED"

    again = start_sweep(study_file, tmp_path, "second")
    assert again.wait(timeout=240) == 0, logs(tmp_path)
    study = load(tmp_path, "interrupted")
    assert study is not None
    trials = {t.number: t for t in study.get_trials()}
    complete = [t for t in trials.values() if t.state == COMPLETE]
    assert sorted(t.params["method.topk"] for t in complete) == topks
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.params == victim.params
    text = (tmp_path / "second.log").read_text()
    assert "0 failed" in text  # the interruption is not a failure of the setting


def test_two_sweeps_started_at_once_share_the_budget(tmp_path: Path, synth_root: Path) -> None:
    study_file = write_study(
        tmp_path,
        synth_root,
        "together",
        {"method.temperature": {"type": "float", "low": 0.01, "high": 1.0, "log": True}},
        sampler={"type": "random", "seed": 0},
        n_trials=4,
    )
    first = start_sweep(study_file, tmp_path, "one")
    second = start_sweep(study_file, tmp_path, "two")  # same moment, same fresh MLflow store
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0, logs(tmp_path)

    study = load(tmp_path, "together")
    assert study is not None
    trials = study.get_trials()
    complete = [t for t in trials if t.state == COMPLETE]
    assert len(complete) == 4, [(t.number, t.state) for t in trials]  # the budget held across processes
    temperatures = [t.params["method.temperature"] for t in complete]
    assert len(set(temperatures)) == 4  # each process drew its own points
    assert len(mlflow_runs(tmp_path, "together", "parent")) == 1
    runs = mlflow_runs(tmp_path, "together", "trial")
    assert sorted(int(r.data.tags[TAG_TRIAL]) for r in runs if r.info.status == "FINISHED") == sorted(
        t.number for t in complete
    )


def test_ctrl_c_with_local_workers(tmp_path: Path, synth_root: Path) -> None:
    """Ctrl-C in a terminal reaches the sweep and its workers (one process group): every running trial is
    re-queued, and the next run completes the grid without counting them."""
    topks = [1, 3, 5, 8]
    study_file = write_study(
        tmp_path, synth_root, "group", {"method.topk": {"type": "categorical", "choices": topks}}
    )
    sweep = start_sweep(study_file, tmp_path, "first", "--workers", "2", sleep=2.0, own_group=True)
    victim, _ = wait_for_running_trial(tmp_path, "group", sweep, lambda pid: pid != sweep.pid)
    os.killpg(sweep.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    assert sweep.wait(timeout=120) == 130, logs(tmp_path)

    study = load(tmp_path, "group")
    assert study is not None
    trials = study.get_trials()
    interrupted = [t for t in trials if t.state == FAIL]
    assert victim.number in {t.number for t in interrupted}
    assert all(t.user_attrs["failure_kind"] == "interrupted" for t in interrupted)
    waiting = [t for t in trials if t.state == WAITING]
    assert sorted(t.params["method.topk"] for t in waiting) == sorted(
        t.params["method.topk"] for t in interrupted
    )
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    statuses = {r.data.tags[TAG_TRIAL]: r.info.status for r in mlflow_runs(tmp_path, "group", "trial")}
    assert all(statuses[str(t.number)] == "KILLED" for t in interrupted if str(t.number) in statuses)
    (parent,) = mlflow_runs(tmp_path, "group", "parent")
    assert parent.info.status == "KILLED"

    again = start_sweep(study_file, tmp_path, "second", "--workers", "2")
    assert again.wait(timeout=240) == 0, logs(tmp_path)
    study = load(tmp_path, "group")
    assert study is not None
    complete = [t for t in study.get_trials() if t.state == COMPLETE]
    assert sorted(t.params["method.topk"] for t in complete) == topks
