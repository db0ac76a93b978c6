"""Where a study lives: a local journal file (one machine, any number of workers) or an RDB URL.

SQLite is not used for local studies: its file lock serialises writers and several Optuna workers then
fail with "database is locked". Optuna's JournalStorage with the file backend appends to one log file
under a lock and is safe for several processes on one machine. Several machines need a server database
(PostgreSQL). On both, heartbeats let a surviving worker notice a killed one (see
:class:`HeartbeatSettings`; Optuna's own on RDB storage, :func:`HeartbeatJournalStorage` on journal files),
and :func:`repair_journal` cuts a record torn by a killed writer off the end of a journal file.

Storage strings accepted everywhere (``--storage``):

* ``None``: the journal file ``studies-storage/<study>.journal`` (relative to the working directory).
* ``journal:PATH`` or a plain path: a journal file at PATH.
* ``postgresql://...``, ``mysql://...``, ``sqlite:///...``: an RDB URL (SQLite only with one worker).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

DEFAULT_STORAGE_DIR = Path("studies-storage")
JOURNAL_PREFIX = "journal:"
JOURNAL_SUFFIX = ".journal"
#: attempts at opening an RDB storage (see open_storage)
OPEN_ATTEMPTS = 3
RDB_SCHEMES = ("postgresql", "mysql", "sqlite", "oracle", "mssql")
#: trial system attribute holding the last heartbeat (seconds since the epoch) on journal storage
HEARTBEAT_ATTR = "heartbeat"


@dataclass(frozen=True)
class HeartbeatSettings:
    """Heartbeats of running trials (Optuna's on RDB storage, ours on journal files).

    A worker writes a heartbeat every ``interval`` seconds; a RUNNING trial whose heartbeat is older than
    ``grace_period`` is failed by the next worker that starts a trial, and re-queued once with the same
    parameters (``max_retry``).
    """

    interval: int = 10
    #: None = Optuna's default, twice the interval
    grace_period: int | None = None
    max_retry: int = 1

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"heartbeat interval must be at least 1 s, got {self.interval}")
        if self.grace_period is not None and self.grace_period <= self.interval:
            raise ConfigError(
                f"heartbeat grace period ({self.grace_period} s) must exceed the interval ({self.interval} s)"
            )
        if self.max_retry < 0:
            raise ConfigError(f"max_retry must be >= 0, got {self.max_retry}")


@dataclass(frozen=True)
class StorageLocation:
    """A parsed storage string: ``kind`` is "journal" (with ``path``) or "rdb" (with ``url``)."""

    kind: str
    url: str
    path: Path | None = None

    @property
    def display(self) -> str:
        """The URL with any password masked, for messages and summaries."""
        if self.kind != "rdb":
            return self.url
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:  # a URL SQLAlchemy cannot parse has no password to hide that we could find
            return self.url

    @property
    def has_heartbeat(self) -> bool:
        """Both kinds: RDB storage through Optuna, journal files through :class:`HeartbeatJournalStorage`."""
        return True

    @property
    def is_sqlite(self) -> bool:
        return self.kind == "rdb" and self.url.startswith("sqlite")


def resolve_storage(
    storage: str | None, study_name: str, storage_dir: Path = DEFAULT_STORAGE_DIR
) -> StorageLocation:
    """Parse a ``--storage`` value; journal paths are made absolute so workers in other folders agree."""
    from harness.study.spec import check_study_name

    check_study_name(study_name)  # the default journal file is named after the study
    if storage is None or not storage.strip():
        path = (storage_dir / f"{study_name}{JOURNAL_SUFFIX}").expanduser().absolute()
        return StorageLocation("journal", f"{JOURNAL_PREFIX}{path}", path)
    storage = storage.strip()
    if storage.startswith(JOURNAL_PREFIX):
        raw = storage.removeprefix(JOURNAL_PREFIX)
        if not raw:
            raise ConfigError("storage 'journal:' needs a file path, e.g. journal:studies-storage/x.journal")
        path = Path(raw).expanduser().absolute()
        return StorageLocation("journal", f"{JOURNAL_PREFIX}{path}", path)
    if "://" in storage:
        scheme = storage.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme not in RDB_SCHEMES:
            raise ConfigError(
                f"storage {storage!r}: unsupported scheme {scheme!r}; use postgresql://..., mysql://..., "
                "sqlite:///... or a journal file path"
            )
        return StorageLocation("rdb", with_installed_driver(storage))
    path = Path(storage).expanduser().absolute()
    return StorageLocation("journal", f"{JOURNAL_PREFIX}{path}", path)


def with_installed_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, while this project depends on psycopg2; a
    URL that names its driver (``postgresql+psycopg2://``) is left alone.
    """
    if not url.startswith("postgresql://"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def check_workers(location: StorageLocation, workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if workers > 1 and location.is_sqlite:
        raise ConfigError(
            f"storage {location.display}: SQLite is not safe for {workers} parallel workers; "
            "use a journal file (the default) or PostgreSQL"
        )


def open_storage(location: StorageLocation, heartbeat: HeartbeatSettings | None = None) -> Any:
    """The Optuna storage object for ``location`` (heartbeats and retries enabled on RDB storage)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    heartbeat = heartbeat or HeartbeatSettings()
    if location.kind == "journal":
        assert location.path is not None
        location.path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(location.path)
        return HeartbeatJournalStorage(
            JournalFileBackend(str(location.path)),
            interval=heartbeat.interval,
            grace_period=heartbeat.grace_period,
            stale_callback=make_retry_callback(heartbeat.max_retry),
        )

    options: dict[str, Any] = {
        "heartbeat_interval": heartbeat.interval,
        "grace_period": heartbeat.grace_period,
    }
    retry = make_retry_callback(heartbeat.max_retry)
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9 renamed the option
        options["heartbeat_stale_trial_callback"] = retry
    else:
        options["failed_trial_callback"] = retry
    engine_kwargs = {} if location.is_sqlite else {"pool_pre_ping": True}
    # Workers started together on an empty database race to create Optuna's tables; the losers fail
    # once and find the tables on the next attempt.
    last_error: Exception | None = None
    for attempt in range(OPEN_ATTEMPTS):
        if attempt:
            time.sleep(attempt * (0.5 + random.random()))
        try:
            with warnings.catch_warnings():
                # heartbeats are "experimental" in Optuna's wording, and have been for years
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(location.url, engine_kwargs=engine_kwargs, **options)
        except ImportError as error:
            raise ConfigError(
                f"storage {location.display}: a database driver is missing ({error})"
            ) from error
        except Exception as error:  # SQLAlchemy errors: unreachable server, or the creation race
            last_error = error
    raise ConfigError(f"storage {location.display}: cannot open the database ({last_error})") from last_error


def make_retry_callback(max_retry: int | None) -> Any:
    """A callback that marks a stale trial as killed (see :mod:`harness.study.failures`) and re-queues it
    with the same parameters through Optuna's own retry callback (named per Optuna version)."""
    import optuna

    retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if retry_class is None:
        retry_class = optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_class(max_retry=max_retry)

    def mark_and_retry(study: Any, trial: Any) -> None:
        from harness.study.failures import KILLED, KIND_ATTR

        with contextlib.suppress(Exception):  # the state is what matters; the label is informative
            study._storage.set_trial_user_attr(trial._trial_id, KIND_ATTR, KILLED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            retry(study, trial)

    return mark_and_retry


# -- journal files: repair, heartbeats, locks -----------------------------------------------------------


def repair_journal(path: Path) -> Path | None:
    """Cut a torn last record off a journal file (a writer killed mid-line), keeping a backup.

    Optuna appends one JSON record per line under its lock, so only the end of the file can be torn; a
    bad record followed by good ones is real corruption and is reported instead of guessed at. Holds
    Optuna's own journal lock while it looks, so a record being written is never mistaken for a torn one.
    Returns the backup's path when something was cut.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    from optuna.storages.journal import JournalFileSymlinkLock
    from optuna.storages.journal._file import get_lock_file

    with get_lock_file(JournalFileSymlinkLock(str(path))):
        data = path.read_bytes()
        keep = _complete_prefix_length(data, path)
        if keep == len(data):
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        backup = path.with_name(f"{path.name}.torn-{stamp}-{os.getpid()}.bak")
        backup.write_bytes(data)
        with path.open("r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    warnings.warn(
        f"{path}: the last record was torn (a process stopped while writing it); kept a copy as "
        f"{backup.name} and carried on from the last complete record",
        stacklevel=2,
    )
    return backup


def _complete_prefix_length(data: bytes, path: Path) -> int:
    """Bytes of ``data`` up to and including the last complete, parseable record."""
    lines = data.split(b"\n")
    # after the last "\n" there is b"" (complete file) or a partial record
    complete = lines[:-1]
    bad = [index for index, line in enumerate(complete) if not _parses(line)]
    good = len(complete)
    if bad and bad[-1] == len(complete) - 1:  # a torn last record that ended with a newline
        good = bad.pop()
    if bad:
        raise ConfigError(
            f"journal {path} is damaged at record {bad[0] + 1} of {len(complete)} (not only its last "
            "line); restore it from a backup or move it away to start the study afresh"
        )
    return sum(len(line) + 1 for line in complete[:good])


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class _HeartbeatJournalMixin:
    """Heartbeats for Optuna's journal storage, which has none of its own.

    Each running trial's worker writes the time into the trial's system attribute ``heartbeat`` every
    ``interval`` seconds; a RUNNING trial whose heartbeat (or start, before the first beat) is older than
    ``grace_period`` is stale, and Optuna fails it and calls the retry callback before the next trial of
    any worker, exactly as on RDB storage. Times are this machine's clock: journal files are for one
    machine.
    """

    _heartbeat_interval: int
    _grace_period: int
    _stale_callback: Any

    def record_heartbeat(self, trial_id: int) -> None:
        import optuna

        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())  # type: ignore[attr-defined]
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker already failed it as stale; the trial's own end will say so

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from optuna.trial import TrialState

        now = time.time()
        stale = []
        trials = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))  # type: ignore[attr-defined]
        for trial in trials:
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None and trial.datetime_start is not None:
                beat = trial.datetime_start.timestamp()
            if beat is not None and now - float(beat) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return self._stale_callback

    def get_failed_trial_callback(self) -> Any:  # the name before Optuna 4.9
        return self._stale_callback


def _heartbeat_journal_class() -> type:
    from optuna.storages._heartbeat import BaseHeartbeat  # the interface Optuna checks for heartbeats
    from optuna.storages.journal import JournalStorage

    class HeartbeatJournal(_HeartbeatJournalMixin, JournalStorage, BaseHeartbeat):  # type: ignore[misc]
        pass

    return HeartbeatJournal


def HeartbeatJournalStorage(  # noqa: N802 - builds an instance of a class made on first use
    backend: Any, *, interval: int, grace_period: int | None, stale_callback: Any
) -> Any:
    """A JournalStorage with heartbeats (Optuna is imported lazily, hence the class made here)."""
    storage = _heartbeat_journal_class()(backend)
    storage._heartbeat_interval = interval
    storage._grace_period = grace_period if grace_period is not None else 2 * interval
    storage._stale_callback = stale_callback
    return storage


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing) between processes on this machine."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
