"""Leaderboards of finished trials, read back from the MLflow tracking store.

Columns, in order: ``rank`` (1 = best J&F-Mean), ``study``, ``trial``, the run's params, the DAVIS
metrics under their proper names (``J&F-Mean``, ``J-Mean``, ...), per-sequence ``jf/<sequence>``,
``run_id`` and ``duration_s``.

Param columns get short names: the section prefix of ``backbone.*``, ``method.*`` and ``resolved.*``
settings is dropped (``method.topk`` -> ``topk``, ``backbone.name`` -> ``backbone``, ``method.name`` ->
``method``), and the resolved time step and layer (what the run really used) own the names ``timestep``
and ``layer``; a short name two params would share keeps the full dotted names instead. Other settings
keep their dotted name.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from harness.errors import ConfigError
from harness.tracking import (
    DEFAULT_EXPERIMENT,
    METRIC_NAMES,
    ROLE_TRIAL,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
    resolve_tracking_uri,
)

#: leaderboard column -> MLflow metric name
METRIC_COLUMNS: dict[str, str] = dict(METRIC_NAMES)
LEAD_COLUMNS = ("rank", "study", "trial")
TRAIL_COLUMNS = ("run_id", "duration_s")
SEQUENCE_PREFIX = "jf/"
SHORTENED_SECTIONS = ("backbone", "method", "resolved")
#: params shown in the Markdown table even when they do not vary
KEY_PARAMS = ("backbone", "timestep", "layer")
MARKDOWN_METRICS = ("J&F-Mean", "J-Mean", "F-Mean")
MARKDOWN_ROWS = 20
#: params that differ between trials without being a studied setting
NON_AXIS_PARAMS = ("output_dir",)
USUAL_AXES = (
    "backbone",
    "timestep",
    "layer",
    "temperature",
    "topk",
    "radius",
    "n_last_frames",
    "similarity",
    "ensemble_size",
)


def _short_name(key: str) -> str:
    section, _, rest = key.partition(".")
    if section not in SHORTENED_SECTIONS or not rest:
        return key
    return section if rest == "name" else rest


def param_column_names(keys: Iterable[str]) -> dict[str, str]:
    """Dotted param key -> leaderboard column (see the module docstring for the rules)."""
    keys = sorted(set(keys))
    claims: dict[str, list[str]] = {}
    for key in keys:
        claims.setdefault(_short_name(key), []).append(key)
    reserved = set(LEAD_COLUMNS) | set(TRAIL_COLUMNS) | set(METRIC_COLUMNS)
    names: dict[str, str] = {}
    for short, claimants in claims.items():
        resolved = [k for k in claimants if k.startswith("resolved.")]
        for key in claimants:
            unique = len(claimants) == 1 or (len(resolved) == 1 and key == resolved[0])
            names[key] = short if unique else key
    for key, name in names.items():
        if name in reserved or name.startswith(SEQUENCE_PREFIX):
            names[key] = f"param.{key}"
    return names


def _parse_param(text: str | None) -> object:
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


def _column_values(values: list[object]) -> pd.Series:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) for v in present):
        return pd.Series(values, dtype="Int64")
    if present and all(isinstance(v, int | float) for v in present):
        return pd.Series([math.nan if v is None else float(v) for v in values], dtype="float64")
    return pd.Series([None if v is None else str(v) for v in values], dtype="object")


def _search_trial_runs(client: MlflowClient, experiment_id: str, study: str | None) -> list[Run]:
    filter_string = f"tags.`{TAG_ROLE}` = '{ROLE_TRIAL}' and attributes.status = 'FINISHED'"
    if study is not None:
        if "'" in study or "`" in study:
            raise ConfigError(f"study name {study!r} contains a quote; no run can be tagged with it")
        filter_string += f" and tags.`{TAG_STUDY}` = '{study}'"
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def empty_leaderboard() -> pd.DataFrame:
    return pd.DataFrame(columns=[*LEAD_COLUMNS, *METRIC_COLUMNS, *TRAIL_COLUMNS])


def leaderboard_from_runs(runs: list[Run]) -> pd.DataFrame:
    """The leaderboard table of already fetched trial runs (ranked over all of them)."""
    if not runs:
        return empty_leaderboard()
    names = param_column_names(key for run in runs for key in run.data.params)
    param_columns = sorted(set(names.values()))
    sequence_columns = sorted({k for run in runs for k in run.data.metrics if k.startswith(SEQUENCE_PREFIX)})
    rows: dict[str, list[object]] = {
        c: [] for c in [*LEAD_COLUMNS[1:], *param_columns, *METRIC_COLUMNS, *sequence_columns, *TRAIL_COLUMNS]
    }
    for run in runs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        trial = tags.get(TAG_TRIAL, "")
        rows["study"].append(tags.get(TAG_STUDY))
        rows["trial"].append(int(trial) if trial.isdigit() else None)
        by_column = {names[key]: value for key, value in params.items()}
        for column in param_columns:
            rows[column].append(_parse_param(by_column.get(column)))
        for column, metric in METRIC_COLUMNS.items():
            rows[column].append(metrics.get(metric, math.nan))
        for column in sequence_columns:
            rows[column].append(metrics.get(column, math.nan))
        rows["run_id"].append(run.info.run_id)
        start, end = run.info.start_time, run.info.end_time
        rows["duration_s"].append((end - start) / 1000 if end and start else math.nan)
    table = pd.DataFrame(
        {
            column: _column_values(values) if column in param_columns or column == "trial" else values
            for column, values in rows.items()
        }
    )
    return rank(table)


def rank(table: pd.DataFrame) -> pd.DataFrame:
    """Sorted by J&F-Mean (best first; missing last; ties by study and trial) with ``rank`` 1..n."""
    table = table.drop(columns=["rank"], errors="ignore")
    table = table.sort_values(
        ["J&F-Mean", "study", "trial"], ascending=[False, True, True], na_position="last", kind="stable"
    ).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def build_leaderboard(
    tracking_uri: str | None, experiment: str = DEFAULT_EXPERIMENT, study: str | None = None
) -> pd.DataFrame:
    """Finished trial runs of ``experiment`` (one ``study``, or all) as a ranked table.

    Uses the MLflow client bound to ``tracking_uri`` (None = $MLFLOW_TRACKING_URI or ``sqlite:///mlflow.db``)
    rather than ``mlflow.search_runs``, which reads the process-wide tracking URI.
    """
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return empty_leaderboard()
    return leaderboard_from_runs(_search_trial_runs(client, found.experiment_id, study))


def study_leaderboard(table: pd.DataFrame, study: str) -> pd.DataFrame:
    """One study's rows, re-ranked, without the param and sequence columns that only other studies have."""
    rows = table[table["study"] == study]
    fixed = {*LEAD_COLUMNS, *METRIC_COLUMNS, *TRAIL_COLUMNS}
    empty = [c for c in rows.columns if c not in fixed and rows[c].isna().all()]
    return rank(rows.drop(columns=empty))


def study_axes(table: pd.DataFrame) -> list[str]:
    """The param columns that vary in ``table``: the axes a study swept (or that TPE explored).

    Bookkeeping params (``output_dir``, different for every trial) and settings shadowed by a resolved
    value (``backbone.timestep`` when ``timestep`` exists) are left out. Usual axes come first.
    """
    fixed = {*LEAD_COLUMNS, *METRIC_COLUMNS, *TRAIL_COLUMNS}
    params = [c for c in table.columns if c not in fixed and not c.startswith(SEQUENCE_PREFIX)]
    short = {c for c in params if "." not in c}
    axes = [
        c
        for c in params
        if c not in NON_AXIS_PARAMS
        and c.rsplit(".", 1)[-1] not in short - {c}
        and table[c].astype("string").nunique(dropna=True) > 1
    ]
    order = {name: i for i, name in enumerate(USUAL_AXES)}
    return sorted(axes, key=lambda c: (order.get(c, len(order)), c))


def _format_cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def leaderboard_markdown(table: pd.DataFrame, top: int = MARKDOWN_ROWS) -> str:
    """The top rows as a Markdown table: rank, study, trial, the key params and J&F/J/F means (3 decimals)."""
    fixed = {*LEAD_COLUMNS, *METRIC_COLUMNS, *TRAIL_COLUMNS}
    params = [c for c in table.columns if c not in fixed and not c.startswith(SEQUENCE_PREFIX)]
    varying = [c for c in params if table[c].astype("string").nunique(dropna=False) > 1]
    shown = [c for c in params if c in KEY_PARAMS] + [c for c in varying if c not in KEY_PARAMS]
    columns = (
        ["rank"] + (["study"] if table["study"].nunique() > 1 else []) + ["trial", *shown, *MARKDOWN_METRICS]
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in table.head(top).iterrows():
        lines.append("| " + " | ".join(_format_cell(row[c]) for c in columns) + " |")
    if len(table) > top:
        lines.append(f"\n{len(table) - top} more rows in the CSV.")
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, newline=""
    ) as handle:
        temporary = Path(handle.name)
        try:
            handle.write(text)
        except BaseException:
            handle.close()
            temporary.unlink(missing_ok=True)
            raise
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _folder_name(study: str) -> str:
    safe = re.sub(r"[^\w.-]", "_", study)
    return "_" if safe in ("", ".", "..") else safe


def write_leaderboard(table: pd.DataFrame, folder: Path) -> list[Path]:
    """``leaderboard.csv`` (full precision) and ``leaderboard.md`` in ``folder``, each written atomically."""
    csv_path = _write_atomically(folder / "leaderboard.csv", table.to_csv(index=False))
    md_path = _write_atomically(folder / "leaderboard.md", leaderboard_markdown(table))
    return [csv_path, md_path]


def export_leaderboards(
    tracking_uri: str | None, experiment: str, out_dir: Path, study: str | None = None
) -> list[Path]:
    """``<out_dir>/<study>/leaderboard.{csv,md}`` per study, and ``<out_dir>/leaderboard.{csv,md}`` across
    studies when ``study`` is None. Returns the files written."""
    out_dir = Path(out_dir)
    table = build_leaderboard(tracking_uri, experiment, study)
    studies = [study] if study is not None else sorted(s for s in table["study"].dropna().unique())
    written: list[Path] = []
    for name in studies:
        written += write_leaderboard(study_leaderboard(table, name), out_dir / _folder_name(name))
    if study is None:
        written += write_leaderboard(table, out_dir)
    return written


__all__ = [
    "METRIC_COLUMNS",
    "build_leaderboard",
    "export_leaderboards",
    "leaderboard_from_runs",
    "leaderboard_markdown",
    "param_column_names",
    "study_axes",
    "study_leaderboard",
    "write_leaderboard",
]
