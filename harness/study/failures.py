"""Why a trial failed, and whether that failure says anything about its settings.

A trial that fails because of its settings (an unknown layer, a time step out of range, a crash of the
method) counts against the trial budget and its grid point is used up, as before. A trial that fails for
a reason outside its settings must not: missing weights or data, running out of memory, a worker killed
(SIGKILL, SIGTERM, lost heartbeat), Ctrl-C, or a trial started after other processes had already used
the budget.
Such a trial is marked FAIL with the user attribute ``failure_kind`` and re-queued with the same
parameters (a WAITING copy, as Optuna's retry callback makes), so the next run of the sweep retries it.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterable
from typing import Any

from harness.errors import DataError, NotEnoughMemoryError, WeightsNotFoundError

#: trial user attribute naming the kind of failure (absent: the settings failed, or the trial did not fail)
KIND_ATTR = "failure_kind"
#: the settings failed: counts against the budget, not retried
SETTING = "setting"
#: weights or data missing, out of memory: retried on the next run
ENVIRONMENT = "environment"
#: Ctrl-C (SIGINT) while the trial ran: retried on the next run
INTERRUPTED = "interrupted"
#: the worker process died (SIGKILL, lost heartbeat): retried
KILLED = "killed"
#: started after the study's budget had been used by other processes: not run, kept for a later budget
SURPLUS = "surplus"
NOT_COUNTED = frozenset({ENVIRONMENT, INTERRUPTED, KILLED, SURPLUS})

#: trial user attribute ``host:pid`` of the worker that runs it
WORKER_ATTR = "worker"


def classify(error: BaseException) -> str:
    """The failure kind of an exception raised by a trial."""
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return INTERRUPTED
    if isinstance(error, WeightsNotFoundError | DataError | MemoryError | NotEnoughMemoryError):
        return ENVIRONMENT
    torch = _loaded_torch()
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return ENVIRONMENT
    if isinstance(error, RuntimeError) and "out of memory" in str(error).lower():
        return ENVIRONMENT  # older CUDA builds, MPS, and allocators that say it in words
    return SETTING


def _loaded_torch() -> Any:
    import sys

    return sys.modules.get("torch")


def retried_numbers(trials: Iterable[Any]) -> set[int]:
    """Numbers of trials that a later (WAITING or run) copy retries."""
    retried: set[int] = set()
    for trial in trials:
        retried.update(int(number) for number in trial.system_attrs.get("retry_history", []))
    return retried


def counts_against_budget(trial: Any, retried: set[int], *, count_running: bool) -> bool:
    """Whether ``trial`` uses up one trial of the budget (and, under the grid sampler, its grid point)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if trial.state == TrialState.RUNNING:
        return count_running
    if trial.state == TrialState.FAIL:
        return trial.number not in retried and trial.user_attrs.get(KIND_ATTR) not in NOT_COUNTED
    return False


def label(study: Any, trial: Any, kind: str, reason: str) -> None:
    """Record why a still-RUNNING trial fails (the journal storage refuses to change finished trials)."""
    study._storage.set_trial_user_attr(trial._trial_id, KIND_ATTR, kind)
    study._storage.set_trial_user_attr(trial._trial_id, "error", reason)


def add_retry(study: Any, trial: Any) -> None:
    """Add a WAITING copy of ``trial`` with its parameters, as Optuna's retry callback does.

    The copy carries Optuna's retry attributes (``failed_trial``, ``retry_history``) and, under the grid
    sampler, the same ``grid_id``, so the grid point is visited by the copy instead of being used up.
    """
    import optuna

    frozen = study._storage.get_trial(trial._trial_id)
    system_attrs = {"failed_trial": frozen.number, "retry_history": [], **frozen.system_attrs}
    system_attrs["retry_history"] = [*system_attrs["retry_history"], frozen.number]
    system_attrs.pop("heartbeat", None)
    user_attrs = {k: v for k, v in frozen.user_attrs.items() if k not in (KIND_ATTR, "error", WORKER_ATTR)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.add_trial(
            optuna.create_trial(
                state=optuna.trial.TrialState.WAITING,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs=user_attrs,
                system_attrs=system_attrs,
            )
        )


def requeue(study: Any, trial: Any, kind: str, reason: str) -> None:
    """Label a RUNNING trial with its failure kind and add its WAITING copy (the caller then fails it)."""
    label(study, trial, kind, reason)
    add_retry(study, trial)


def fail_and_requeue(study: Any, trial: Any, kind: str, reason: str) -> bool:
    """Fail another process's RUNNING trial and re-queue it; False when it had finished meanwhile."""
    import optuna
    from optuna.trial import TrialState

    try:
        label(study, trial, kind, reason)
        changed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    if changed:
        add_retry(study, trial)
    return bool(changed)


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that pid
    return True


def dead_local_worker(worker: str | None, host: str | None = None) -> bool:
    """Whether ``worker`` (``host:pid``) names a process of this machine that no longer exists."""
    if not worker or ":" not in worker:
        return False
    worker_host, _, pid = worker.rpartition(":")
    if worker_host != (host or socket.gethostname()) or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not process_alive(int(pid))


def reap_dead_workers(study: Any, pids: Iterable[int] | None = None) -> list[int]:
    """Fail and re-queue the RUNNING trials of dead worker processes of this machine.

    ``pids``: only these workers (ones this process saw exit); None: any worker of this machine whose
    process is gone (a sweep killed earlier). Returns the numbers of the trials reaped.
    """
    from optuna.trial import TrialState

    host = socket.gethostname()
    wanted = {f"{host}:{pid}" for pid in pids} if pids is not None else None
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if wanted is not None and worker not in wanted:
            continue
        if not dead_local_worker(worker, host):
            continue
        if fail_and_requeue(study, trial, KILLED, f"killed: its worker {worker} stopped while it ran"):
            reaped.append(trial.number)
    return reaped
