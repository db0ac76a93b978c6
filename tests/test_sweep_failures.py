"""Failures outside a trial's settings (missing weights or data, memory, another process's budget) are
re-queued and not counted; failures of the settings count as before; the sweep says what it does while
it runs and exits non-zero when nothing finished.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from harness.errors import DataError, NotEnoughMemoryError, WeightsNotFoundError
from harness.study import resolve_storage, run_sweep
from harness.study.failures import ENVIRONMENT, KILLED, SURPLUS, classify
from harness.study.progress import SweepProgress
from harness.study.spec import load_study_spec
from harness.study.storage import HeartbeatSettings, open_storage
from harness.study.sweep import budget_used, create_or_load_study
from harness.tracking import TrackingConfig
from tests.test_study import FakeRunner, FakeTracker, base_study, temperature_score, write_study

FAIL, WAITING, COMPLETE = (
    optuna.trial.TrialState.FAIL,
    optuna.trial.TrialState.WAITING,
    optuna.trial.TrialState.COMPLETE,
)


def grid_study(tmp_path: Path, synth_root: Path, topks: list[int], **changes: Any) -> Path:
    data = base_study(
        dataset={"root": str(synth_root), "split": "val"},
        sampler={"type": "grid"},
        n_trials=None,
        search_space={"method.topk": {"type": "categorical", "choices": topks}},
    )
    data.update(changes)
    return write_study(tmp_path, data)


def sweep(study_file: Path, tmp_path: Path, runner: Any, tracker: Any = None, **kwargs: Any) -> Any:
    tracker = tracker or FakeTracker()
    return run_sweep(
        study_file,
        storage=None,
        tracking=TrackingConfig(),
        output_root=tmp_path / "runs",
        storage_dir=tmp_path / "storage",
        runner=runner,
        tracker_factory=lambda config, name: tracker,
        **kwargs,
    )


def trials_of(tmp_path: Path, name: str = "unit") -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(resolve_storage(None, name, tmp_path / "storage"))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def objective_for(spec: Any, study: Any, tmp_path: Path, tracker: Any = None, **kwargs: Any) -> Any:
    """The sweep's objective on the fake runner and tracker, called by hand outside ``optimize``."""
    from harness.study.objective import StudyObjective

    return StudyObjective(
        spec,
        sequence_order=study.user_attrs["sequence_order"],
        output_root=tmp_path / "runs",
        tracker=tracker or FakeTracker(),
        parent_run_id="parent-1",
        runner=FakeRunner(temperature_score),
        **kwargs,
    )


def test_failure_kinds() -> None:
    assert classify(WeightsNotFoundError("no checkpoint")) == ENVIRONMENT
    assert classify(DataError("no frames")) == ENVIRONMENT
    assert classify(MemoryError()) == ENVIRONMENT
    assert classify(NotEnoughMemoryError("needs 9 GiB, 2 GiB free")) == ENVIRONMENT
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == ENVIRONMENT
    assert classify(KeyboardInterrupt()) == "interrupted"
    assert classify(ValueError("layer 9 does not exist")) == "setting"


@pytest.mark.parametrize(
    "error",
    [
        WeightsNotFoundError("ADM weights are not at /w.pt"),
        RuntimeError("CUDA out of memory"),
        # the pre-run memory check: what is free depends on the machine now, not on the setting
        NotEnoughMemoryError("this run needs about 9.0 GiB of RAM but 2.0 GiB is free"),
    ],
)
def test_environment_failure_keeps_its_grid_point_and_is_retried(
    tmp_path: Path, synth_root: Path, error: Exception
) -> None:
    study_file = grid_study(tmp_path, synth_root, [1, 3, 5])
    broken = {"on": True}

    def score(config: Any, index: int) -> float:
        if broken["on"] and config.method.settings.topk == 3:
            raise error
        return config.method.settings.topk / 10

    runner, tracker = FakeRunner(score), FakeTracker()
    first = sweep(study_file, tmp_path, runner, tracker)
    assert first.stop_reason is not None and not first.ok  # stopped at once, non-zero exit
    assert first.n_failed == 0 and first.n_not_counted == 1 and first.n_waiting == 1
    failed = [t for t in trials_of(tmp_path) if t.state == FAIL]
    assert [t.params for t in failed] == [{"method.topk": 3}]
    assert failed[0].user_attrs["failure_kind"] == ENVIRONMENT
    assert next(r for r in tracker.runs if r.params == {"method.topk": 3}).status == "FAILED"

    broken["on"] = False  # the weights arrived
    second = sweep(study_file, tmp_path, runner, tracker)
    assert second.ok and second.n_complete == 3 and second.n_waiting == 0
    complete = [t for t in trials_of(tmp_path) if t.state == COMPLETE]
    assert sorted(t.params["method.topk"] for t in complete) == [1, 3, 5]  # the whole grid, no gap
    retry = next(t for t in complete if t.params["method.topk"] == 3)
    assert retry.system_attrs["failed_trial"] == failed[0].number


def test_every_trial_failing_is_an_error(tmp_path: Path, synth_root: Path) -> None:
    study_file = grid_study(tmp_path, synth_root, [1, 3])

    def score(config: Any, index: int) -> float:
        raise ValueError("the method cannot run these settings")

    summary = sweep(study_file, tmp_path, FakeRunner(score))
    assert summary.n_failed == 2 and summary.all_failed and not summary.ok
    assert "every trial failed" in summary.format()


def test_trial_beyond_the_budget_of_other_processes_is_not_run(tmp_path: Path, synth_root: Path) -> None:
    """Two processes asked for the last trial at once: the later-numbered one is re-queued unrun."""
    study_file = write_study(
        tmp_path, base_study(dataset={"root": str(synth_root), "split": "val"}, n_trials=2)
    )
    spec = load_study_spec(study_file)
    storage = open_storage(resolve_storage(None, "unit", tmp_path / "storage"))
    study = create_or_load_study(spec, storage)
    other = [study.ask() for _ in range(2)]  # another process's two running trials: the whole budget
    for trial in other:
        for param in spec.search_space.values():
            param.suggest(trial)
        trial.set_user_attr("worker", "elsewhere:1")

    runner = FakeRunner(temperature_score)
    summary = sweep(study_file, tmp_path, runner, heartbeat=HeartbeatSettings(interval=60))
    assert runner.configs == []  # nothing ran: the budget was taken
    assert summary.n_running == 2 and budget_used(study, count_running=True) == 2
    for trial in other:
        study.tell(trial, 0.5)
    assert budget_used(study, count_running=False) == 2


def test_surplus_check_inside_the_objective(tmp_path: Path, synth_root: Path) -> None:
    """The per-trial check itself: a trial numbered after a full budget of others fails as surplus."""
    study_file = write_study(
        tmp_path, base_study(dataset={"root": str(synth_root), "split": "val"}, n_trials=1)
    )
    spec = load_study_spec(study_file)
    storage = open_storage(resolve_storage(None, "unit", tmp_path / "storage"))
    study = create_or_load_study(spec, storage)
    objective = objective_for(spec, study, tmp_path, target=1)
    first, second = study.ask(), study.ask()  # both asked before either finished
    with pytest.raises(Exception, match="beyond the budget"):
        objective(second)
    study.tell(second, state=FAIL)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[second.number].user_attrs["failure_kind"] == SURPLUS
    assert budget_used(study, count_running=True) == 1  # only `first` counts
    objective_value = objective(first)
    study.tell(first, objective_value)
    assert budget_used(study, count_running=False) == 1


def test_stale_journal_trial_is_failed_by_heartbeat_and_retried(tmp_path: Path, synth_root: Path) -> None:
    """A worker that died without a trace (no pid on this machine to check): its heartbeat stops."""
    study_file = write_study(
        tmp_path, base_study(dataset={"root": str(synth_root), "split": "val"}, n_trials=2)
    )
    spec = load_study_spec(study_file)
    location = resolve_storage(None, "unit", tmp_path / "storage")
    storage = open_storage(location, HeartbeatSettings(interval=1, grace_period=2))
    study = create_or_load_study(spec, storage)
    lost = study.ask()
    params = {name: p.suggest(lost) for name, p in spec.search_space.items()}
    lost.set_user_attr("worker", "another-machine:4242")
    storage.record_heartbeat(lost._trial_id)
    time.sleep(2.5)

    tracker = FakeTracker()
    summary = sweep(
        study_file, tmp_path, FakeRunner(temperature_score), tracker, heartbeat=HeartbeatSettings(1, 2)
    )
    trials = {t.number: t for t in trials_of(tmp_path)}
    assert trials[lost.number].state == FAIL
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retry) == 1 and retry[0].params == params and retry[0].state == COMPLETE
    assert summary.n_complete == 2 and summary.n_failed == 0
    assert any(lost.number in states for states in tracker.closed_states)  # its MLflow run is closed
    assert trials[lost.number].user_attrs.get("failure_kind") in (None, KILLED)


def test_progress_lines(tmp_path: Path, synth_root: Path) -> None:
    study_file = grid_study(tmp_path, synth_root, [1, 3, 5])

    def score(config: Any, index: int) -> float:
        if config.method.settings.topk == 5:
            raise ValueError("no such thing")
        return config.method.settings.topk / 10

    out = io.StringIO()
    sweep(study_file, tmp_path, FakeRunner(score), out=out)
    lines = out.getvalue().splitlines()
    starts = [line for line in lines if "): method.topk=" in line]
    assert len(starts) == 3 and all(line.startswith("[unit] trial ") for line in starts)
    assert {line.split(" (#")[0] for line in starts} == {f"[unit] trial {i} of 3" for i in (1, 2, 3)}
    done = [line for line in lines if "J&F-Mean 0." in line]
    assert len(done) == 2 and all("best so far" in line and "ETA" in line for line in done)
    assert any("failed (counts against the budget)" in line and "no such thing" in line for line in lines)
    assert lines[0].startswith("pre-flight:")

    quiet = io.StringIO()
    sweep(
        grid_study(tmp_path, synth_root, [1, 3, 5], name="quiet"),
        tmp_path,
        FakeRunner(score),
        quiet=True,
        out=quiet,
    )
    text = quiet.getvalue()
    assert "J&F-Mean" not in text and "pre-flight" not in text and "method.topk=1" not in text
    assert "no such thing" in text  # failures are still said


def test_progress_eta_and_format() -> None:
    ticks = iter([0.0, 10.0, 10.0, 30.0])
    out = io.StringIO()
    progress = SweepProgress("s", total=4, stream=out, clock=lambda: next(ticks), workers=2)
    progress.started(0, 1, {"backbone.timestep": 30})
    progress.finished(0, value=0.75, best=(0.75, 0), used=1)
    progress.started(1, 2, {"backbone.timestep": 51})
    progress.finished(1, value=0.70, best=(0.75, 0), used=2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[s] trial 1 of 4 (#0): backbone.timestep=30"
    assert lines[1] == "[s] trial 1 of 4 (#0): J&F-Mean 0.7500 in 10.0 s; best so far 0.7500 (#0); ETA 15.0 s"
    # two trials left, 15 s each on average, two workers
    assert lines[3].endswith("ETA 15.0 s") and "J&F-Mean 0.7000 in 20.0 s" in lines[3]


def test_resumed_sweep_estimates_its_time(tmp_path: Path, synth_root: Path) -> None:
    study_file = grid_study(tmp_path, synth_root, [1, 3, 5])
    sweep(study_file, tmp_path, FakeRunner(temperature_score), n_trials=1)
    out = io.StringIO()
    sweep(study_file, tmp_path, FakeRunner(temperature_score), out=out)
    assert "2 trial(s) to run; at " in out.getvalue() and "with 1 worker(s)" in out.getvalue()


def test_trial_of_a_dead_local_process_is_reaped_by_the_next_sweep(tmp_path: Path, synth_root: Path) -> None:
    """A single sweep SIGKILLed mid-trial: the next sweep on the machine sees its process is gone."""
    import socket
    import subprocess

    study_file = grid_study(tmp_path, synth_root, [1, 3])
    spec = load_study_spec(study_file)
    study = create_or_load_study(spec, open_storage(resolve_storage(None, "unit", tmp_path / "storage")))
    orphan = study.ask()
    params = {name: p.suggest(orphan) for name, p in spec.search_space.items()}
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")

    tracker = FakeTracker()
    summary = sweep(study_file, tmp_path, FakeRunner(temperature_score), tracker)
    trials = {t.number: t for t in trials_of(tmp_path)}
    assert trials[orphan.number].state == FAIL
    assert trials[orphan.number].user_attrs["failure_kind"] == KILLED
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].params == params and retry[0].state == COMPLETE
    assert summary.n_complete == 2 and summary.n_failed == 0 and summary.ok
    assert any(orphan.number in states for states in tracker.closed_states)
