"""One Optuna trial: settings from the study file and the sampler, one pipeline run, logged to MLflow.

The objective lives as long as its worker: loaded backbones and the feature cache are kept in the
objective object (not in module globals) so that trials of the same model do not reload it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import ConfigError
from harness.study.failures import (
    INTERRUPTED,
    KIND_ATTR,
    SETTING,
    SURPLUS,
    WORKER_ATTR,
    classify,
    counts_against_budget,
    requeue,
    retried_numbers,
    this_worker,
)
from harness.study.interrupts import InterruptGate
from harness.study.spec import StudySpec, _set_dotted

if TYPE_CHECKING:
    from harness.study.progress import SweepProgress
    from harness.tracking import StudyTracker

#: Test hook, off unless set: seconds to sleep after every sequence of a trial, so that a test can kill a
#: worker while it is inside a trial. Read once per worker, never in normal use.
SLEEP_ENV = "DIFFVOS_STUDY_SLEEP_PER_SEQUENCE"
#: how much of an error message is kept in the trial's "error" user attribute
MAX_ERROR_CHARS = 2000

#: ``harness.pipeline.run``'s signature; tests pass a fake
PipelineRunner = Callable[..., Any]


def backbone_key(config: Any) -> tuple[str, ...]:
    """What decides which network a trial needs; trials with equal keys share one loaded backbone."""
    spec = config.backbone
    options = json.dumps(spec.options, sort_keys=True, default=str)
    return (spec.name, str(spec.weights), str(spec.device), spec.dtype, options)


class BackbonePool:
    """Backbones this worker has loaded, kept for the worker's lifetime (models take long to load)."""

    def __init__(self, build: Callable[[Any], Any] | None = None) -> None:
        self._build = build
        self._loaded: dict[tuple[str, ...], Any] = {}

    def get(self, config: Any) -> Any:
        key = backbone_key(config)
        if key not in self._loaded:
            build = self._build
            if build is None:
                from harness.pipeline import build_backbone as build
            self._loaded[key] = build(config)
        return self._loaded[key]

    def __len__(self) -> int:
        return len(self._loaded)


@dataclass(frozen=True)
class UnbuiltSettings:
    """Stands in for a RunConfig that could not be built, so that the failed trial still gets its run."""

    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.settings


def error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def release_accelerator_memory() -> None:
    """After a failed trial (often out of memory), hand cached GPU blocks back so the next trial can run."""
    torch = sys.modules.get("torch")  # only if the pipeline already imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def stop_optimizing(study: Any) -> None:
    """``study.stop()`` when inside ``optimize`` (outside it, e.g. a trial run by hand, there is nothing
    to stop)."""
    with contextlib.suppress(RuntimeError):
        study.stop()


def close_stale_runs(study: Any, tracker: StudyTracker) -> int:
    """Close (as KILLED) the MLflow runs of trials Optuna has failed while their run was still open."""
    from optuna.trial import TrialState

    failed = {t.number: "FAIL" for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return tracker.close_stale_trials(failed) if failed else 0


class SurplusTrial(Exception):
    """A trial asked for after the study's budget was used (by other processes); it is re-queued."""


@dataclass(frozen=True)
class _Finished:
    number: int
    value: float


class StudyObjective:
    """Callable passed to ``study.optimize``: returns the trial's objective metric.

    Failures (bad settings, out of memory, any exception) are recorded on the trial (user attribute
    ``error``) and on its MLflow run (FAILED), then re-raised so that Optuna marks the trial FAIL; the
    sweep catches them and goes on. Pruned trials end their run KILLED with the tag ``pruned=true``.
    """

    def __init__(
        self,
        spec: StudySpec,
        *,
        sequence_order: list[str] | None,
        output_root: Path,
        tracker: StudyTracker,
        parent_run_id: str,
        backbones: BackbonePool | None = None,
        runner: PipelineRunner | None = None,
        extra_overrides: Mapping[str, Any] | None = None,
        target: int | None = None,
        progress: SweepProgress | None = None,
        interrupts: InterruptGate | None = None,
    ) -> None:
        self.spec = spec
        self.sequence_order = sequence_order
        self.output_root = Path(output_root)
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.backbones = backbones if backbones is not None else BackbonePool()
        self.runner = runner
        self.extra_overrides = dict(extra_overrides or {})
        self._caches: dict[str, Any] = {}
        self._sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
        #: the study's trial budget: a trial numbered beyond it (other processes used it) is not run
        self.target = target
        self.progress = progress
        #: why this worker stopped early (an environment failure), None while it runs normally
        self.stop_reason: str | None = None
        #: when Ctrl-C may interrupt (the worker installs it; by default nothing changes)
        self.interrupts = interrupts if interrupts is not None else InterruptGate()

    def _cache_for(self, config: Any) -> Any:
        """One FeatureCache per cache setting for the worker's lifetime (the files are shared on disk)."""
        from harness.pipeline import build_cache

        key = json.dumps(config.to_dict()["cache"], sort_keys=True, default=str)
        if key not in self._caches:
            self._caches[key] = build_cache(config)
        return self._caches[key]

    def _settings(self, params: Mapping[str, Any]) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for dotted, value in (self.spec.trial_overrides(params) | self.extra_overrides).items():
            _set_dotted(nested, dotted, value)
        return nested

    def __call__(self, trial: Any) -> float:
        import optuna

        run = None
        status, error = "FAILED", None
        #: what the progress line says at the end; None: nothing (the trial was not run)
        outcome: str | None = None
        value, detail = None, ""
        try:
            # everything from the first step is interruptible, so Ctrl-C never leaves this trial
            # unlabelled; the handlers below run with the gate closed (see harness.study.interrupts)
            with self.interrupts.open():
                trial.set_user_attr(WORKER_ATTR, this_worker())  # first: a dead worker's trial is found by it
                close_stale_runs(trial.study, self.tracker)
                params = {name: param.suggest(trial) for name, param in self.spec.search_space.items()}
                output_dir = self.output_root / self.spec.name / f"trial-{trial.number}"
                trial.set_user_attr("output_dir", str(output_dir))
                position = self._position(trial)
                if self.target is not None and position > self.target:
                    raise SurplusTrial(f"trial {trial.number} is beyond the budget of {self.target}")
                if self.progress is not None:
                    self.progress.started(trial.number, position, params)
                outcome = "failed"
                try:
                    config = self.spec.build_config(
                        params, output_dir=output_dir, sequences=self.sequence_order
                    ).with_overrides(self.extra_overrides)
                except Exception:
                    run = self.tracker.start_trial(
                        self.parent_run_id, trial.number, params, UnbuiltSettings(self._settings(params))
                    )
                    raise
                run = self.tracker.start_trial(self.parent_run_id, trial.number, params, config)
                value = self._run_trial(trial, config, run)
            status, outcome = "FINISHED", "complete"
            return value
        except SurplusTrial:
            # other processes used the budget while this one asked for a trial: keep it for later
            requeue(trial.study, trial, SURPLUS, "not run: the budget was used by other workers")
            stop_optimizing(trial.study)
            raise
        except optuna.TrialPruned:
            status, outcome = "KILLED", "pruned"
            if run is not None:
                run.set_tags({"pruned": "true"})
            raise
        except Exception as failure:
            error = error_text(failure)
            kind = classify(failure)
            release_accelerator_memory()
            if kind == SETTING:
                trial.set_user_attr("error", error)
                trial.set_user_attr(KIND_ATTR, SETTING)
                outcome, detail = "failed (counts against the budget)", error
            else:
                # not the settings' fault: retried on the next run; this worker stops, since the cause
                # (missing weights or data, memory) is not going away by itself
                requeue(trial.study, trial, kind, error)
                stop_optimizing(trial.study)
                self.stop_reason = error
                outcome, detail = f"failed ({kind}, not counted; re-queued for the next run)", error
            raise
        except BaseException as interrupt:  # KeyboardInterrupt, SystemExit: the worker is stopping
            status, error = "KILLED", error_text(interrupt) or type(interrupt).__name__
            with contextlib.suppress(Exception):  # the interrupt must get through whatever happens
                requeue(trial.study, trial, INTERRUPTED, f"interrupted: {error}")
            outcome = "interrupted (re-queued with the same settings for the next run)"
            raise
        finally:
            if run is not None:
                run.end(status, error=error)
            if self.progress is not None and outcome is not None:
                with contextlib.suppress(Exception):  # a progress line must never change the outcome
                    self._report(trial, outcome, value, detail)

    def _position(self, trial: Any) -> int:
        """1-based position of ``trial`` in the budget: the counted trials numbered before it, plus one."""
        trials = trial.study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        earlier = sum(
            counts_against_budget(t, retried, count_running=True) for t in trials if t.number < trial.number
        )
        return earlier + 1

    def _report(self, trial: Any, outcome: str, value: float | None, detail: str) -> None:
        assert self.progress is not None
        from optuna.trial import TrialState

        trials = trial.study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        if outcome == "complete" and value is not None:
            complete.append(_Finished(trial.number, value))
        best = None
        if complete:
            pick = max if self.spec.objective.direction == "maximize" else min
            top = pick(complete, key=lambda t: t.value)
            best = (float(top.value), int(top.number))
        used = sum(counts_against_budget(t, retried, count_running=False) for t in trials)
        self.progress.finished(
            trial.number,
            value=value,
            outcome=outcome,
            best=best,
            used=used + (outcome == "complete"),
            detail=detail,
        )

    def _run_trial(self, trial: Any, config: Any, run: Any) -> float:
        import optuna

        runner = self.runner
        if runner is None:
            from harness.pipeline import run as runner

        pruning = self.spec.pruning.enabled

        def on_sequence(outcome: Any) -> None:
            run.log_sequence(outcome)
            if self._sleep > 0:
                time.sleep(self._sleep)
            if outcome.jf is None:
                return
            trial.report(float(outcome.jf), step=int(outcome.index))
            if pruning and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after sequence {outcome.index} ({outcome.name})")

        result = runner(
            config,
            backbone=self.backbones.get(config),
            cache=self._cache_for(config),
            on_sequence=on_sequence,
        )
        run.log_result(result)
        metric = self.spec.objective.metric
        if result.metrics is None:
            raise ConfigError(
                f"dataset {config.dataset.root} ({config.dataset.split}) has no full ground truth, so the "
                f"objective {metric} cannot be computed; use an annotated split such as val"
            )
        if metric not in result.metrics:
            raise ConfigError(
                f"objective metric {metric!r} is not computed; available: {', '.join(result.metrics)}"
            )
        trial.set_user_attr("metrics", {k: float(v) for k, v in result.metrics.items()})
        trial.set_user_attr("resolved", {"timestep": int(result.timestep), "layer": result.layer})
        return float(result.metrics[metric])
