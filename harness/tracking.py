"""Experiment tracking with MLflow: one parent run per study, one child run per trial.

Everything goes through an :class:`mlflow.MlflowClient` bound to an explicit tracking URI and explicit run
ids, never through MLflow's global "active run": several trials (threads or processes) may log at once.

Metric names. MLflow metric names cannot contain ``&``, so the DAVIS metrics are logged under these names
(:data:`METRIC_NAMES`; :mod:`harness.leaderboard` maps them back)::

    J&F-Mean -> JF_mean    J-Mean -> J_mean    J-Recall -> J_recall    J-Decay -> J_decay
                           F-Mean -> F_mean    F-Recall -> F_recall    F-Decay -> F_decay

Other metrics of a trial run: ``sequence_jf`` (stepped, step = sequence index), ``jf/<sequence>``,
``time_<stage>_s`` for every pipeline timing (extraction, propagation, evaluation, total, ...),
``cache_<counter>`` for the feature-cache counters (hits, misses, ...).

Tags: ``diffvos.study``, ``diffvos.role`` (``parent`` or ``trial``), ``diffvos.trial``,
``diffvos.git_commit``, ``diffvos.version.<package>``, ``diffvos.device``, ``diffvos.hostname``,
``diffvos.error`` (failed runs).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from PIL import Image

from harness.errors import ConfigError
from harness.methods.base import METHOD_ARTIFACTS

if TYPE_CHECKING:
    import optuna

    from harness.evaluation import ObjectScores
    from harness.pipeline import RunResult, SequenceOutcome

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "diffvos"

#: DAVIS metric name -> MLflow metric name (MLflow rejects '&' in names)
METRIC_NAMES: dict[str, str] = {
    "J&F-Mean": "JF_mean",
    "J-Mean": "J_mean",
    "J-Recall": "J_recall",
    "J-Decay": "J_decay",
    "F-Mean": "F_mean",
    "F-Recall": "F_recall",
    "F-Decay": "F_decay",
}

TAG_STUDY = "diffvos.study"
TAG_ROLE = "diffvos.role"
TAG_TRIAL = "diffvos.trial"
TAG_ERROR = "diffvos.error"
ROLE_PARENT = "parent"
ROLE_TRIAL = "trial"

#: MLflow's limits (mlflow.utils.validation): param values 6000 chars, tag values 8000, 100 params per batch
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
BATCH_SIZE = 100

RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
TRACKED_PACKAGES = ("torch", "diffusers", "optuna", "mlflow")
OVERLAY_MAX_WIDTH = 480
OVERLAY_ALPHA = 0.5

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_UNSAFE_KEY_CHARS = re.compile(r"[^\w\-. :/]")
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


# -- small helpers: names, values, flattening ------------------------------------------------------------


def mlflow_key(name: str) -> str:
    """A param/metric/tag key MLflow accepts (alphanumerics, ``_-. :/``), at most 250 characters."""
    return _UNSAFE_KEY_CHARS.sub("_", str(name))[:MAX_KEY_LENGTH] or "_"


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = "...[truncated]"
    return text[: limit - len(marker)] + marker


def _format_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        try:
            return json.dumps(list(value))
        except (TypeError, ValueError):
            return str(list(value))
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys, string values truncated to MLflow's 6000 chars.

    An empty mapping becomes ``"{}"`` so that the key still shows up.
    """
    flat: dict[str, str] = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_settings(value, prefix=f"{dotted}."))
        elif isinstance(value, Mapping):
            flat[mlflow_key(dotted)] = "{}"
        else:
            flat[mlflow_key(dotted)] = _truncate(_format_value(value), MAX_PARAM_VALUE_LENGTH)
    return flat


def _chunks(items: list[Any], size: int = BATCH_SIZE) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _check_study_name(study_name: str) -> str:
    """Study names go into MLflow filter strings and folder names, so quotes and slashes are refused."""
    if not study_name or any(char in study_name for char in "'\"`\\/") or study_name.strip() != study_name:
        raise ConfigError(
            f"study name {study_name!r} is not usable for tracking: it must be non-empty and contain no "
            "quotes, backticks, slashes or leading/trailing spaces"
        )
    return study_name


# -- environment description (computed once per tracker) -------------------------------------------------


def project_git_commit(root: Path = _PROJECT_ROOT) -> str | None:
    """The commit checked out in ``root``, or None when it is not a git repository (or has no commit)."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = completed.stdout.strip()
    return commit if completed.returncode == 0 and commit else None


def package_versions(packages: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def device_name(requested: str | None = None) -> str:
    """The accelerator a run used: the CUDA device name, or the CPU (``platform.processor()``)."""
    requested = str(requested or "")
    if requested in ("", "auto", "cuda") or requested.startswith("cuda:"):
        try:
            import torch

            if torch.cuda.is_available():
                index = torch.device(requested).index if requested.startswith("cuda:") else None
                return torch.cuda.get_device_name(index or 0)
        except Exception:  # noqa: BLE001 - a broken CUDA setup must not stop tracking
            pass
    return platform.processor() or platform.machine() or "cpu"


def environment_tags(requested_device: str | None = None, git_commit: str | None = None) -> dict[str, str]:
    tags = {f"diffvos.version.{name}": version for name, version in package_versions().items()}
    tags["diffvos.device"] = device_name(requested_device)
    tags["diffvos.hostname"] = socket.gethostname()
    if git_commit:
        tags["diffvos.git_commit"] = git_commit
        tags[MLFLOW_GIT_COMMIT] = git_commit
    return tags


# -- artifacts of a trial --------------------------------------------------------------------------------


def _numeric_fields(record: object) -> dict[str, float]:
    """The finite numeric fields of a dataclass (e.g. the feature cache's counters)."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        return {}
    values = {f.name: _finite(getattr(record, f.name)) for f in dataclasses.fields(record)}
    return {name: value for name, value in values.items() if value is not None}


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


OBJECT_COLUMNS = [
    "sequence",
    "object",
    "scored_frames",
    "J-Mean",
    "J-Recall",
    "J-Decay",
    "F-Mean",
    "F-Recall",
    "F-Decay",
    "J&F",
]
SEQUENCE_COLUMNS = ["index", "sequence", "frames", "objects", "J&F", "J-Mean", "F-Mean", "seconds"]


def object_row(score: ObjectScores) -> list[object]:
    """One object's DAVIS statistics (mean, recall, decay of J and F over its scored frames)."""
    j, f = score.j_statistics, score.f_statistics
    return [
        score.sequence,
        score.object_id,
        len(score.frames),
        j.mean,
        j.recall,
        j.decay,
        f.mean,
        f.recall,
        f.decay,
        (j.mean + f.mean) / 2,
    ]


def write_sequence_tables(sequences: list[SequenceOutcome], folder: Path) -> list[Path]:
    """``per_sequence.csv`` (one row per sequence) and, with ground truth, ``per_object.csv`` (one row per
    object: the rows of the run's evaluation)."""
    rows: list[list[object]] = []
    for outcome in sequences:
        scores = outcome.scores or []
        j_mean = float(np.mean([s.j_statistics.mean for s in scores])) if scores else ""
        f_mean = float(np.mean([s.f_statistics.mean for s in scores])) if scores else ""
        jf = outcome.jf
        rows.append(
            [
                outcome.index,
                outcome.name,
                outcome.num_frames,
                len(outcome.object_ids),
                "" if jf is None else jf,
                j_mean,
                f_mean,
                sum(outcome.seconds.values()),
            ]
        )
    written = [folder / "per_sequence.csv"]
    _write_csv(written[0], SEQUENCE_COLUMNS, rows)
    object_rows = [object_row(score) for outcome in sequences for score in outcome.scores or []]
    if object_rows:
        written.append(folder / "per_object.csv")
        _write_csv(written[1], OBJECT_COLUMNS, object_rows)
    return written


def zip_predictions(predictions_dir: Path, target: Path) -> Path | None:
    """All prediction PNGs as ``<sequence>/<frame>.png`` in one archive; None when there are none."""
    pngs = sorted(predictions_dir.rglob("*.png")) if predictions_dir.is_dir() else []
    if not pngs:
        return None
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for png in pngs:
            archive.write(png, png.relative_to(predictions_dir).as_posix())
    return target


def overlay_image(
    frame: np.ndarray,
    labels: np.ndarray,
    palette: list[int],
    max_width: int = OVERLAY_MAX_WIDTH,
    alpha: float = OVERLAY_ALPHA,
) -> Image.Image:
    """The frame with each object's pixels blended with its palette colour, at most ``max_width`` wide."""
    if labels.shape != frame.shape[:2]:
        resized = Image.fromarray(labels).resize((frame.shape[1], frame.shape[0]), Image.Resampling.NEAREST)
        labels = np.asarray(resized)
    colours = np.zeros((256, 3), dtype=np.float32)
    flat = np.asarray(palette[: 256 * 3], dtype=np.float32)
    colours.reshape(-1)[: flat.size] = flat
    blended = frame.astype(np.float32)
    objects = (labels > 0) & (labels != 255)
    blended[objects] = (1 - alpha) * blended[objects] + alpha * colours[labels[objects]]
    image = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    if image.width > max_width:
        height = max(1, round(image.height * max_width / image.width))
        image = image.resize((max_width, height), Image.Resampling.BILINEAR)
    return image


def _overlay_indices(num_frames: int) -> list[int]:
    return sorted({0, num_frames // 2, num_frames - 1}) if num_frames > 0 else []


def write_overlays(result: RunResult, folder: Path) -> list[Path]:
    """First, middle and last frame of every sequence blended with its predicted mask (PNG)."""
    from harness.data import open_dataset, read_frame, read_mask
    from harness.data.masks import DAVIS_PALETTE, read_palette

    spec = result.config.dataset
    names = [outcome.name for outcome in result.sequences]
    if not names:
        return []
    dataset = open_dataset(spec.root, spec.split, names, spec.resolution)
    written = []
    for sequence in dataset.sequences:
        frame_names = sequence.frame_names
        for index in _overlay_indices(len(frame_names)):
            prediction = result.predictions_dir / sequence.name / f"{frame_names[index]}.png"
            if not prediction.is_file():
                continue
            palette = read_palette(prediction) or DAVIS_PALETTE
            image = overlay_image(read_frame(sequence.frames[index]), read_mask(prediction), palette)
            target = folder / sequence.name / f"{frame_names[index]}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            written.append(target)
    return written


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
            conflicts.append(RunTag(tag_key, _truncate(value, MAX_TAG_VALUE_LENGTH)))
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
    entries = [RunTag(mlflow_key(k), _truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
    for chunk in _chunks(entries):
        client.log_batch(run_id, tags=chunk)


def _log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    stamp = _now_ms()
    entries = [Metric(mlflow_key(k), v, stamp, step) for k, v in metrics.items()]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


class TrialRun:
    """The child run of one trial. Create it with :meth:`StudyTracker.start_trial`; always :meth:`end` it.

    Used as a context manager it ends itself: FINISHED, KILLED with tag ``pruned=true`` on
    ``optuna.TrialPruned``, KILLED on Ctrl-C, FAILED (with the error) on any other exception.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        study_name: str,
        trial_number: int,
        logged_params: dict[str, str],
    ) -> None:
        self.run_id = run_id
        self.study_name = study_name
        self.trial_number = trial_number
        self._client = client
        self._logged_params = logged_params
        self._logged_sequences: set[str] = set()
        self._ended = False

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
        """One finished sequence: stepped ``sequence_jf`` (step = sequence index) and ``jf/<sequence>``."""
        metrics: dict[str, float] = {}
        seconds = _finite(sum(outcome.seconds.values()))
        if seconds is not None:
            metrics["sequence_time_s"] = seconds
        jf = _finite(outcome.jf)
        if jf is not None:
            metrics["sequence_jf"] = jf
            metrics[f"jf/{outcome.name}"] = jf
        if metrics:
            _log_metrics(self._client, self.run_id, metrics, step=outcome.index)
        if jf is not None:
            self._logged_sequences.add(outcome.name)

    def log_result(self, result: RunResult) -> None:
        """Settings, metrics, timings, cache counters and artifacts of a finished pipeline run."""
        params = flatten_settings(result.config.to_dict())
        params["resolved.timestep"] = str(result.timestep)
        params["resolved.layer"] = str(result.layer)
        _log_params(self._client, self.run_id, params, self._logged_params)

        metrics: dict[str, float] = {}
        for name, value in (result.metrics or {}).items():
            number = _finite(value)
            if number is not None:
                metrics[METRIC_NAMES.get(name, mlflow_key(name))] = number
        for outcome in result.sequences:
            jf = _finite(outcome.jf)
            if jf is not None and outcome.name not in self._logged_sequences:
                metrics[f"jf/{outcome.name}"] = jf
        for stage, seconds in result.timings.items():
            number = _finite(seconds)
            if number is not None:
                metrics[f"time_{stage}_s"] = number
        if result.cache_stats is not None:
            for counter, value in _numeric_fields(result.cache_stats).items():
                metrics[f"cache_{counter}"] = value
        metrics["num_sequences"] = float(len(result.sequences))
        metrics["num_frames"] = float(sum(o.num_frames for o in result.sequences))
        _log_metrics(self._client, self.run_id, metrics)
        _log_tags(
            self._client,
            self.run_id,
            {
                "diffvos.evaluated": str(result.metrics is not None).lower(),
                "diffvos.output_dir": str(result.output_dir),
            },
        )

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
            except Exception as error:  # noqa: BLE001 - overlays are a convenience; keep the run's results
                warnings.warn(f"run {self.run_id}: no overlay images ({error})", stacklevel=2)
                _log_tags(self._client, self.run_id, {"diffvos.overlay_error": str(error)})
            self._client.log_artifacts(self.run_id, scratch)
        method_artifacts = Path(result.output_dir) / METHOD_ARTIFACTS
        if method_artifacts.is_dir() and any(method_artifacts.iterdir()):
            # what the method kept, e.g. learned prompt vectors: method-artifacts/<sequence>/...
            self._client.log_artifacts(self.run_id, str(method_artifacts), artifact_path=METHOD_ARTIFACTS)

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
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException:
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {name!r} in {self.tracking_uri} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or use another name"
            )
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

    def ensure_parent_run(self, description: str = "", params: dict | None = None) -> str:
        """The id of the study's parent run, created on the first call.

        When two processes race to create it, both re-check after creating and the older run wins; the
        loser deletes its own. A parent found FINISHED (an earlier sweep) is marked RUNNING again.
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
                tags={k: _truncate(v, MAX_TAG_VALUE_LENGTH) for k, v in tags.items()},
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
            self.client.set_tag(run_id, MLFLOW_RUN_NOTE, _truncate(description, MAX_TAG_VALUE_LENGTH))
        if parent.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
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
                flat.setdefault(mlflow_key(name), _truncate(_format_value(value), MAX_PARAM_VALUE_LENGTH))
            logged: dict[str, str] = {}
            _log_params(self.client, run_id, flat, logged)
        except BaseException as error:
            self.client.set_tag(run_id, TAG_ERROR, _truncate(repr(error), MAX_TAG_VALUE_LENGTH))
            self.client.set_terminated(run_id, status="FAILED")
            raise
        return TrialRun(self.client, run_id, self.study_name, trial_number, logged)

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

        from harness import plots

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
                tags.update({mlflow_key(f"best.{k}"): _format_value(v) for k, v in best.params.items()})
        _log_metrics(self.client, parent_run_id, metrics, step=len(trials))
        if tags:
            _log_tags(self.client, parent_run_id, tags)

        with tempfile.TemporaryDirectory(prefix="diffvos-plots-") as scratch:
            for filename, figure in plots.study_figures(study).items():
                plots.save_figure(figure, Path(scratch) / filename)
            if any(Path(scratch).iterdir()):
                self.client.log_artifacts(parent_run_id, scratch, artifact_path="plots")

        running = counts[TrialState.RUNNING]
        status = self.client.get_run(parent_run_id).info.status
        if running == 0 and status == "RUNNING":
            self.client.set_terminated(parent_run_id, status="FINISHED")
        elif running and status != "RUNNING":
            self.client.update_run(parent_run_id, status="RUNNING")


__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_TRACKING_URI",
    "METRIC_NAMES",
    "StudyTracker",
    "TrackingConfig",
    "TrialRun",
    "flatten_settings",
    "resolve_tracking_uri",
]
