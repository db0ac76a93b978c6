"""Where a study lives: a local journal file (one machine, any number of workers) or an RDB URL.

SQLite is not used for local studies: its file lock serialises writers and several Optuna workers then
fail with "database is locked". Optuna's JournalStorage with the file backend appends to one log file
under a lock and is safe for several processes on one machine. Several machines need a server database
(PostgreSQL), where heartbeats let a surviving worker notice a killed one (see :class:`HeartbeatSettings`).

Storage strings accepted everywhere (``--storage``):

* ``None``: the journal file ``studies-storage/<study>.journal`` (relative to the working directory).
* ``journal:PATH`` or a plain path: a journal file at PATH.
* ``postgresql://...``, ``mysql://...``, ``sqlite:///...``: an RDB URL (SQLite only with one worker).
"""

from __future__ import annotations

import importlib.util
import random
import time
import warnings
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


@dataclass(frozen=True)
class HeartbeatSettings:
    """Heartbeats of running trials (RDB storage only; Optuna's journal storage has none).

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
        return self.kind == "rdb"

    @property
    def is_sqlite(self) -> bool:
        return self.kind == "rdb" and self.url.startswith("sqlite")


def resolve_storage(
    storage: str | None, study_name: str, storage_dir: Path = DEFAULT_STORAGE_DIR
) -> StorageLocation:
    """Parse a ``--storage`` value; journal paths are made absolute so workers in other folders agree."""
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
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if location.kind == "journal":
        assert location.path is not None
        location.path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(location.path)))

    heartbeat = heartbeat or HeartbeatSettings()
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


def make_retry_callback(max_retry: int) -> Any:
    """Optuna's callback that re-queues a stale trial with the same parameters (named per Optuna version)."""
    import optuna

    retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if retry_class is None:
        retry_class = optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return retry_class(max_retry=max_retry)


def retried_trial_numbers(trials: list[Any]) -> set[int]:
    """Numbers of failed trials that a later trial retries (they should not count against the budget)."""
    retried: set[int] = set()
    for trial in trials:
        retried.update(int(number) for number in trial.system_attrs.get("retry_history", []))
    return retried
