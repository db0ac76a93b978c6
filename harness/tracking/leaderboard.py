"""Leaderboards of finished trials and tracked one-off runs, read back from the MLflow tracking store.

Columns, in order: ``rank`` (1 = best J&F-Mean), ``study``, ``trial`` (empty for a one-off ``harness run
--track``), the run's params, the DAVIS metrics under their proper names (``J&F-Mean``, ``J-Mean``, ...),
``J&F`` (J&F-Mean on the 0-100 scale papers print), the correspondence diagnostics when runs have them,
``system`` / ``published`` / ``vs published`` (see below), per-sequence ``jf/<sequence>``, ``run_id`` and
``duration_s``.

Param columns get short names: the section prefix of ``backbone.*``, ``method.*`` and ``resolved.*``
settings is dropped (``method.topk`` -> ``topk``, ``backbone.name`` -> ``backbone``, ``method.name`` ->
``method``), and the resolved time step, layer and ensemble size (what the run really used) own the names
``timestep``, ``layer`` and ``ensemble_size``; the requested settings they resolve (``backbone.timestep``,
``backbone.layer``, ``backbone.ensemble_size``, often ``None`` = default) are left out, so each appears
once. A short name two other params would share keeps the full dotted names.
Absolute paths inside the project folder are shown relative to it.

Published systems (:data:`harness.published.PUBLISHED`): a run is matched to a system by its tag
``diffvos.system`` (set by ``harness reproduce``), else by its params: every override of the system equal
(a ``None`` backbone setting compared through its resolved value), on the whole ``val`` split. ``published``
is the system's J&F (0-100) and ``vs published`` our ``J&F`` minus it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from harness.errors import ConfigError
from harness.tracking.environment import PROJECT_ROOT
from harness.tracking.names import (
    DIAGNOSTIC_METRICS,
    METRIC_NAMES,
    ROLE_RUN,
    ROLE_TRIAL,
    TAG_ROLE,
    TAG_STUDY,
    TAG_SYSTEM,
    TAG_TRIAL,
    finite,
    parse_param,
)
from harness.tracking.runs import DEFAULT_EXPERIMENT, resolve_tracking_uri

if TYPE_CHECKING:
    from harness.published import PublishedSystem

#: leaderboard column -> MLflow metric name
METRIC_COLUMNS: dict[str, str] = dict(METRIC_NAMES)
#: J&F-Mean on the 0-100 scale
JF_100 = "J&F"
PUBLISHED_COLUMNS = ("system", "published", "vs published")
LEAD_COLUMNS = ("rank", "study", "trial")
TRAIL_COLUMNS = ("run_id", "duration_s")
#: columns every leaderboard has, whatever its runs
FIXED_COLUMNS = (*LEAD_COLUMNS, *METRIC_COLUMNS, JF_100, *PUBLISHED_COLUMNS, *TRAIL_COLUMNS)
#: where ``harness leaderboard`` writes (ignored by git: generated from the tracking store)
DEFAULT_OUT_DIR = Path("results") / "leaderboards"
#: published numbers are for the whole val split
PUBLISHED_SPLIT = "val"
SEQUENCE_PREFIX = "jf/"
SHORTENED_SECTIONS = ("backbone", "method", "resolved")
#: params shown in the Markdown table even when they do not vary
KEY_PARAMS = ("backbone", "timestep", "layer")
MARKDOWN_METRICS = ("J&F-Mean", "J-Mean", "F-Mean", JF_100)
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
    """Dotted param key -> leaderboard column (see the module docstring for the rules); keys shadowed by
    their resolved value (``backbone.timestep`` beside ``resolved.timestep``) are left out."""
    keys = sorted(set(keys))
    claims: dict[str, list[str]] = {}
    for key in keys:
        claims.setdefault(_short_name(key), []).append(key)
    reserved = {
        *LEAD_COLUMNS,
        *TRAIL_COLUMNS,
        *METRIC_COLUMNS,
        JF_100,
        *PUBLISHED_COLUMNS,
        *DIAGNOSTIC_METRICS,
    }
    names: dict[str, str] = {}
    for short, claimants in claims.items():
        resolved = [k for k in claimants if k.startswith("resolved.")]
        for key in claimants:
            if len(resolved) == 1 and key != resolved[0] and _shadowed_by(key, resolved[0]):
                continue
            unique = len(claimants) == 1 or (len(resolved) == 1 and key == resolved[0])
            names[key] = short if unique else key
    for key, name in names.items():
        if name in reserved or name.startswith(SEQUENCE_PREFIX):
            names[key] = f"param.{key}"
    return names


def _shadowed_by(key: str, resolved: str) -> bool:
    """``backbone.timestep`` is what ``resolved.timestep`` resolves; ``method.timestep`` would not be."""
    return key == f"backbone.{resolved.removeprefix('resolved.')}"


def _parse_param(text: str | None, base: Path | None = None) -> object:
    """A param as a value: numbers as numbers, "None" as missing, paths inside ``base`` relative to it."""
    value = parse_param(text)
    if isinstance(value, str) and base is not None:
        return relative_path(value, base)
    return value


def relative_path(text: str, base: Path) -> str:
    """``text`` relative to ``base`` when it is an absolute path inside it; otherwise unchanged."""
    if not text.startswith("/") and not re.match(r"^[A-Za-z]:[\\/]", text):
        return text
    try:
        return Path(text).resolve().relative_to(Path(base).resolve()).as_posix() or "."
    except (ValueError, OSError):
        return text


def _column_values(values: list[object]) -> pd.Series:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) for v in present):
        return pd.Series(values, dtype="Int64")
    if present and all(isinstance(v, int | float) for v in present):
        return pd.Series([math.nan if v is None else float(v) for v in values], dtype="float64")
    return pd.Series([None if v is None else str(v) for v in values], dtype="object")


def _search_finished_runs(client: MlflowClient, experiment_id: str, study: str | None) -> list[Run]:
    """Finished trial runs and tracked one-off runs (MLflow cannot filter tags with IN: one search each)."""
    if study is not None and ("'" in study or "`" in study):
        raise ConfigError(f"study name {study!r} contains a quote; no run can be tagged with it")
    runs: list[Run] = []
    for role in (ROLE_TRIAL, ROLE_RUN):
        filter_string = f"tags.`{TAG_ROLE}` = '{role}' and attributes.status = 'FINISHED'"
        if study is not None:
            filter_string += f" and tags.`{TAG_STUDY}` = '{study}'"
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
                break
    return runs


def _same_value(param: object, wanted: object) -> bool:
    if isinstance(param, int | float) and isinstance(wanted, int | float) and not isinstance(wanted, bool):
        return float(param) == float(wanted)
    if isinstance(wanted, list | tuple):
        return param == json.dumps(list(wanted))
    return str(param) == str(wanted)


def _setting(params: dict[str, str], key: str) -> object:
    """A run's setting as a value; a ``None`` backbone setting (the default) through its resolved value."""
    value = parse_param(params.get(key))
    section, _, rest = key.partition(".")
    if value is None and section == "backbone":
        return parse_param(params.get(f"resolved.{rest}"))
    return value


def matches_system(params: dict[str, str], system: PublishedSystem) -> bool:
    """Whether a run's params are the system's setting: every override equal, on the whole val split."""
    if not system.overrides:
        return False
    if (
        params.get("dataset.split") != PUBLISHED_SPLIT
        or parse_param(params.get("dataset.sequences")) is not None
    ):
        return False
    return all(_same_value(_setting(params, key), value) for key, value in system.overrides.items())


def published_system_of(
    params: dict[str, str], tags: dict[str, str], systems: dict[str, PublishedSystem]
) -> PublishedSystem | None:
    """The system a run reproduces: its ``diffvos.system`` tag, else the most specific system whose
    overrides all match its params (ties: the first name)."""
    tagged = tags.get(TAG_SYSTEM)
    if tagged:
        return systems.get(tagged)
    matching = [system for _, system in sorted(systems.items()) if matches_system(params, system)]
    return max(matching, key=lambda system: len(system.overrides), default=None)


def _is_param_column(column: str) -> bool:
    return (
        column not in FIXED_COLUMNS
        and column not in DIAGNOSTIC_METRICS
        and not column.startswith(SEQUENCE_PREFIX)
    )


def empty_leaderboard() -> pd.DataFrame:
    return pd.DataFrame(columns=[*LEAD_COLUMNS, *METRIC_COLUMNS, JF_100, *PUBLISHED_COLUMNS, *TRAIL_COLUMNS])


def leaderboard_from_runs(
    runs: list[Run],
    *,
    base: Path | None = PROJECT_ROOT,
    systems: dict[str, PublishedSystem] | None = None,
) -> pd.DataFrame:
    """The leaderboard table of already fetched runs (ranked over all of them).

    ``base``: absolute paths inside it are shown relative to it (None: unchanged). ``systems``: the
    published systems to compare with (None: :data:`harness.published.PUBLISHED`).
    """
    if not runs:
        return empty_leaderboard()
    if systems is None:
        from harness.published import PUBLISHED as systems
    names = param_column_names(key for run in runs for key in run.data.params)
    param_columns = sorted(set(names.values()))
    diagnostics = [m for m in DIAGNOSTIC_METRICS if any(m in run.data.metrics for run in runs)]
    sequence_columns = sorted({k for run in runs for k in run.data.metrics if k.startswith(SEQUENCE_PREFIX)})
    columns = [
        *LEAD_COLUMNS[1:],
        *param_columns,
        *METRIC_COLUMNS,
        JF_100,
        *diagnostics,
        *PUBLISHED_COLUMNS,
        *sequence_columns,
        *TRAIL_COLUMNS,
    ]
    rows: dict[str, list[object]] = {c: [] for c in columns}
    for run in runs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        trial = tags.get(TAG_TRIAL, "")
        rows["study"].append(tags.get(TAG_STUDY))
        rows["trial"].append(int(trial) if trial.isdigit() else None)
        by_column = {names[key]: value for key, value in params.items() if key in names}
        for column in param_columns:
            rows[column].append(_parse_param(by_column.get(column), base))
        for column, metric in METRIC_COLUMNS.items():
            rows[column].append(metrics.get(metric, math.nan))
        jf_100 = 100 * metrics.get(METRIC_COLUMNS["J&F-Mean"], math.nan)
        rows[JF_100].append(jf_100)
        for column in [*diagnostics, *sequence_columns]:
            rows[column].append(metrics.get(column, math.nan))
        system = published_system_of(params, tags, systems)
        rows["system"].append(system.name if system else None)
        # a system may have no published number (e.g. a released setting the paper gives no row for)
        published_jf = finite(system.jf) if system else None
        rows["published"].append(math.nan if published_jf is None else published_jf)
        rows["vs published"].append(math.nan if published_jf is None else jf_100 - published_jf)
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
    tracking_uri: str | None,
    experiment: str = DEFAULT_EXPERIMENT,
    study: str | None = None,
    *,
    base: Path | None = PROJECT_ROOT,
) -> pd.DataFrame:
    """Finished trial runs and tracked one-off runs of ``experiment`` (one ``study``, or all) as a ranked
    table (see :func:`leaderboard_from_runs` for ``base``).

    Uses the MLflow client bound to ``tracking_uri`` (None = $MLFLOW_TRACKING_URI or ``sqlite:///mlflow.db``)
    rather than ``mlflow.search_runs``, which reads the process-wide tracking URI.
    """
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return empty_leaderboard()
    return leaderboard_from_runs(_search_finished_runs(client, found.experiment_id, study), base=base)


def newest_run_end(tracking_uri: str | None, experiment: str = DEFAULT_EXPERIMENT) -> float | None:
    """When the newest finished run of ``experiment`` ended (seconds since the epoch); None when none."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    newest = client.search_runs(
        [found.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.end_time DESC"],
    )
    return newest[0].info.end_time / 1000 if newest and newest[0].info.end_time else None


def load_leaderboard(
    csv_path: Path | None, tracking_uri: str | None, experiment: str = DEFAULT_EXPERIMENT
) -> tuple[pd.DataFrame, str]:
    """The leaderboard from the fresher of an exported CSV and the tracking store, and a sentence saying
    which was read and why (for the notebook).

    The store is fresher when a run finished after the CSV was written. A SQLite store whose file does not
    exist is not opened (opening would create it).
    """
    uri = resolve_tracking_uri(tracking_uri)
    local_db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0]) if uri.startswith("sqlite:///") else None
    store_exists = local_db is None or local_db.is_file()
    csv_exists = csv_path is not None and Path(csv_path).is_file()
    if not csv_exists and not store_exists:
        raise FileNotFoundError(
            f"neither the leaderboard {csv_path} nor the tracking database {local_db} exists; "
            "run a sweep first or point DIFFVOS_LEADERBOARD / MLFLOW_TRACKING_URI at one"
        )
    store = f"the MLflow store {uri} (experiment {experiment})"
    if not csv_exists:
        return build_leaderboard(uri, experiment), f"read from {store}; no CSV at {csv_path}"
    csv_time = Path(csv_path).stat().st_mtime  # type: ignore[arg-type]
    if not store_exists:
        return pd.read_csv(csv_path), f"read from the CSV {csv_path} (no tracking database at {local_db})"
    newest = newest_run_end(uri, experiment)
    if newest is not None and newest > csv_time:
        return build_leaderboard(uri, experiment), f"read from {store}: it has runs newer than {csv_path}"
    reason = "no run in the store is newer" if newest is not None else "the store has no finished runs"
    return pd.read_csv(csv_path), f"read from the CSV {csv_path} ({reason} in {store})"


def row_label(rank: object, study: object, trial: object) -> str:
    """How a leaderboard row is named in plots: ``#1 timestep trial 3`` (``one-off`` for tracked runs)."""
    which = "one-off" if trial is None or pd.isna(trial) else f"trial {int(trial)}"  # type: ignore[call-overload]
    return f"#{rank} {study} {which}"


def study_leaderboard(table: pd.DataFrame, study: str) -> pd.DataFrame:
    """One study's rows, re-ranked, without the param, metric and sequence columns only other studies have."""
    rows = table[table["study"] == study]
    empty = [c for c in rows.columns if c not in FIXED_COLUMNS and rows[c].isna().all()]
    return rank(rows.drop(columns=empty))


def study_axes(table: pd.DataFrame) -> list[str]:
    """The param columns that vary in ``table``: the axes a study swept (or that TPE explored).

    Bookkeeping params (``output_dir``, different for every trial) are left out. Usual axes come first.
    """
    params = [c for c in table.columns if _is_param_column(c)]
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


#: columns on the 0-100 scale: one decimal, as papers print them
HUNDRED_SCALE_COLUMNS = (JF_100, "published", "vs published")


def _format_cell(value: object, column: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float) and column == "vs published":
        return f"{value:+.1f}"
    if isinstance(value, float) and column in HUNDRED_SCALE_COLUMNS:
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def leaderboard_markdown(table: pd.DataFrame, top: int = MARKDOWN_ROWS) -> str:
    """The top rows as a Markdown table: rank, study, trial, the key and varying params, J&F/J/F means
    (3 decimals), J&F on the 0-100 scale, and the published comparison when a row has one."""
    params = [c for c in table.columns if _is_param_column(c) and c not in NON_AXIS_PARAMS]
    varying = [c for c in params if table[c].astype("string").nunique(dropna=False) > 1]
    shown = [c for c in params if c in KEY_PARAMS] + [c for c in varying if c not in KEY_PARAMS]
    metrics = [c for c in MARKDOWN_METRICS if c in table.columns]
    published = list(PUBLISHED_COLUMNS) if "system" in table.columns and table["system"].notna().any() else []
    columns = (
        ["rank"]
        + (["study"] if table["study"].nunique() > 1 else [])
        + ["trial", *shown, *metrics, *published]
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in table.head(top).iterrows():
        lines.append("| " + " | ".join(_format_cell(row[c], c) for c in columns) + " |")
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
    "DEFAULT_OUT_DIR",
    "METRIC_COLUMNS",
    "build_leaderboard",
    "export_leaderboards",
    "leaderboard_from_runs",
    "leaderboard_markdown",
    "load_leaderboard",
    "matches_system",
    "newest_run_end",
    "param_column_names",
    "row_label",
    "study_axes",
    "study_leaderboard",
    "write_leaderboard",
]
