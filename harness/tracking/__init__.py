"""Tracking and results: MLflow runs (:mod:`.runs`), run artifacts and overlays (:mod:`.artifacts`),
leaderboards (:mod:`.leaderboard`), study plots (:mod:`.plots`), names as MLflow stores them
(:mod:`.names`) and the environment probes (:mod:`.environment`, shared with the benchmarks).

The names below are imported lazily on first use, so that ``harness.tracking.environment`` (used by
benchmark processes that measure their own memory) does not pull in MLflow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> submodule that defines it
_EXPORTS = {
    "DEFAULT_EXPERIMENT": "runs",
    "DEFAULT_RUN_STUDY": "runs",
    "DEFAULT_TRACKING_URI": "runs",
    "StudyTracker": "runs",
    "TrackingConfig": "runs",
    "TrialRun": "runs",
    "default_artifact_location": "runs",
    "environment_tags": "runs",
    "resolve_tracking_uri": "runs",
    "track_run": "runs",
    "DIAGNOSTIC_METRICS": "names",
    "METRIC_NAMES": "names",
    "ROLE_PARENT": "names",
    "ROLE_RUN": "names",
    "ROLE_TRIAL": "names",
    "TAG_ERROR": "names",
    "TAG_ROLE": "names",
    "TAG_STUDY": "names",
    "TAG_SYSTEM": "names",
    "TAG_TRIAL": "names",
    "flatten_settings": "names",
    "mlflow_key": "names",
    "error_overlay_image": "artifacts",
    "overlay_image": "artifacts",
    "write_worst_sequence_gifs": "artifacts",
    "describe_device": "environment",
    "project_git_commit": "environment",
}

if TYPE_CHECKING:
    from harness.tracking.artifacts import error_overlay_image, overlay_image, write_worst_sequence_gifs
    from harness.tracking.environment import describe_device, project_git_commit
    from harness.tracking.names import (
        DIAGNOSTIC_METRICS,
        METRIC_NAMES,
        ROLE_PARENT,
        ROLE_RUN,
        ROLE_TRIAL,
        TAG_ERROR,
        TAG_ROLE,
        TAG_STUDY,
        TAG_SYSTEM,
        TAG_TRIAL,
        flatten_settings,
        mlflow_key,
    )
    from harness.tracking.runs import (
        DEFAULT_EXPERIMENT,
        DEFAULT_RUN_STUDY,
        DEFAULT_TRACKING_URI,
        StudyTracker,
        TrackingConfig,
        TrialRun,
        default_artifact_location,
        environment_tags,
        resolve_tracking_uri,
        track_run,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_RUN_STUDY",
    "DEFAULT_TRACKING_URI",
    "DIAGNOSTIC_METRICS",
    "METRIC_NAMES",
    "ROLE_PARENT",
    "ROLE_RUN",
    "ROLE_TRIAL",
    "StudyTracker",
    "TAG_ERROR",
    "TAG_ROLE",
    "TAG_STUDY",
    "TAG_SYSTEM",
    "TAG_TRIAL",
    "TrackingConfig",
    "TrialRun",
    "default_artifact_location",
    "describe_device",
    "environment_tags",
    "error_overlay_image",
    "flatten_settings",
    "mlflow_key",
    "overlay_image",
    "project_git_commit",
    "resolve_tracking_uri",
    "track_run",
    "write_worst_sequence_gifs",
]
