"""Races between a sweep's trials and the world around them, made deterministic in one process.

* Another worker's running trial fails (lost heartbeat, SIGKILL) while this sweep runs: its re-queued
  copy must not use up one of this sweep's trials, so the whole grid still completes.
* Ctrl-C (SIGINT) anywhere in a trial's work, including its first steps before the pipeline starts,
  leaves the trial FAIL with ``failure_kind: interrupted`` and a WAITING copy.
* Ctrl-C while Optuna records a result or between trials is held until that step ends: no trial is left
  half-written, the sweep stops without starting another trial, and the interrupt still reaches the
  caller (the command exits 130).
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any

import optuna
import pytest

from harness.study.failures import INTERRUPTED, KILLED, fail_and_requeue
from harness.study.spec import load_study_spec
from harness.study.storage import open_storage, resolve_storage
from harness.study.sweep import create_or_load_study
from tests.test_study import FakeRunner, FakeTracker, temperature_score
from tests.test_sweep_failures import grid_study, objective_for, sweep, trials_of

FAIL, WAITING, COMPLETE, RUNNING = (
    optuna.trial.TrialState.FAIL,
    optuna.trial.TrialState.WAITING,
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.RUNNING,
)


def open_study(tmp_path: Path, study_file: Path) -> tuple[Any, Any]:
    spec = load_study_spec(study_file)
    study = create_or_load_study(spec, open_storage(resolve_storage(None, "unit", tmp_path / "storage")))
    return spec, study


def test_retry_of_another_workers_trial_does_not_take_a_grid_point(tmp_path: Path, synth_root: Path) -> None:
    """Another machine's trial is RUNNING when this sweep starts (so the sweep sees 2 of 3 trials left);
    it is failed and re-queued while the sweep runs. The sweep runs the retry and both other points."""
    topks = [1, 3, 5]
    study_file = grid_study(tmp_path, synth_root, topks)
    spec, study = open_study(tmp_path, study_file)
    elsewhere = study.ask()
    for param in spec.search_space.values():
        param.suggest(elsewhere)
    elsewhere.set_user_attr("worker", "another-machine:4242")

    def score(config: Any, index: int) -> float:
        if study.get_trials(deepcopy=False)[elsewhere.number].state == RUNNING:
            # what a surviving worker's heartbeat check does to a dead worker's trial
            assert fail_and_requeue(study, elsewhere, KILLED, "killed: heartbeat lost")
        return temperature_score(config, index)

    summary = sweep(study_file, tmp_path, FakeRunner(score))
    trials = trials_of(tmp_path)
    complete = [t for t in trials if t.state == COMPLETE]
    assert sorted(t.params["method.topk"] for t in complete) == topks  # no grid point lost
    assert [t.number for t in trials if t.state == FAIL] == [elsewhere.number]
    assert summary.n_complete == 3 and summary.n_waiting == 0 and summary.ok


class InterruptingTracker(FakeTracker):
    """Ctrl-C arrives while the objective closes stale MLflow runs, before the trial's pipeline starts."""

    def close_stale_trials(self, states: dict[int, str]) -> int:
        raise KeyboardInterrupt


def test_ctrl_c_in_the_first_steps_of_a_trial_is_recorded(tmp_path: Path, synth_root: Path) -> None:
    study_file = grid_study(tmp_path, synth_root, [1, 3])
    spec, study = open_study(tmp_path, study_file)
    earlier = study.ask()  # a failed trial, so that the objective has stale runs to close
    for param in spec.search_space.values():
        param.suggest(earlier)
    study.tell(earlier, state=FAIL)
    objective = objective_for(spec, study, tmp_path, InterruptingTracker())
    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1)
    trials = {t.number: t for t in study.get_trials()}
    interrupted = trials[earlier.number + 1]
    assert interrupted.state == FAIL
    assert interrupted.user_attrs["failure_kind"] == INTERRUPTED
    copies = [t for t in trials.values() if t.state == WAITING]
    assert [t.system_attrs["failed_trial"] for t in copies] == [interrupted.number]


class SigintOnResult(io.StringIO):
    """A progress stream that sends this process SIGINT when the first result line is written, i.e. after
    the trial's work and before Optuna records its value."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = False

    def write(self, text: str) -> int:
        written = super().write(text)
        if "J&F-Mean" in text and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return written


@pytest.mark.usefixtures("ctrl_c_enabled")
def test_ctrl_c_between_trials_is_held_until_the_result_is_recorded(tmp_path: Path, synth_root: Path) -> None:
    study_file = grid_study(tmp_path, synth_root, [1, 3, 5])
    out = SigintOnResult()
    runner = FakeRunner(temperature_score)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        sweep(study_file, tmp_path, runner, out=out)
    assert out.sent
    assert signal.getsignal(signal.SIGINT) is before  # the sweep's handler is gone again
    trials = trials_of(tmp_path)
    # the finished trial kept its result; no other trial was started, none is left RUNNING
    assert [t.state for t in trials] == [COMPLETE]
    assert len(runner.configs) == 1

    again = sweep(study_file, tmp_path, FakeRunner(temperature_score))
    assert again.n_complete == 3 and again.ok


def test_an_ignored_sigint_stays_ignored(tmp_path: Path, synth_root: Path) -> None:
    """A sweep started with SIGINT ignored (``nohup ... &`` from a script) keeps ignoring it, as Python and
    the sweep's parent process do, instead of turning Ctrl-C back on in its trials."""
    study_file = grid_study(tmp_path, synth_root, [1])
    seen: list[Any] = []

    def score(config: Any, index: int) -> float:
        seen.append(signal.getsignal(signal.SIGINT))
        return temperature_score(config, index)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        summary = sweep(study_file, tmp_path, FakeRunner(score))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert summary.ok and seen and all(handler is signal.SIG_IGN for handler in seen)
