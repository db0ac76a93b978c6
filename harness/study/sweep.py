"""Create or resume a study and run its trials with one or several workers.

Resuming is the normal case: ``run_sweep`` opens the study with ``load_if_exists=True`` and runs only
what the trial budget still allows, so re-running a command after a crash (or on a second machine)
continues the same study. The budget counts COMPLETE, PRUNED and RUNNING trials and trials that failed
because of their settings; trials that failed for other reasons (killed, interrupted, missing weights or
data, memory) are re-queued with the same parameters and do not count (:mod:`harness.study.failures`).
Before the study is created, :mod:`harness.study.preflight` checks the dataset, weights, disk and
tracking store, so a sweep that cannot run writes nothing.

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
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from harness.errors import ConfigError, HarnessError
from harness.study.failures import (
    KILLED,
    KIND_ATTR,
    NOT_COUNTED,
    counts_against_budget,
    fail_and_requeue,
    reap_dead_workers,
    retried_numbers,
)
from harness.study.interrupts import InterruptGate, StopOnInterrupt
from harness.study.objective import BackbonePool, PipelineRunner, StudyObjective, close_stale_runs
from harness.study.progress import SweepProgress
from harness.study.spec import StudySpec, load_study_spec
from harness.study.storage import (
    DEFAULT_STORAGE_DIR,
    HeartbeatSettings,
    StorageLocation,
    check_workers,
    file_lock,
    open_storage,
    resolve_storage,
)

#: study user attribute holding the fixed (seeded, shuffled) order in which trials visit the sequences
SEQUENCE_ORDER_ATTR = "sequence_order"
#: study user attribute counting the sweep processes started on the study (each gets its own seed stream)
STREAMS_ATTR = "sampler_streams"
#: rounds of local workers: a round after one whose worker was killed runs its re-queued trials
MAX_WORKER_ROUNDS = 3
#: exit code of a worker that stopped because of an environment failure (missing weights, memory)
WORKER_STOPPED_EXIT = 3
#: the parent run is summarised at most this often while trials run (and always at the end)
PARENT_UPDATE_SECONDS = 60.0
WORKER_STOP_SECONDS = 30.0
WORKER_POLL_SECONDS = 0.5

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
    #: trials re-queued (killed, interrupted, environment failures) and waiting for the next run
    n_waiting: int = 0
    #: failed trials that do not count (killed, interrupted, environment, surplus)
    n_not_counted: int = 0
    #: why the sweep stopped before its budget (an environment failure), None otherwise
    stop_reason: str | None = None

    @property
    def all_failed(self) -> bool:
        """Trials ran or were tried, and not one of them finished (complete or pruned)."""
        return self.n_complete + self.n_pruned == 0 and (self.n_failed + self.n_not_counted) > 0

    @property
    def ok(self) -> bool:
        """Whether the command should exit 0."""
        # a worker killed by a signal (< 0) had its trial re-queued and re-run; other errors count
        workers_ok = all(code <= 0 for code in self.worker_exit_codes)
        return workers_ok and not self.all_failed and self.stop_reason is None

    def format(self) -> str:
        lines = [
            f"study {self.study_name} ({self.storage})",
            f"  trials: {self.n_complete} complete, {self.n_pruned} pruned, {self.n_failed} failed"
            + (f", {self.n_running} running" if self.n_running else "")
            + f" (budget {self.target_trials})",
        ]
        if self.n_not_counted or self.n_waiting:
            lines.append(
                f"  {self.n_not_counted} not counted (killed, interrupted or missing weights/data/memory); "
                f"{self.n_waiting} re-queued for the next run"
            )
        if self.stop_reason:
            lines.append(f"  stopped early: {self.stop_reason}; fix it and run the same command again")
        if self.all_failed:
            lines.append("  every trial failed")
        if self.best_value is not None:
            params = ", ".join(f"{k}={v}" for k, v in self.best_params.items())
            lines.append(f"  best: {self.best_value:.4f} with {params or 'the fixed settings'}")
        if self.parent_run_id:
            lines.append(f"  MLflow parent run: {self.parent_run_id}")
        killed = [-code for code in self.worker_exit_codes if code < 0]
        if killed:
            lines.append(f"  {len(killed)} worker(s) killed by signal {killed}; their trials were re-queued")
        failed_workers = [code for code in self.worker_exit_codes if code > 0]
        if failed_workers:
            lines.append(f"  {len(failed_workers)} worker(s) exited with an error: {failed_workers}")
        return "\n".join(lines)


# -- study objects ---------------------------------------------------------------------------------------


def worker_seed(spec: StudySpec, worker_index: int, n_existing_trials: int, stream: str = "0") -> int:
    """Seed of a TPE/random sampler: differs per sweep process (``stream``), per worker and per resumption,
    so no two draw the same points.

    (Two processes with one seed would propose identical random start-up trials.)
    """
    text = f"{spec.sampler.seed}/{stream}/{worker_index}/{n_existing_trials}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def make_sampler(
    spec: StudySpec, worker_index: int = 0, n_existing_trials: int = 0, stream: str = "0"
) -> Any:
    import optuna

    kind = spec.sampler.type
    if kind == "grid":
        # one seed for all workers: GridSampler assigns grid points by trial number, in a seeded order
        return optuna.samplers.GridSampler(spec.grid_space(), seed=spec.sampler.seed)
    seed = worker_seed(spec, worker_index, n_existing_trials, stream)
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
    if study.metric_names != [spec.objective.metric]:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.objective.metric])  # optuna-dashboard shows it
    if spec.description and study.user_attrs.get("description") != spec.description:
        study.set_user_attr("description", spec.description)
    for params in spec.enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    return study


def claim_stream(study: Any, location: StorageLocation) -> str:
    """A seed stream of its own for this sweep process: a counter in the study, taken under the study's
    lock on a journal file; on a database (several machines) the host and process id are added, since
    two machines may read the counter at once."""
    number = int(study.user_attrs.get(STREAMS_ATTR, 0))
    study.set_user_attr(STREAMS_ATTR, number + 1)
    if location.kind == "journal":
        return str(number)
    return f"{number}@{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def study_lock(location: StorageLocation) -> Iterator[None]:
    """Serialises creating/loading the study and claiming streams between processes on a journal file."""
    if location.kind != "journal" or location.path is None:
        yield
        return
    with file_lock(location.path.with_name(location.path.name + ".study-lock")):  # not Optuna's .lock
        yield


@contextlib.contextmanager
def tracking_store_lock(tracking_uri: str) -> Iterator[None]:
    """One process at a time creates a local SQLite MLflow store (its schema migrations are not safe to
    run twice at once: "duplicate column name") and the study's parent run."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    path = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]).expanduser().absolute()
    # in the temporary folder, keyed by the database's path: no stray lock file beside the user's files
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    with file_lock(Path(tempfile.gettempdir()) / f"diffvos-mlflow-{digest}.lock"):
        yield


def load_existing_study(spec: StudySpec, storage: Any, worker_index: int, stream: str = "0") -> Any:
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
        sampler=make_sampler(spec, worker_index, existing, stream),
        pruner=make_pruner(spec),
    )


# -- budget ----------------------------------------------------------------------------------------------


def budget_used(study: Any, *, count_running: bool) -> int:
    """Trials counted against ``n_trials``: complete, pruned, failed because of their settings (not
    retried, see :mod:`harness.study.failures`), and optionally running ones."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(counts_against_budget(t, retried, count_running=count_running) for t in trials)


class StopAtBudget:
    """Stop this worker once the study as a whole has used its trial budget (running trials of every
    worker count: both storages have heartbeats, so a killed worker's trial stops counting once it is
    failed). Each trial also checks its own position in the budget when it starts (see
    :class:`~harness.study.objective.StudyObjective`), so processes that ask at the same moment cannot
    overshoot.
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
    from optuna.trial import TrialState

    del location, heartbeat  # kept for callers; every abandoned trial is re-queued once
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        failed += fail_and_requeue(study, trial, KILLED, "abandoned: its worker stopped")
    return failed


# -- running ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerOutcome:
    """What one worker did: why it stopped early (None: budget or share used) and its trial count."""

    stop_reason: str | None = None


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
    stream: str = "0",
    progress: SweepProgress | None = None,
) -> WorkerOutcome:
    """Run trials of an existing study until the budget (or this worker's ``max_trials``) is used.

    ``final_update`` summarises the study on the parent run at the end; workers of a local sweep leave
    that to the sweep, which does it once after all of them.
    """
    import optuna

    storage = open_storage(location, heartbeat)
    study = load_existing_study(spec, storage, worker_index, stream)
    order = study.user_attrs.get(SEQUENCE_ORDER_ATTR)
    interrupts = InterruptGate()
    objective = StudyObjective(
        spec,
        sequence_order=order,
        output_root=output_root,
        tracker=tracker,
        parent_run_id=parent_run_id,
        backbones=backbones or BackbonePool(),
        runner=runner,
        extra_overrides=layer_prefetch_overrides(spec),
        target=target,
        progress=progress,
        interrupts=interrupts,
    )
    updater = ParentRunUpdater(tracker, parent_run_id)
    remaining = target - budget_used(study, count_running=True)
    # no trial count fixed here: other workers' running trials count against the budget now, but one
    # that fails (its worker killed) is re-queued and stops counting, and then this worker runs it too
    n_trials = None if max_trials is None else min(max_trials, remaining)
    if remaining > 0 and n_trials != 0:
        # Optuna's own failure warnings carry whole tracebacks; the progress lines say what failed
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        with interrupts.listening():
            study.optimize(
                objective,
                n_trials=n_trials,
                timeout=spec.timeout,
                catch=(Exception,),
                callbacks=[StopOnInterrupt(interrupts), StopAtBudget(target, count_running=True), updater],
            )
            interrupts.raise_if_pending()  # a Ctrl-C held back while a result was being recorded
    close_stale_runs(study, tracker)
    if final_update and not others_running(study):
        updater.update(study)
    if objective.stop_reason and progress is not None:
        progress.note(f"stopped: {objective.stop_reason} (the trial is re-queued for the next run)")
    return WorkerOutcome(stop_reason=objective.stop_reason)


def others_running(study: Any) -> bool:
    """Whether trials of other workers are still running (the last worker to finish summarises)."""
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
    stop_reason: str | None = None,
) -> SweepSummary:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)

    def count(state: Any) -> int:
        return sum(t.state == state for t in trials)

    failed = [t for t in trials if t.state == TrialState.FAIL]
    counted_failures = [t for t in failed if counts_against_budget(t, retried, count_running=False)]
    not_counted = [t for t in failed if t.user_attrs.get(KIND_ATTR) in NOT_COUNTED or t.number in retried]
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
        n_failed=len(counted_failures),
        n_running=count(TrialState.RUNNING),
        best_value=best_value,
        best_params=best_params,
        parent_run_id=parent_run_id,
        worker_exit_codes=exit_codes,
        n_waiting=count(TrialState.WAITING),
        n_not_counted=len(not_counted),
        stop_reason=stop_reason,
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
    quiet: bool = False,
    check: bool = True,
    free_disk: Callable[[Path], int] | None = None,
    out: TextIO | None = None,
) -> SweepSummary:
    """Create or resume the study of ``study_file`` and run it to its trial budget.

    ``tracking`` is a :class:`harness.tracking.TrackingConfig`. ``runner`` (default
    ``harness.pipeline.run``) and ``tracker_factory`` (default ``StudyTracker``) exist for tests; both work
    only in this process (``workers == 1``). ``fail_running`` marks RUNNING trials FAIL and re-queues them
    first; use it only when no other worker runs this study (a journal study after a crash).

    Before the study is created (so a failed check leaves no journal file behind): the tracking store must
    answer, and with ``check`` the pre-flight (:mod:`harness.study.preflight`) must find the dataset, the
    weights and the disk space. ``free_disk`` replaces the free-space probe (tests).
    """
    import optuna

    from harness.study.preflight import check_tracking_store, preflight
    from harness.tracking import resolve_tracking_uri

    spec = load_study_spec(study_file)
    location = resolve_storage(storage, spec.name, storage_dir)
    check_workers(location, workers)
    if workers > 1 and (runner is not None or tracker_factory is not None):
        raise ConfigError("runner and tracker_factory can only be replaced when workers == 1")
    heartbeat = heartbeat or HeartbeatSettings()
    target = spec.target_trials(n_trials)
    output_root = Path(output_root).absolute()
    stream_out = out if out is not None else sys.stdout
    if tracker_factory is None:
        check_tracking_store(resolve_tracking_uri(tracking.tracking_uri))
    prepare_dataset(spec)
    if check:
        report = preflight(spec, target, free_disk=free_disk)
        if not quiet and not report.problems:
            print(report.format(), file=stream_out, flush=True)
        report.raise_for_problems()  # the error lists the problems and their fixes

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_object = open_storage(location, heartbeat)
    with study_lock(location):
        study = create_or_load_study(spec, storage_object)
        stream = claim_stream(study, location)
    if tracker_factory is None:
        from harness.tracking import StudyTracker as tracker_factory
    # MLflow creates (migrates) a fresh SQLite store when its client is made: one process at a time
    with tracking_store_lock(resolve_tracking_uri(tracking.tracking_uri)):
        tracker = tracker_factory(tracking, spec.name)
        parent_run_id = ensure_parent_run(tracker, spec, study_params(spec, location, target))
    if fail_running:
        fail_abandoned_trials(study, location, heartbeat)
    reap_dead_workers(study)  # trials of local workers that died earlier (SIGKILL, power loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    close_stale_runs(study, tracker)

    def progress_for(label: str = "") -> SweepProgress:
        return SweepProgress(
            spec.name, target, spec.objective.metric, workers=workers, quiet=quiet, label=label, stream=out
        )

    remaining = target - budget_used(study, count_running=True)
    estimate = time_estimate(study, remaining, workers)
    if estimate and not quiet:
        print(estimate, file=stream_out, flush=True)
    exit_codes: tuple[int, ...] = ()
    stop_reason = None
    try:
        if remaining > 0 and workers == 1:
            outcome = run_worker(
                spec,
                location,
                tracker=tracker,
                parent_run_id=parent_run_id,
                target=target,
                max_trials=None,
                output_root=output_root,
                heartbeat=heartbeat,
                runner=runner,
                stream=stream,
                progress=progress_for(),
            )
            stop_reason = outcome.stop_reason
        elif remaining > 0:
            exit_codes = run_worker_rounds(
                Path(study_file),
                study,
                location,
                tracker=tracker,
                parent_run_id=parent_run_id,
                target=target,
                workers=workers,
                output_root=output_root,
                heartbeat=heartbeat,
                stream=stream,
                quiet=quiet,
            )
            if WORKER_STOPPED_EXIT in exit_codes:
                stop_reason = "a worker stopped for a reason outside the settings (see its output above)"
            close_stale_runs(study, tracker)
            ParentRunUpdater(tracker, parent_run_id).update(study)
        else:
            ParentRunUpdater(tracker, parent_run_id).update(study)
    except KeyboardInterrupt:
        reap_dead_workers(study)
        close_stale_runs(study, tracker)
        end_parent_run(tracker, parent_run_id, "KILLED")
        raise
    return summarize(study, spec, location, target, parent_run_id, exit_codes, stop_reason)


def time_estimate(study: Any, remaining: int, workers: int) -> str | None:
    """How long the remaining trials take at the mean time of this study's complete trials so far."""
    from optuna.trial import TrialState

    from harness.study.progress import format_duration

    seconds = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.datetime_start is not None and t.datetime_complete is not None
    ]
    if remaining <= 0 or not seconds:
        return None
    mean = sum(seconds) / len(seconds)
    total = remaining * mean / max(1, min(workers, remaining))
    return (
        f"{remaining} trial(s) to run; at {format_duration(mean)} a trial so far, about "
        f"{format_duration(total)} with {workers} worker(s)"
    )


def end_parent_run(tracker: Any, parent_run_id: str, status: str) -> None:
    """Close the parent run (e.g. KILLED on Ctrl-C); the next sweep marks it RUNNING again."""
    client = getattr(tracker, "client", None)
    if client is None:
        return
    with contextlib.suppress(Exception):  # the interrupt matters more than the run's status
        client.set_terminated(parent_run_id, status=status)


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


def worker_command(
    study_file: Path,
    location: StorageLocation,
    *,
    tracker: StudyTracker,
    parent_run_id: str,
    target: int,
    max_trials: int | None,
    output_root: Path,
    heartbeat: HeartbeatSettings,
    worker_index: int,
    stream: str = "0",
    quiet: bool = False,
    n_workers: int = 1,
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
        "--output-root",
        str(output_root),
        "--heartbeat-interval",
        str(heartbeat.interval),
        "--max-retry",
        str(heartbeat.max_retry),
        "--worker-index",
        str(worker_index),
        "--stream",
        stream,
        "--n-workers",
        str(n_workers),
    ]
    if max_trials is not None:
        command += ["--max-trials", str(max_trials)]
    if heartbeat.grace_period is not None:
        command += ["--grace-period", str(heartbeat.grace_period)]
    if tracker.config.artifact_location:
        command += ["--artifact-location", tracker.config.artifact_location]
    if quiet:
        command.append("--quiet")
    return command


def worker_environment() -> dict[str, str]:
    """This process's environment, with the project importable (it need not be pip-installed)."""
    env = dict(os.environ)
    paths = [str(_PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def run_worker_rounds(
    study_file: Path,
    study: Any,
    location: StorageLocation,
    *,
    tracker: StudyTracker,
    parent_run_id: str,
    target: int,
    workers: int,
    output_root: Path,
    heartbeat: HeartbeatSettings,
    stream: str,
    quiet: bool,
) -> tuple[int, ...]:
    """Worker processes until the budget is used; when a worker is killed (a signal), its trial is
    re-queued at once and another round runs what is left. Returns every worker's exit code."""
    codes: list[int] = []
    for round_index in range(MAX_WORKER_ROUNDS):
        remaining = target - budget_used(study, count_running=True)
        if remaining <= 0:
            break
        round_codes = run_worker_processes(
            study_file,
            location,
            study=study,
            tracker=tracker,
            parent_run_id=parent_run_id,
            target=target,
            n_workers=min(workers, remaining),
            output_root=output_root,
            heartbeat=heartbeat,
            stream=f"{stream}.{round_index}",
            quiet=quiet,
        )
        codes += round_codes
        if not any(code < 0 for code in round_codes):
            break  # nobody was killed: what is left (if anything) is for the next command
    return tuple(codes)


def run_worker_processes(
    study_file: Path,
    location: StorageLocation,
    *,
    tracker: StudyTracker,
    parent_run_id: str,
    target: int,
    n_workers: int,
    output_root: Path,
    heartbeat: HeartbeatSettings,
    study: Any = None,
    stream: str = "0",
    quiet: bool = False,
) -> tuple[int, ...]:
    """Start ``n_workers`` subprocesses and wait for all; returns their exit codes.

    Each worker runs trials until the study's budget is used (no fixed share: when one worker's trial is
    re-queued, the others run it).

    A worker that dies from a signal (SIGKILL, the OOM killer) has its running trial failed, re-queued and
    its MLflow run closed KILLED as soon as it is seen dead (when ``study`` is given).
    """
    env = worker_environment()
    processes = [
        subprocess.Popen(
            worker_command(
                study_file,
                location,
                tracker=tracker,
                parent_run_id=parent_run_id,
                target=target,
                max_trials=None,
                output_root=output_root,
                heartbeat=heartbeat,
                worker_index=index,
                stream=stream,
                quiet=quiet,
                n_workers=n_workers,
            ),
            env=env,
        )
        for index in range(n_workers)
    ]
    reaped: set[int] = set()
    try:
        while True:
            for process in processes:
                code = process.poll()
                if code is not None and code < 0 and process.pid not in reaped and study is not None:
                    reaped.add(process.pid)
                    reap_dead_workers(study, pids=[process.pid])
                    close_stale_runs(study, tracker)
            if all(process.poll() is not None for process in processes):
                return tuple(int(process.returncode) for process in processes)
            time.sleep(WORKER_POLL_SECONDS)
    except BaseException:
        # Ctrl-C reaches the workers too (same process group); give them time to record their trial
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.terminate()
        raise
