"""MLflow runs: one parent run per study, one child run per trial or tracked one-off run.

Everything goes through an :class:`mlflow.MlflowClient` bound to an explicit tracking URI and explicit run
ids, never through MLflow's global "active run": several trials (threads or processes) may log at once.

Metrics of a trial run (DAVIS names mapped by :data:`~harness.tracking.names.METRIC_NAMES`): ``JF_mean``,
``J_mean``, ...; ``jf/<sequence>``; ``time_<stage>_s`` and ``time_<stage>_per_frame_ms`` for every
pipeline timing (extraction, propagation, evaluation, total, ...); ``cache_<counter>`` for the feature
cache's counters; ``peak_gpu_memory_mb`` (runs on CUDA; peak since the run started) and ``peak_rss_mb`` (the
worker process's peak so far); the correspondence diagnostics (``corr_precision``, ...: shares, logged as
the mean over the sequences) and the method's other per-sequence metrics (as the run reports them, else
their mean) when the method reports them. Per-sequence scores are a table artifact
(``per_sequence.json``, shown by the UI's artifact view; also ``per_sequence.csv``), not a stepped metric.

Tags: ``diffvos.study``, ``diffvos.role`` (``parent``, ``trial`` or ``run``), ``diffvos.trial``,
``diffvos.git_commit``, ``diffvos.version.<package>``, ``diffvos.device`` (``cuda:0 (GPU name)`` or
``cpu (CPU model)``), ``diffvos.device_kind``, ``diffvos.hostname``, ``diffvos.system`` (a reproduced
published system), ``diffvos.error`` (failed runs). The experiment carries ``mlflow.experimentKind =
custom_model_development`` so that the MLflow 3 UI opens its model-training view.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from harness.errors import ConfigError
from harness.methods.base import METHOD_ARTIFACTS
from harness.tracking.artifacts import (
    mean_sequence_metrics,
    numeric_fields,
    sequence_table,
    write_overlays,
    write_sequence_tables,
    write_worst_sequence_gifs,
    zip_predictions,
)
from harness.tracking.environment import (
    describe_device,
    package_versions,
    peak_gpu_memory_bytes,
    process_peak_rss_bytes,
    project_git_commit,
    reset_peak_gpu_memory,
    uses_cuda,
)
from harness.tracking.names import (
    DIAGNOSTIC_METRICS,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    METRIC_NAMES,
    ROLE_PARENT,
    ROLE_RUN,
    ROLE_TRIAL,
    TAG_DEVICE,
    TAG_ERROR,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
    finite,
    flatten_settings,
    format_value,
    mlflow_key,
    parse_param,
    truncate,
)

if TYPE_CHECKING:
    import optuna

    from harness.config import RunConfig
    from harness.pipeline import RunResult, SequenceOutcome

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "diffvos"
#: the study one-off ``harness run --track`` runs belong to unless told otherwise
DEFAULT_RUN_STUDY = "runs"
BATCH_SIZE = 100
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
#: per-frame times are logged for these pipeline stages
PER_FRAME_STAGES = ("extraction", "propagation", "evaluation", "total")
MB = 1024**2

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class _HasToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs go. ``tracking_uri`` None = $MLFLOW_TRACKING_URI, else ``sqlite:///mlflow.db``.

    ``artifact_location`` is only used when the experiment is created; None = ``mlartifacts/`` beside a
    SQLite database, or the server's / MLflow's default for other stores.
    """

    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    artifact_location: str | None = None


def resolve_tracking_uri(explicit: str | None) -> str:
    """The tracking URI to use: ``explicit``, else $MLFLOW_TRACKING_URI, else MLflow 3's default SQLite file.

    A bare path ending in ``.db``/``.sqlite`` is turned into a ``sqlite:///`` URI (absolute path).
    """
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    uri = (explicit or "").strip() or from_env or DEFAULT_TRACKING_URI
    if not _URI_SCHEME.match(uri) and uri.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{Path(uri).expanduser().resolve()}"
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """``mlartifacts/`` beside a SQLite database file (as a file URI); None (MLflow decides) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not db_path or db_path == ":memory:":
        return None
    return (Path(db_path).expanduser().resolve().parent / "mlartifacts").as_uri()


# -- small helpers -------------------------------------------------------------------------------------


def _chunks(items: list[Any], size: int = BATCH_SIZE) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_study_name(study_name: str) -> str:
    """Study names go into MLflow filter strings and folder names, so quotes and slashes are refused."""
    if not study_name or any(char in study_name for char in "'\"`\\/") or study_name.strip() != study_name:
        raise ConfigError(
            f"study name {study_name!r} is not usable for tracking: it must be non-empty and contain no "
            "quotes, backticks, slashes or leading/trailing spaces"
        )
    return study_name


def environment_tags(requested_device: str | None = None, git_commit: str | None = None) -> dict[str, str]:
    """Package versions, the device (kind and name), the host and the project commit of a run."""
    device = describe_device(requested_device)
    tags = {f"diffvos.version.{name}": version for name, version in package_versions().items()}
    tags[TAG_DEVICE] = str(device)
    tags["diffvos.device_kind"] = device.kind
    tags["diffvos.hostname"] = socket.gethostname()
    if git_commit:
        tags["diffvos.git_commit"] = git_commit
        tags[MLFLOW_GIT_COMMIT] = git_commit
    return tags


# -- runs ------------------------------------------------------------------------------------------------


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str], logged: dict[str, str]) -> None:
    """Log params not logged yet. MLflow params are immutable, so a key already logged with another value
    is kept and the new value goes to a ``diffvos.param_conflict.<key>`` tag instead of failing the run."""
    fresh: list[Param] = []
    conflicts: list[RunTag] = []
    for key, value in params.items():
        if key not in logged:
            fresh.append(Param(key, value))
            logged[key] = value
        elif logged[key] != value:
            tag_key = mlflow_key(f"diffvos.param_conflict.{key}")
            conflicts.append(RunTag(tag_key, truncate(value, MAX_TAG_VALUE_LENGTH)))
    for chunk in _chunks(fresh):
        client.log_batch(run_id, params=chunk)
    if conflicts:
        warnings.warn(
            f"run {run_id}: params already logged with other values were kept: "
            f"{', '.join(t.key for t in conflicts)}",
            stacklevel=3,
        )
        _log_tags(client, run_id, {t.key: t.value for t in conflicts})


def _log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    entries = [RunTag(mlflow_key(k), truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
    for chunk in _chunks(entries):
        client.log_batch(run_id, tags=chunk)


def _log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    stamp = _now_ms()
    entries = [Metric(mlflow_key(k), v, stamp, step) for k, v in metrics.items()]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


class TrialRun:
    """The child run of one trial (or of one tracked one-off run). Create it with
    :meth:`StudyTracker.start_trial` or :meth:`StudyTracker.start_run`; always :meth:`end` it.

    Used as a context manager it ends itself: FINISHED, KILLED with tag ``pruned=true`` on
    ``optuna.TrialPruned``, KILLED on Ctrl-C, FAILED (with the error) on any other exception.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        study_name: str,
        trial_number: int | None,
        logged_params: dict[str, str],
    ) -> None:
        self.run_id = run_id
        self.study_name = study_name
        self.trial_number = trial_number
        self._client = client
        self._logged_params = logged_params
        self._logged_sequences: set[str] = set()
        self._ended = False
        # the peak GPU memory metric covers this run only
        reset_peak_gpu_memory()

    def __enter__(self) -> TrialRun:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if error is None:
            self.end("FINISHED")
        elif type(error).__name__ == "TrialPruned":  # optuna.TrialPruned: stopped early, not an error
            self.set_tags({"pruned": "true"})
            self.end("KILLED")
        elif isinstance(error, KeyboardInterrupt):
            self.end("KILLED", error=repr(error))
        else:
            self.end("FAILED", error=f"{type(error).__name__}: {error}")

    @property
    def ended(self) -> bool:
        return self._ended

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Extra tags, e.g. ``{"pruned": "true"}`` for a pruned trial."""
        _log_tags(self._client, self.run_id, {k: str(v) for k, v in tags.items()})

    def log_sequence(self, outcome: SequenceOutcome) -> None:
        """One finished sequence as ``jf/<sequence>`` (so a running trial shows its progress in the UI).

        The per-sequence table (``per_sequence.json``) is logged with the result."""
        jf = finite(outcome.jf)
        if jf is not None:
            _log_metrics(self._client, self.run_id, {f"jf/{outcome.name}": jf}, step=outcome.index)
            self._logged_sequences.add(outcome.name)

    def log_result(self, result: RunResult, *, worst_sequences: int = 3) -> None:
        """Settings, metrics, timings, memory, cache counters and artifacts of a finished pipeline run.

        Artifacts: ``config.yaml``, ``per_sequence.csv`` / ``.json`` (the JSON is a table the MLflow UI
        shows), ``per_object.csv``, ``predictions.zip``, ``overlays/<sequence>/<frame>.png`` (first, middle
        and last frame) and ``worst_sequences/<rank>-<sequence>.gif`` for the ``worst_sequences``
        sequences with the lowest J&F (misses and false labels in two colours).
        """
        params = flatten_settings(result.config.to_dict())
        params["resolved.timestep"] = str(result.timestep)
        params["resolved.layer"] = str(result.layer)
        if result.ensemble_size is not None:  # what backbone.ensemble_size: null resolved to
            params["resolved.ensemble_size"] = str(result.ensemble_size)
        _log_params(self._client, self.run_id, params, self._logged_params)
        _log_metrics(self._client, self.run_id, self._result_metrics(result))
        _log_tags(
            self._client,
            self.run_id,
            {
                "diffvos.evaluated": str(result.metrics is not None).lower(),
                "diffvos.output_dir": str(result.output_dir),
            },
        )
        with warnings.catch_warnings():
            # MLflow's log_table probes object columns in a way pandas 3 warns about; nothing to act on
            warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes")
            table = sequence_table(result.sequences)
            self._client.log_table(self.run_id, data=table, artifact_file="per_sequence.json")
        with tempfile.TemporaryDirectory(prefix="diffvos-artifacts-") as scratch:
            folder = Path(scratch)
            config_file = Path(result.output_dir) / "config.yaml"
            if config_file.is_file():
                (folder / "config.yaml").write_bytes(config_file.read_bytes())
            else:
                (folder / "config.yaml").write_text(yaml.safe_dump(result.config.to_dict(), sort_keys=False))
            write_sequence_tables(result.sequences, folder)
            zip_predictions(Path(result.predictions_dir), folder / "predictions.zip")
            try:
                write_overlays(result, folder / "overlays")
                write_worst_sequence_gifs(result, folder / "worst_sequences", worst_sequences)
            except Exception as error:  # noqa: BLE001 - overlays are a convenience; keep the run's results
                warnings.warn(f"run {self.run_id}: no overlay images ({error})", stacklevel=2)
                _log_tags(self._client, self.run_id, {"diffvos.overlay_error": str(error)})
            self._client.log_artifacts(self.run_id, scratch)
        method_artifacts = Path(result.output_dir) / METHOD_ARTIFACTS
        if method_artifacts.is_dir() and any(method_artifacts.iterdir()):
            # what the method kept, e.g. learned prompt vectors: method-artifacts/<sequence>/...
            self._client.log_artifacts(self.run_id, str(method_artifacts), artifact_path=METHOD_ARTIFACTS)

    def _result_metrics(self, result: RunResult) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, value in (result.metrics or {}).items():
            number = finite(value)
            if number is not None:
                metrics[METRIC_NAMES.get(name, mlflow_key(name))] = number
        for name, value in mean_sequence_metrics(result.sequences).items():
            if name in DIAGNOSTIC_METRICS:
                # shares: the mean over the sequences (the pipeline's run-level value is their sum)
                metrics[mlflow_key(name)] = value
            else:  # counts and the like: the run-level value (the sum) when the run reports one
                metrics.setdefault(mlflow_key(name), value)
        for outcome in result.sequences:
            jf = finite(outcome.jf)
            if jf is not None and outcome.name not in self._logged_sequences:
                metrics[f"jf/{outcome.name}"] = jf
        num_frames = sum(o.num_frames for o in result.sequences)
        for stage, seconds in result.timings.items():
            number = finite(seconds)
            if number is None:
                continue
            metrics[f"time_{stage}_s"] = number
            if stage in PER_FRAME_STAGES and num_frames:
                metrics[f"time_{stage}_per_frame_ms"] = 1000 * number / num_frames
        if result.cache_stats is not None:
            for counter, value in numeric_fields(result.cache_stats).items():
                metrics[f"cache_{counter}"] = value
        gpu_peak = peak_gpu_memory_bytes() if uses_cuda(result.config.backbone.device) else None
        if gpu_peak is not None:
            metrics["peak_gpu_memory_mb"] = gpu_peak / MB
        metrics["peak_rss_mb"] = process_peak_rss_bytes() / MB
        metrics["num_sequences"] = float(len(result.sequences))
        metrics["num_frames"] = float(num_frames)
        return metrics

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Close the run as FINISHED, FAILED or KILLED; the error text goes to a tag and ``error.txt``.

        Calling it again is a no-op, so that a ``finally`` can always call it.
        """
        status = status.upper()
        if status not in RUN_END_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_END_STATUSES)}, got {status!r}")
        if self._ended:
            return
        try:
            if error:
                _log_tags(self._client, self.run_id, {TAG_ERROR: error})
                self._client.log_text(self.run_id, error, "error.txt")
        finally:
            self._client.set_terminated(self.run_id, status=status)
            self._ended = True


class StudyTracker:
    """MLflow bookkeeping of one Optuna study: its parent run and one child run per trial."""

    def __init__(self, config: TrackingConfig, study_name: str) -> None:
        self.config = config
        self.study_name = _check_study_name(study_name)
        self.tracking_uri = resolve_tracking_uri(config.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._experiment_id: str | None = None
        self._git_commit: str | None = None
        self._git_checked = False

    # -- lookup --------------------------------------------------------------------------------------

    @property
    def experiment_id(self) -> str:
        """The experiment's id, created on first use (tolerating another process creating it first)."""
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        name = self.config.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = self.config.artifact_location or default_artifact_location(self.tracking_uri)
            try:
                return self.client.create_experiment(
                    name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except MlflowException:
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {name!r} in {self.tracking_uri} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or use another name"
            )
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag existed, or by another tool
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _search(self, filter_string: str) -> list[Run]:
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _study_filter(self, role: str) -> str:
        return f"tags.`{TAG_STUDY}` = '{self.study_name}' and tags.`{TAG_ROLE}` = '{role}'"

    def _parent_runs(self) -> list[Run]:
        runs = self._search(self._study_filter(ROLE_PARENT))
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _environment_tags(self, requested_device: str | None) -> dict[str, str]:
        if not self._git_checked:
            self._git_commit = project_git_commit()
            self._git_checked = True
        return environment_tags(requested_device, self._git_commit)

    # -- API -----------------------------------------------------------------------------------------

    def ensure_parent_run(
        self, description: str = "", params: dict | None = None, *, reopen: bool = True
    ) -> str:
        """The id of the study's parent run, created on the first call.

        When two processes race to create it, both re-check after creating and the older run wins; the
        loser deletes its own. A parent found FINISHED (an earlier sweep) is marked RUNNING again; with
        ``reopen=False`` (a one-off run joining the study) it is left as it is, and one created here is
        closed at once (it only groups the runs).
        """
        existing = self._parent_runs()
        if existing:
            parent = existing[0]
        else:
            tags = {TAG_STUDY: self.study_name, TAG_ROLE: ROLE_PARENT, **self._environment_tags(None)}
            if description:
                tags[MLFLOW_RUN_NOTE] = description
            created = self.client.create_run(
                self.experiment_id,
                tags={k: truncate(v, MAX_TAG_VALUE_LENGTH) for k, v in tags.items()},
                run_name=self.study_name,
            )
            contenders = self._parent_runs()
            parent = contenders[0] if contenders else created
            if parent.info.run_id != created.info.run_id:
                self.client.delete_run(created.info.run_id)
        run_id = parent.info.run_id
        if params:
            _log_params(self.client, run_id, flatten_settings(params), dict(parent.data.params))
        if description and parent.data.tags.get(MLFLOW_RUN_NOTE) != description:
            self.client.set_tag(run_id, MLFLOW_RUN_NOTE, truncate(description, MAX_TAG_VALUE_LENGTH))
        if reopen and parent.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        elif not reopen and not existing and parent.info.status == "RUNNING":
            self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def start_trial(
        self, parent_run_id: str, trial_number: int, params: dict[str, object], config: _HasToDict
    ) -> TrialRun:
        """A RUNNING child run for one trial, with its settings already logged as params.

        ``params`` are the trial's suggested params; those that are settings of ``config`` are logged once
        under their dotted setting name, the others (e.g. a ``model`` choice) under their own name.
        """
        settings = config.to_dict()
        backbone = settings.get("backbone") if isinstance(settings, dict) else None
        requested_device = backbone.get("device") if isinstance(backbone, dict) else None
        tags = {
            MLFLOW_PARENT_RUN_ID: parent_run_id,
            TAG_STUDY: self.study_name,
            TAG_ROLE: ROLE_TRIAL,
            TAG_TRIAL: str(trial_number),
            **self._environment_tags(requested_device),
        }
        run = self.client.create_run(
            self.experiment_id,
            tags=tags,
            run_name=f"{self.study_name}-trial-{trial_number}",
        )
        run_id = run.info.run_id
        try:
            flat = flatten_settings(settings)
            for name, value in params.items():
                flat.setdefault(mlflow_key(name), truncate(format_value(value), MAX_PARAM_VALUE_LENGTH))
            logged: dict[str, str] = {}
            _log_params(self.client, run_id, flat, logged)
        except BaseException as error:
            self.client.set_tag(run_id, TAG_ERROR, truncate(repr(error), MAX_TAG_VALUE_LENGTH))
            self.client.set_terminated(run_id, status="FAILED")
            raise
        return TrialRun(self.client, run_id, self.study_name, trial_number, logged)

    def start_run(
        self, parent_run_id: str, config: _HasToDict, tags: Mapping[str, str] | None = None
    ) -> TrialRun:
        """A RUNNING child run for a one-off run (``harness run --track``, ``harness reproduce``): logged
        like a trial (same params, metrics and artifacts) with role ``run`` and no trial number."""
        settings = config.to_dict()
        backbone = settings.get("backbone") if isinstance(settings, dict) else None
        requested_device = backbone.get("device") if isinstance(backbone, dict) else None
        all_tags = {
            MLFLOW_PARENT_RUN_ID: parent_run_id,
            TAG_STUDY: self.study_name,
            TAG_ROLE: ROLE_RUN,
            **self._environment_tags(requested_device),
            **{mlflow_key(k): str(v) for k, v in (tags or {}).items()},
        }
        output = Path(str(settings.get("output_dir", "run"))).name if isinstance(settings, dict) else "run"
        run = self.client.create_run(
            self.experiment_id,
            tags={k: truncate(v, MAX_TAG_VALUE_LENGTH) for k, v in all_tags.items()},
            run_name=f"{self.study_name}-{output}-{time.strftime('%Y%m%d-%H%M%S')}",
        )
        run_id = run.info.run_id
        logged: dict[str, str] = {}
        try:
            _log_params(self.client, run_id, flatten_settings(settings), logged)
        except BaseException as error:
            self.client.set_tag(run_id, TAG_ERROR, truncate(repr(error), MAX_TAG_VALUE_LENGTH))
            self.client.set_terminated(run_id, status="FAILED")
            raise
        return TrialRun(self.client, run_id, self.study_name, None, logged)

    def _trial_runs(self, trial_number: int | None = None, status: str | None = None) -> list[Run]:
        filter_string = self._study_filter(ROLE_TRIAL)
        if trial_number is not None:
            filter_string += f" and tags.`{TAG_TRIAL}` = '{int(trial_number)}'"
        if status is not None:
            filter_string += f" and attributes.status = '{status}'"
        return self._search(filter_string)

    def find_trial_run(self, trial_number: int) -> str | None:
        """The run id of a trial's child run (the newest one if the trial was logged more than once)."""
        runs = self._trial_runs(trial_number)
        return runs[-1].info.run_id if runs else None

    def close_stale_trials(self, states: dict[int, str]) -> int:
        """Mark KILLED the still-RUNNING child runs of trials Optuna has failed (e.g. a SIGKILLed worker).

        ``states`` maps trial numbers to Optuna state names (or ``TrialState`` values); only ``FAIL``
        trials are touched. Returns how many runs were closed.
        """
        failed = {
            int(number)
            for number, state in states.items()
            if str(getattr(state, "name", state)).upper() == "FAIL"
        }
        if not failed:
            return 0
        closed = 0
        for run in self._trial_runs(status="RUNNING"):
            trial = run.data.tags.get(TAG_TRIAL, "")
            if trial.isdigit() and int(trial) in failed:
                reason = "the trial's process stopped (Optuna marked the trial FAIL)"
                self.client.set_tag(run.info.run_id, TAG_ERROR, reason)
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed += 1
        return closed

    def update_parent(self, parent_run_id: str, study: optuna.Study) -> None:
        """Summary of the study on its parent run: trial counts, best value, and plots under ``plots/``.

        The parent is marked FINISHED when no trial is running any more (RUNNING again on the next
        :meth:`ensure_parent_run`). A plot that cannot be made is skipped with a warning.
        """
        from optuna.trial import TrialState

        from harness.tracking import plots

        trials = study.get_trials(deepcopy=False)
        counts = {state: sum(t.state == state for t in trials) for state in TrialState}
        metrics = {
            "n_trials": float(len(trials)),
            "n_complete": float(counts[TrialState.COMPLETE]),
            "n_failed": float(counts[TrialState.FAIL]),
            "n_pruned": float(counts[TrialState.PRUNED]),
            "n_running": float(counts[TrialState.RUNNING]),
        }
        tags: dict[str, str] = {}
        if len(study.directions) == 1 and counts[TrialState.COMPLETE]:
            best = study.best_trial
            if best.value is not None and math.isfinite(best.value):
                metrics["best_value"] = float(best.value)
                metrics["best_trial"] = float(best.number)
                tags.update({mlflow_key(f"best.{k}"): format_value(v) for k, v in best.params.items()})
        _log_metrics(self.client, parent_run_id, metrics, step=len(trials))
        if tags:
            _log_tags(self.client, parent_run_id, tags)

        fixed = {
            key.removeprefix("fixed."): parse_param(value)
            for key, value in self.client.get_run(parent_run_id).data.params.items()
            if key.startswith("fixed.")
        }
        with tempfile.TemporaryDirectory(prefix="diffvos-plots-") as scratch:
            for filename, figure in plots.study_figures(study, fixed=fixed).items():
                plots.save_figure(figure, Path(scratch) / filename)
            if any(Path(scratch).iterdir()):
                self.client.log_artifacts(parent_run_id, scratch, artifact_path="plots")

        running = counts[TrialState.RUNNING]
        status = self.client.get_run(parent_run_id).info.status
        if running == 0 and status == "RUNNING":
            self.client.set_terminated(parent_run_id, status="FINISHED")
        elif running and status != "RUNNING":
            self.client.update_run(parent_run_id, status="RUNNING")


def track_run(
    config: RunConfig,
    tracking: TrackingConfig,
    *,
    study: str = DEFAULT_RUN_STUDY,
    tags: Mapping[str, str] | None = None,
    runner: Callable[..., RunResult] | None = None,
    worst_sequences: int = 3,
) -> tuple[RunResult, str]:
    """Run the pipeline for ``config`` and log it to MLflow like a sweep trial (same params, metrics and
    artifacts), as a child of ``study``'s parent run so that it sits beside that study's trials.

    ``tags`` are added to the run (``harness reproduce`` sets ``diffvos.system``). Returns the result and
    the run id; a failing run is recorded as FAILED and its error re-raised.
    """
    if runner is None:
        from harness.pipeline import run as runner

    tracker = StudyTracker(tracking, study)
    parent = tracker.ensure_parent_run(reopen=False)
    with tracker.start_run(parent, config, tags) as tracked:
        result = runner(config, on_sequence=tracked.log_sequence)
        tracked.log_result(result, worst_sequences=worst_sequences)
    return result, tracked.run_id


__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_RUN_STUDY",
    "DEFAULT_TRACKING_URI",
    "METRIC_NAMES",
    "StudyTracker",
    "TrackingConfig",
    "TrialRun",
    "flatten_settings",
    "resolve_tracking_uri",
    "track_run",
]
