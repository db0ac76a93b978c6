"""Names and values as MLflow stores them: metric names, tags, params flattened to dotted keys.

Metric names. MLflow metric names cannot contain ``&``, so the DAVIS metrics are logged under these names
(:data:`METRIC_NAMES`; the leaderboard maps them back)::

    J&F-Mean -> JF_mean    J-Mean -> J_mean    J-Recall -> J_recall    J-Decay -> J_decay
                           F-Mean -> F_mean    F-Recall -> F_recall    F-Decay -> F_decay
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
#: correspondence diagnostics (issue #10): per sequence in ``SequenceOutcome.metrics``, logged as run
#: metrics (mean over sequences unless the run reports its own) and shown on leaderboards
DIAGNOSTIC_METRICS = ("corr_precision", "corr_fg_to_bg", "corr_bg_to_fg")

TAG_STUDY = "diffvos.study"
TAG_ROLE = "diffvos.role"
TAG_TRIAL = "diffvos.trial"
TAG_ERROR = "diffvos.error"
#: the published system a run reproduces (set by ``harness reproduce``; read by the leaderboard)
TAG_SYSTEM = "diffvos.system"
TAG_DEVICE = "diffvos.device"
ROLE_PARENT = "parent"
ROLE_TRIAL = "trial"
#: a one-off ``harness run --track``: a child of its study's parent run, like a trial
ROLE_RUN = "run"
#: MLflow 3's experiment tag choosing the UI: model training (runs, metrics), not GenAI (traces)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: MLflow's limits (mlflow.utils.validation): param values 6000 chars, tag values 8000, 100 params per batch
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250

_UNSAFE_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def mlflow_key(name: str) -> str:
    """A param/metric/tag key MLflow accepts (alphanumerics, ``_-. :/``), at most 250 characters."""
    return _UNSAFE_KEY_CHARS.sub("_", str(name))[:MAX_KEY_LENGTH] or "_"


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = "...[truncated]"
    return text[: limit - len(marker)] + marker


def format_value(value: object) -> str:
    """A setting as the text MLflow stores: lists as JSON, paths in POSIX form, the rest ``str``."""
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
            flat[mlflow_key(dotted)] = truncate(format_value(value), MAX_PARAM_VALUE_LENGTH)
    return flat


def parse_param(text: str | None) -> object:
    """MLflow stores params as text; give numbers back as numbers ("None" -> missing)."""
    if text is None or text == "None":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def finite(value: object) -> float | None:
    """``value`` as a finite float, or None (missing, NaN, infinite, not a number)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
