"""Create or resume a study and run its trials with one or several workers.

Resuming is the normal case: ``run_sweep`` opens the study with ``load_if_exists=True`` and runs only
what the trial budget still allows, so re-running a command after a crash (or on a second machine)
continues the same study. The budget counts COMPLETE, PRUNED and FAIL trials, except failed trials that
were re-queued (a killed worker's trial is retried once with the same parameters).

Several workers on one machine are subprocesses (``python -m harness.study worker ...``) that share the
study through the journal file; the MLflow experiment, the parent run, the sequence order and the
enqueued trials are all set up once, before they start. Several machines run ``harness sweep`` each,
against the same PostgreSQL URL and MLflow server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import ConfigError, HarnessError
from harness.study.objective import BackbonePool, PipelineRunner, StudyObjective, close_stale_runs
from harness.study.spec import StudySpec, load_study_spec
from harness.study.storage import (
    DEFAULT_STORAGE_DIR,
    HeartbeatSettings,
    StorageLocation,
    check_workers,
    make_retry_callback,
    open_storage,
    resolve_storage,
    retried_trial_numbers,
)

#: study user attribute holding the fixed (seeded, shuffled) order in which trials visit the sequences
SEQUENCE_ORDER_ATTR = "sequence_order"
#: the parent run is summarised at most this often while trials run (and always at the end)
PARENT_UPDATE_SECONDS = 60.0
WORKER_STOP_SECONDS = 30.0

_PROJECT_ROOT = Path(__file__).resolve().parents[2]

if TYPE_CHECKING:
    from harness.tracking import StudyTracker, TrackingConfig


@dataclass(frozen=True)
class SweepSummary:
    study_name: str
    #: the storage URL (password masked) or ``journal:<file>``
    storage: str
    target_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    n_running: int
    best_value: float | None
    best_params: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    #: exit codes of worker subprocesses (empty when the sweep ran in this process)
    worker_exit_codes: tuple[int, ...] = ()

    def format(self) -> str:
        lines = [
            f"study {self.study_name} ({self.storage})",
            f"  trials: {self.n_complete} complete, {self.n_pruned} pruned, {self.n_failed} failed"
            + (f", {self.n_running} running" if self.n_running else "")
            + f" (budget {self.target_trials})",
        ]
        if self.best_value is not None:
            params = ", ".join(f"{k}={v}" for k, v in self.best_params.items())
            lines.append(f"  best: {self.best_value:.4f} with {params or 'the fixed settings'}")
        if self.parent_run_id:
            lines.append(f"  MLflow parent run: {self.parent_run_id}")
        failed_workers = [code for code in self.worker_exit_codes if code != 0]
        if failed_workers:
            lines.append(f"  {len(failed_workers)} worker(s) exited with an error: {failed_workers}")
        return "\n".join(lines)


# -- study objects ---------------------------------------------------------------------------------------


def worker_seed(spec: StudySpec, worker_index: int, n_existing_trials: int) -> int:
    """Seed of a TPE/random sampler: differs per worker and per resumption, so no two draw the same points.

    (Two processes with one seed would propose identical random start-up trials.)
    """
    text = f"{spec.sampler.seed}/{worker_index}/{n_existing_trials}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def make_sampler(spec: StudySpec, worker_index: int = 0, n_existing_trials: int = 0) -> Any:
    import optuna

    kind = spec.sampler.type
    if kind == "grid":
        # one seed for all workers: GridSampler assigns grid points by trial number, in a seeded order
        return optuna.samplers.GridSampler(spec.grid_space(), seed=spec.sampler.seed)
    seed = worker_seed(spec, worker_index, n_existing_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    options: dict[str, Any] = {"seed": seed, "constant_liar": True}
    if spec.sampler.n_startup_trials is not None:
        options["n_startup_trials"] = spec.sampler.n_startup_trials
    return optuna.samplers.TPESampler(**options)


def make_pruner(spec: StudySpec) -> Any:
    import optuna

    if not spec.pruning.enabled:
        return optuna.pruners.NopPruner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner(
            p_threshold=spec.pruning.p_threshold, n_startup_steps=spec.pruning.n_startup_steps
        )


def prepare_dataset(spec: StudySpec) -> None:
    """Write the synthetic dataset when the study asks for it and it is missing."""
    root = Path(spec.dataset.root).expanduser()
    if not spec.dataset.synthetic or root.exists():
        return
    from harness.data.synth import make_synthetic_dataset

    try:
        make_synthetic_dataset(root)
    except HarnessError:
        if not root.is_dir():  # another worker finishing first is fine; anything else is not
            raise


def shuffled_sequences(spec: StudySpec) -> list[str]:
    """The dataset's sequences in a seeded random order: pruning compares trials on the same prefix, and
    a shuffled prefix is a fairer sample of the dataset than the alphabetical one."""
    from harness.data import open_dataset

    dataset = open_dataset(
        spec.dataset.root,
        spec.dataset.split,
        list(spec.dataset.sequences) if spec.dataset.sequences is not None else None,
        spec.dataset.resolution,
    )
    names = [sequence.name for sequence in dataset.sequences]
    random.Random(spec.sampler.seed).shuffle(names)
    return names


def create_or_load_study(spec: StudySpec, storage: Any, *, sampler: Any = None) -> Any:
    """The study in ``storage`` (created on first use) with its sequence order and enqueued trials set."""
    import optuna

    study = optuna.create_study(
        storage=storage,
        sampler=sampler or make_sampler(spec),
        pruner=make_pruner(spec),
        study_name=spec.name,
        direction=spec.objective.direction,
        load_if_exists=True,
    )
    stored = study.direction.name.lower()
    if stored != spec.objective.direction:
        raise ConfigError(
            f"{spec.source}: study {spec.name!r} already exists in this storage with direction {stored}; "
            "rename the study or use another storage"
        )
    if SEQUENCE_ORDER_ATTR not in study.user_attrs:
        study.set_user_attr(SEQUENCE_ORDER_ATTR, shuffled_sequences(spec))
    if spec.description and study.user_attrs.get("description") != spec.description:
        study.set_user_attr("description", spec.description)
    for params in spec.enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    return study


def load_existing_study(spec: StudySpec, storage: Any, worker_index: int) -> Any:
    import optuna

    try:
        probe = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError as error:
        raise ConfigError(
            f"study {spec.name!r} does not exist in the storage; run the sweep command first"
        ) from error
    existing = len(probe.get_trials(deepcopy=False))
    return optuna.load_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec, worker_index, existing),
        pruner=make_pruner(spec),
    )


# -- budget ----------------------------------------------------------------------------------------------


def budget_used(study: Any, *, count_running: bool) -> int:
    """Trials counted against ``n_trials``: finished ones (not retried failures), optionally running ones."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = retried_trial_numbers(trials)
    used = 0
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            used += 1
        elif trial.state == TrialState.FAIL and trial.number not in retried:
            used += 1
        elif trial.state == TrialState.RUNNING and count_running:
            used += 1
    return used


class StopAtBudget:
    """Stop this worker once the study as a whole has used its trial budget.

    Running trials of other workers count only where heartbeats exist (RDB storage): there a killed
    worker's trial is failed after the grace period and stops counting. In a journal study a killed
    worker's trial would stay RUNNING forever, so it is not counted (possible overshoot by at most one
    trial per concurrent worker; the per-worker shares prevent it on one machine).
    """

    def __init__(self, target: int, *, count_running: bool) -> None:
        self.target = target
        self.count_running = count_running

    def __call__(self, study: Any, trial: Any) -> None:
        if budget_used(study, count_running=self.count_running) >= self.target:
            study.stop()


class ParentRunUpdater:
    """Refresh the MLflow parent run's summary and plots after trials, at most every ``min_seconds``."""

    def __init__(
        self, tracker: StudyTracker, parent_run_id: str, min_seconds: float = PARENT_UPDATE_SECONDS
    ) -> None:
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.min_seconds = min_seconds
        # the clock starts now: short sweeps get one summary, at the end (plots take seconds to draw)
        self._last = time.monotonic()

    def __call__(self, study: Any, trial: Any) -> None:
        if time.monotonic() - self._last >= self.min_seconds:
            self.update(study)

    def update(self, study: Any) -> None:
        try:
            self.tracker.update_parent(self.parent_run_id, study)
        except Exception as error:  # a summary plot must never stop the sweep
            warnings.warn(f"could not update the MLflow parent run: {error}", stacklevel=2)
        self._last = time.monotonic()


def fail_abandoned_trials(study: Any, location: StorageLocation, heartbeat: HeartbeatSettings) -> int:
    """Mark every RUNNING trial FAIL and re-queue it once, as Optuna does for stale heartbeats.

    Only for journal studies after a crash, and only when no other worker is running this study: the
    journal storage has no heartbeats, so a dead worker's trial is otherwise RUNNING forever.
    """
    import optuna
    from optuna.trial import TrialState

    retry = make_retry_callback(heartbeat.max_retry)
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "error", "abandoned: its worker stopped")
            changed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished after all
        if changed:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                retry(study, study._storage.get_trial(trial._trial_id))
            failed += 1
    return failed


# -- running ---------------------------------------------------------------------------------------------


def run_worker(
    spec: StudySpec,
    location: StorageLocation,
    *,
    tracker: StudyTracker,
    parent_run_id: str,
    target: int,
    max_trials: int | None,
    output_root: Path,
    heartbeat: HeartbeatSettings,
    worker_index: int = 0,
    runner: PipelineRunner | None = None,
    backbones: BackbonePool | None = None,
    final_update: bool = True,
) -> None:
    """Run trials of an existing study until the budget (or this worker's ``max_trials``) is used.

    ``final_update`` summarises the study on the parent run at the end; workers of a local sweep leave
    that to the sweep, which does it once after all of them.
    """
    import optuna

    storage = open_storage(location, heartbeat)
    study = load_existing_study(spec, storage, worker_index)
    order = study.user_attrs.get(SEQUENCE_ORDER_ATTR)
    objective = StudyObjective(
        spec,
        sequence_order=order,
        output_root=output_root,
        tracker=tracker,
        parent_run_id=parent_run_id,
        backbones=backbones or BackbonePool(),
        runner=runner,
        extra_overrides=layer_prefetch_overrides(spec),
    )
    updater = ParentRunUpdater(tracker, parent_run_id)
    remaining = target - budget_used(study, count_running=False)
    n_trials = remaining if max_trials is None else min(max_trials, remaining)
    if n_trials > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(
            objective,
            n_trials=n_trials,
            timeout=spec.timeout,
            catch=(Exception,),
            callbacks=[StopAtBudget(target, count_running=location.has_heartbeat), updater],
        )
    close_stale_runs(study, tracker)
    if final_update and not (location.has_heartbeat and others_running(study)):
        updater.update(study)


def others_running(study: Any) -> bool:
    """Whether trials of other workers are still running (the last worker to finish summarises).

    Only trusted with heartbeats: elsewhere a crashed worker's trial would look running forever.
    """
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def layer_prefetch_overrides(spec: StudySpec) -> dict[str, Any]:
    """Ask the pipeline to extract every swept layer in the same forward pass, when it supports that.

    The RunConfig setting ``backbone.prefetch_layers`` is the lead's to add; until it exists, a layer
    sweep runs one forward pass per layer and trial (correct, only slower).
    """
    layers = spec.layer_choices()
    if not layers:
        return {}
    from harness.config import RunConfig

    backbone_settings = RunConfig().to_dict()["backbone"]
    if "prefetch_layers" not in backbone_settings:
        return {}
    return {"backbone.prefetch_layers": list(layers)}


def summarize(
    study: Any,
    spec: StudySpec,
    location: StorageLocation,
    target: int,
    parent_run_id: str | None,
    exit_codes: tuple[int, ...] = (),
) -> SweepSummary:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = retried_trial_numbers(trials)

    def count(state: Any) -> int:
        return sum(t.state == state for t in trials)

    best_value, best_params = None, {}
    with contextlib.suppress(ValueError):  # no complete trial yet
        best = study.best_trial
        best_value, best_params = best.value, dict(best.params)
    return SweepSummary(
        study_name=spec.name,
        storage=location.display,
        target_trials=target,
        n_complete=count(TrialState.COMPLETE),
        n_pruned=count(TrialState.PRUNED),
        n_failed=sum(t.state == TrialState.FAIL and t.number not in retried for t in trials),
        n_running=count(TrialState.RUNNING),
        best_value=best_value,
        best_params=best_params,
        parent_run_id=parent_run_id,
        worker_exit_codes=exit_codes,
    )


def run_sweep(
    study_file: Path,
    *,
    storage: str | None,
    tracking: TrackingConfig,
    workers: int = 1,
    n_trials: int | None = None,
    output_root: Path = Path("runs"),
    storage_dir: Path = DEFAULT_STORAGE_DIR,
    heartbeat: HeartbeatSettings | None = None,
    fail_running: bool = False,
    runner: PipelineRunner | None = None,
    tracker_factory: Callable[[TrackingConfig, str], StudyTracker] | None = None,
) -> SweepSummary:
    """Create or resume the study of ``study_file`` and run it to its trial budget.

    ``tracking`` is a :class:`harness.tracking.TrackingConfig`. ``runner`` (default
    ``harness.pipeline.run``) and ``tracker_factory`` (default ``StudyTracker``) exist for tests; both work
    only in this process (``workers == 1``). ``fail_running`` marks RUNNING trials FAIL and re-queues them
    first; use it only when no other worker runs this study (a journal study after a crash).
    """
    import optuna

    spec = load_study_spec(study_file)
    location = resolve_storage(storage, spec.name, storage_dir)
    check_workers(location, workers)
    if workers > 1 and (runner is not None or tracker_factory is not None):
        raise ConfigError("runner and tracker_factory can only be replaced when workers == 1")
    heartbeat = heartbeat or HeartbeatSettings()
    target = spec.target_trials(n_trials)
    output_root = Path(output_root).absolute()
    prepare_dataset(spec)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_object = open_storage(location, heartbeat)
    study = create_or_load_study(spec, storage_object)
    if tracker_factory is None:
        from harness.tracking import StudyTracker as tracker_factory
    tracker = tracker_factory(tracking, spec.name)
    parent_run_id = ensure_parent_run(tracker, spec, study_params(spec, location, target))
    if fail_running:
        fail_abandoned_trials(study, location, heartbeat)
    if location.has_heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    close_stale_runs(study, tracker)

    remaining = target - budget_used(study, count_running=False)
    exit_codes: tuple[int, ...] = ()
    if remaining > 0 and workers == 1:
        run_worker(
            spec,
            location,
            tracker=tracker,
            parent_run_id=parent_run_id,
            target=target,
            max_trials=None,
            output_root=output_root,
            heartbeat=heartbeat,
            runner=runner,
        )
    elif remaining > 0:
        exit_codes = run_worker_processes(
            Path(study_file),
            location,
            tracker=tracker,
            parent_run_id=parent_run_id,
            target=target,
            shares=split_trials(remaining, workers),
            output_root=output_root,
            heartbeat=heartbeat,
        )
        close_stale_runs(study, tracker)
        ParentRunUpdater(tracker, parent_run_id).update(study)
    else:
        ParentRunUpdater(tracker, parent_run_id).update(study)
    return summarize(study, spec, location, target, parent_run_id, exit_codes)


def ensure_parent_run(
    tracker: StudyTracker, spec: StudySpec, params: dict[str, Any], attempts: int = 3
) -> str:
    """The study's MLflow parent run; retried because sweeps started at once on several machines race to
    create it and log its params (the loser of such a race sees an integrity error once)."""
    for _ in range(attempts - 1):
        try:
            return tracker.ensure_parent_run(spec.description, params=params)
        except Exception:  # the other process won; its run is found on the next attempt
            time.sleep(0.5 + random.random())
    return tracker.ensure_parent_run(spec.description, params=params)


def study_params(spec: StudySpec, location: StorageLocation, target: int) -> dict[str, Any]:
    """What the parent run records about the study (flattened to MLflow params by the tracker)."""
    return {
        "study": spec.name,
        "sampler": spec.sampler.type,
        "objective": f"{spec.objective.direction} {spec.objective.metric}",
        "n_trials": target,
        "pruning": spec.pruning.enabled,
        "storage": location.display,
        "fixed": dict(spec.fixed),
        "search_space": sorted(spec.search_space),
    }


def split_trials(total: int, workers: int) -> list[int]:
    """``total`` trials as nearly equal shares for ``workers`` workers (never a zero share)."""
    workers = min(workers, total)
    base, extra = divmod(total, workers)
    return [base + (1 if index < extra else 0) for index in range(workers)]


def worker_command(
    study_file: Path,
    location: StorageLocation,
    *,
    tracker: StudyTracker,
    parent_run_id: str,
    target: int,
    max_trials: int,
    output_root: Path,
    heartbeat: HeartbeatSettings,
    worker_index: int,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "harness.study",
        "worker",
        str(Path(study_file).absolute()),
        "--storage",
        location.url,
        "--tracking-uri",
        tracker.tracking_uri,
        "--experiment",
        tracker.config.experiment,
        "--parent-run-id",
        parent_run_id,
        "--target",
        str(target),
        "--max-trials",
        str(max_trials),
        "--output-root",
        str(output_root),
        "--heartbeat-interval",
        str(heartbeat.interval),
        "--max-retry",
        str(heartbeat.max_retry),
        "--worker-index",
        str(worker_index),
    ]
    if heartbeat.grace_period is not None:
        command += ["--grace-period", str(heartbeat.grace_period)]
    if tracker.config.artifact_location:
        command += ["--artifact-location", tracker.config.artifact_location]
    return command


def worker_environment() -> dict[str, str]:
    """This process's environment, with the project importable (it need not be pip-installed)."""
    env = dict(os.environ)
    paths = [str(_PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def run_worker_processes(
    study_file: Path,
    location: StorageLocation,
    *,
    tracker: StudyTracker,
    parent_run_id: str,
    target: int,
    shares: list[int],
    output_root: Path,
    heartbeat: HeartbeatSettings,
) -> tuple[int, ...]:
    """Start one subprocess per share and wait for all; returns their exit codes."""
    env = worker_environment()
    processes = [
        subprocess.Popen(
            worker_command(
                study_file,
                location,
                tracker=tracker,
                parent_run_id=parent_run_id,
                target=target,
                max_trials=share,
                output_root=output_root,
                heartbeat=heartbeat,
                worker_index=index,
            ),
            env=env,
        )
        for index, share in enumerate(shares)
    ]
    try:
        return tuple(process.wait() for process in processes)
    except BaseException:
        # Ctrl-C reaches the workers too (same process group); give them time to record their trial
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.terminate()
        raise
