"""Leaderboards read back from a real SQLite MLflow store filled through the tracker's API."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from harness import published
from harness.config import RunConfig
from harness.evaluation import ObjectScores
from harness.pipeline import RunResult, SequenceOutcome
from harness.published import PublishedSystem
from harness.tracking import StudyTracker, TrackingConfig
from harness.tracking.leaderboard import (
    build_leaderboard,
    export_leaderboards,
    leaderboard_markdown,
    load_leaderboard,
    matches_system,
    param_column_names,
    relative_path,
    row_label,
    study_axes,
)

# the fake results below have no dataset on disk, so the tracker warns that it cannot draw overlays
pytestmark = pytest.mark.filterwarnings("ignore:run .* no overlay images")

EXPERIMENT = "diffvos-leaderboard"
METRIC_COLUMNS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]


def object_scores(sequence: str, j: float, f: float) -> ObjectScores:
    """One object scored on two frames with the same J and F."""
    return ObjectScores(
        sequence=sequence, object_id=1, frames=("00001", "00002"), j=np.array([j, j]), f=np.array([f, f])
    )


def metrics_for(jf: float) -> dict[str, float]:
    return {
        "J&F-Mean": jf,
        "J-Mean": jf + 0.05,
        "J-Recall": 1.0,
        "J-Decay": 0.0,
        "F-Mean": jf - 0.05,
        "F-Recall": 0.5,
        "F-Decay": 0.25,
    }


#: (study, trial, timestep, temperature, J&F, {sequence: (J, F)})
TRIALS = [
    ("alpha", 0, 10, 0.1, 0.5, {"s1": (0.4, 0.4), "s2": (0.7, 0.5)}),
    ("alpha", 1, 20, 0.1, 0.812345678901234, {"s1": (0.9, 0.7), "s2": (0.85, 0.8)}),
    ("alpha", 2, 30, 0.2, 0.6, {"s1": (0.6, 0.6), "s2": (0.6, 0.6)}),
    ("beta", 0, 10, 0.3, 0.7, {"s3": (0.75, 0.65)}),
    ("beta", 1, 40, 0.3, 0.9, {"s3": (0.95, 0.85)}),
]


def trial_config(timestep: int, temperature: float, folder: Path) -> RunConfig:
    # the dataset does not exist: the tracker only warns that it cannot draw overlays
    return RunConfig.from_dict(
        {
            "dataset": {"root": str(folder.parent / "no-data")},
            "backbone": {"timestep": timestep},
            "method": {"temperature": temperature},
            "output_dir": str(folder),
        }
    )


def log_trial(
    tracker: StudyTracker,
    parent: str,
    trial: int,
    timestep: int,
    temperature: float,
    jf: float,
    sequences: dict[str, tuple[float, float]],
    folder: Path,
) -> str:
    config = trial_config(timestep, temperature, folder)
    outcomes = [
        SequenceOutcome(i, name, 4, [1], [object_scores(name, *jfs)], {})
        for i, (name, jfs) in enumerate(sequences.items())
    ]
    result = RunResult(
        config, folder, folder / "predictions", timestep, 1, metrics_for(jf), None, outcomes, {"total": 1.0}
    )
    run = tracker.start_trial(parent, trial, {}, config)
    for outcome in outcomes:
        run.log_sequence(outcome)
    run.log_result(result)
    run.end()
    return run.run_id


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, fresh_store: Callable[[str], tuple[str, str]]
) -> dict[str, object]:
    uri, artifacts = fresh_store("leaderboard-store")
    tracking = TrackingConfig(tracking_uri=uri, experiment=EXPERIMENT, artifact_location=artifacts)
    run_ids: dict[tuple[str, int], str] = {}
    trackers: dict[str, StudyTracker] = {}
    for study, trial, timestep, temperature, jf, sequences in TRIALS:
        tracker = trackers.setdefault(study, StudyTracker(tracking, study))
        parent = tracker.ensure_parent_run()
        folder = tmp_path_factory.mktemp(f"{study}-{trial}")
        run_ids[(study, trial)] = log_trial(
            tracker, parent, trial, timestep, temperature, jf, sequences, folder
        )
    # runs that must not appear: a failed trial and a trial still running
    alpha = trackers["alpha"]
    config = trial_config(50, 0.2, tmp_path_factory.mktemp("unfinished"))
    alpha.start_trial(alpha.ensure_parent_run(), 3, {}, config).end("FAILED", error="boom")
    running = alpha.start_trial(alpha.ensure_parent_run(), 4, {}, config)
    yield {"uri": uri, "run_ids": run_ids, "client": MlflowClient(tracking_uri=uri)}
    running.end()


def test_param_column_names() -> None:
    names = param_column_names(
        [
            "backbone.name",
            "backbone.timestep",
            "resolved.timestep",
            "method.top_k",
            "dataset.root",
            "model",
            "backbone.options.note",
            "method.seed",
            "backbone.seed",
            "rank",
        ]
    )
    assert names == {
        "backbone.name": "backbone",
        "resolved.timestep": "timestep",
        "method.top_k": "top_k",
        "dataset.root": "dataset.root",
        "model": "model",
        "backbone.options.note": "options.note",
        "method.seed": "method.seed",
        "backbone.seed": "backbone.seed",
        "rank": "param.rank",
    }


def test_study_leaderboard_is_ranked_by_jf(store: dict[str, object]) -> None:
    table = build_leaderboard(store["uri"], EXPERIMENT, "alpha")
    assert list(table.columns[:3]) == ["rank", "study", "trial"]
    assert list(table.columns[-2:]) == ["run_id", "duration_s"]
    assert table["rank"].tolist() == [1, 2, 3]
    assert table["trial"].tolist() == [1, 2, 0]  # failed trial 3 and running trial 4 are left out
    assert table["study"].tolist() == ["alpha"] * 3
    assert table["J&F-Mean"].tolist() == [0.812345678901234, 0.6, 0.5]
    assert table["J-Mean"].tolist() == pytest.approx([0.862345678901234, 0.65, 0.55])
    assert table["timestep"].tolist() == [20, 30, 10]
    # the requested setting beside the resolved one would be a duplicate column
    assert "backbone.timestep" not in table.columns and "backbone.layer" not in table.columns
    assert table["J&F"].tolist() == pytest.approx([81.2345678901234, 60.0, 50.0])
    assert table["temperature"].tolist() == [0.1, 0.2, 0.1]
    assert table["backbone"].tolist() == ["random-conv"] * 3
    assert table["jf/s1"].tolist() == pytest.approx([0.8, 0.6, 0.4])
    assert table["jf/s2"].tolist() == pytest.approx([0.825, 0.6, 0.6])
    assert table["run_id"].tolist() == [store["run_ids"][("alpha", n)] for n in (1, 2, 0)]
    metric_positions = [table.columns.get_loc(c) for c in METRIC_COLUMNS]
    assert metric_positions == sorted(metric_positions)
    assert max(metric_positions) < table.columns.get_loc("jf/s1")
    client: MlflowClient = store["client"]
    info = client.get_run(table["run_id"][0]).info
    assert table["duration_s"][0] == pytest.approx((info.end_time - info.start_time) / 1000)


def test_cross_study_leaderboard(store: dict[str, object]) -> None:
    table = build_leaderboard(store["uri"], EXPERIMENT)
    assert list(zip(table["study"], table["trial"], strict=True)) == [
        ("beta", 1),
        ("alpha", 1),
        ("beta", 0),
        ("alpha", 2),
        ("alpha", 0),
    ]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5]
    assert math.isnan(table["jf/s1"][0]) and table["jf/s3"][0] == pytest.approx(0.9)


def test_missing_experiment_gives_empty_table(store: dict[str, object]) -> None:
    table = build_leaderboard(store["uri"], "no-such-experiment")
    assert table.empty
    assert list(table.columns) == [
        "rank",
        "study",
        "trial",
        *METRIC_COLUMNS,
        "J&F",
        "system",
        "published",
        "vs published",
        "run_id",
        "duration_s",
    ]


def test_export_writes_per_study_and_global_files(store: dict[str, object], tmp_path: Path) -> None:
    written = export_leaderboards(store["uri"], EXPERIMENT, tmp_path)
    expected = {
        tmp_path / "alpha" / "leaderboard.csv",
        tmp_path / "alpha" / "leaderboard.md",
        tmp_path / "beta" / "leaderboard.csv",
        tmp_path / "beta" / "leaderboard.md",
        tmp_path / "leaderboard.csv",
        tmp_path / "leaderboard.md",
    }
    assert set(written) == expected
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == expected  # no temp files left behind

    overall = pd.read_csv(tmp_path / "leaderboard.csv")
    assert overall["J&F-Mean"][1] == 0.812345678901234  # full precision in the CSV
    beta = pd.read_csv(tmp_path / "beta" / "leaderboard.csv")
    assert beta["trial"].tolist() == [1, 0] and beta["rank"].tolist() == [1, 2]
    assert "jf/s1" not in beta.columns and "jf/s3" in beta.columns

    markdown = (tmp_path / "alpha" / "leaderboard.md").read_text().splitlines()
    header = [cell.strip() for cell in markdown[0].strip("|").split("|")]
    assert header[:2] == ["rank", "trial"] and header[-4:] == ["J&F-Mean", "J-Mean", "F-Mean", "J&F"]
    assert "output_dir" not in header  # bookkeeping, different for every trial
    assert {"backbone", "timestep", "temperature"} <= set(header)
    first = dict(zip(header, (cell.strip() for cell in markdown[2].strip("|").split("|")), strict=True))
    assert first["J&F-Mean"] == "0.812" and first["trial"] == "1" and first["timestep"] == "20"
    assert first["J&F"] == "81.2"
    assert len(markdown) == 2 + 3
    overall_header = (tmp_path / "leaderboard.md").read_text().splitlines()[0]
    assert "| study |" in overall_header


def test_export_of_one_study(store: dict[str, object], tmp_path: Path) -> None:
    written = export_leaderboards(store["uri"], EXPERIMENT, tmp_path, study="beta")
    assert sorted(written) == [tmp_path / "beta" / "leaderboard.csv", tmp_path / "beta" / "leaderboard.md"]
    assert not (tmp_path / "leaderboard.csv").exists()


def test_markdown_table_by_hand() -> None:
    table = pd.DataFrame(
        {
            "rank": [1, 2],
            "study": ["s", "s"],
            "trial": [3, 1],
            "timestep": [20, 10],
            "device": ["cpu", "cpu"],
            "J&F-Mean": [0.81234, 0.5],
            "J-Mean": [0.9, 0.6],
            "J-Recall": [1.0, 1.0],
            "J-Decay": [0.0, 0.0],
            "F-Mean": [0.72468, 0.4],
            "F-Recall": [1.0, 1.0],
            "F-Decay": [0.0, 0.0],
            "jf/a": [0.8, 0.5],
            "run_id": ["r3", "r1"],
            "duration_s": [1.0, 2.0],
        }
    )
    assert leaderboard_markdown(table) == (
        "| rank | trial | timestep | J&F-Mean | J-Mean | F-Mean |\n"
        "|---|---|---|---|---|---|\n"
        "| 1 | 3 | 20 | 0.812 | 0.900 | 0.725 |\n"
        "| 2 | 1 | 10 | 0.500 | 0.600 | 0.400 |\n"
    )
    assert leaderboard_markdown(table, top=1).endswith("\n1 more rows in the CSV.\n")


def test_study_axes_are_the_varying_settings(store: dict[str, object]) -> None:
    alpha = build_leaderboard(store["uri"], EXPERIMENT, "alpha")
    # output_dir differs per trial but is no axis; backbone.timestep is shadowed by the resolved timestep
    assert study_axes(alpha) == ["timestep", "temperature"]
    beta = build_leaderboard(store["uri"], EXPERIMENT, "beta")
    assert study_axes(beta) == ["timestep"]


def test_study_axes_order_and_missing_values() -> None:
    table = pd.DataFrame(
        {
            "rank": [1, 2, 3],
            "study": ["s"] * 3,
            "trial": [0, 1, 2],
            "zeta": ["a", "b", "a"],
            "layer": [6, 7, None],
            "topk": [5, 5, 5],
            "seed": [1, None, None],
            "J&F-Mean": [0.5, 0.4, 0.3],
            "jf/x": [0.1, 0.2, 0.3],
            "run_id": ["a", "b", "c"],
            "duration_s": [1.0, 1.0, 1.0],
        }
    )
    assert study_axes(table) == ["layer", "zeta"]


def published_system(name: str, jf: float | None, overrides: dict[str, object]) -> PublishedSystem:
    return PublishedSystem(name=name, description="", jf=jf, source="test", weights=(), overrides=overrides)


def test_published_column_by_matching_params_or_by_tag(
    store: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    systems = {
        "t20": published_system("t20", 80.0, {"backbone.timestep": 20, "method.temperature": 0.1}),
        "t20-any": published_system("t20-any", 79.0, {"backbone.timestep": 20}),
        "tagged": published_system("tagged", 70.0, {"backbone.timestep": 999}),
        # a released setting with no published number: named, but nothing to compare with
        "t30-unpublished": published_system("t30-unpublished", None, {"backbone.timestep": 30}),
    }
    monkeypatch.setattr(published, "PUBLISHED", systems)
    client: MlflowClient = store["client"]
    client.set_tag(store["run_ids"][("beta", 0)], "diffvos.system", "tagged")
    try:
        table = build_leaderboard(store["uri"], EXPERIMENT).set_index(["study", "trial"])
    finally:
        client.delete_tag(store["run_ids"][("beta", 0)], "diffvos.system")
    # alpha trial 1 (t 20, temperature 0.1) matches both t20 systems: the more specific one wins
    assert table.loc[("alpha", 1), "system"] == "t20"
    assert table.loc[("alpha", 1), "published"] == 80.0
    assert table.loc[("alpha", 1), "vs published"] == pytest.approx(81.2345678901234 - 80.0)
    assert table.loc[("beta", 0), "system"] == "tagged"
    assert table.loc[("beta", 0), "vs published"] == pytest.approx(70.0 - 70.0)
    assert table.loc[("alpha", 2), "system"] == "t30-unpublished"
    assert math.isnan(table.loc[("alpha", 2), "published"]) and math.isnan(
        table.loc[("alpha", 2), "vs published"]
    )
    for unmatched in (("alpha", 0), ("beta", 1)):
        assert pd.isna(table.loc[unmatched, "system"]) and math.isnan(table.loc[unmatched, "published"])
    markdown = leaderboard_markdown(table.reset_index())
    assert "| system | published | vs published |" in markdown.splitlines()[0] + " |"
    assert "| t20 | 80.0 | +1.2 |" in markdown


def test_matching_a_system_compares_values_resolves_defaults_and_needs_the_whole_val_split() -> None:
    system = published_system(
        "adm",
        76.8,
        {"backbone.name": "adm", "backbone.timestep": 30, "backbone.layer": 6, "dataset.resolution": "480p"},
    )
    params = {
        "backbone.name": "adm",
        "backbone.timestep": "None",
        "resolved.timestep": "30",
        "backbone.layer": "6",
        "resolved.layer": "6",
        "dataset.split": "val",
        "dataset.sequences": "None",
        "dataset.resolution": "480p",
    }
    assert matches_system(params, system)
    assert not matches_system(params | {"resolved.timestep": "31"}, system)
    assert not matches_system(params | {"dataset.sequences": '["bike"]'}, system)
    assert not matches_system(params | {"dataset.split": "test-dev"}, system)
    assert not matches_system(params, published_system("empty", 1.0, {}))
    listed = published_system("list", 1.0, {"backbone.options.prompt": [1, 2]})
    assert matches_system(params | {"backbone.options.prompt": "[1, 2]"}, listed)


def test_paths_inside_the_project_are_relative(store: dict[str, object], tmp_path_factory) -> None:
    base = tmp_path_factory.getbasetemp()
    table = build_leaderboard(store["uri"], EXPERIMENT, "alpha", base=base)
    assert all(not str(path).startswith("/") for path in table["output_dir"])
    assert all((base / path).is_dir() for path in table["output_dir"])
    absolute = build_leaderboard(store["uri"], EXPERIMENT, "alpha", base=None)
    assert all(str(path).startswith("/") for path in absolute["output_dir"])
    assert relative_path("/elsewhere/x", base) == "/elsewhere/x" and relative_path("runs/a", base) == "runs/a"


def test_load_leaderboard_reads_the_fresher_source(
    tmp_path: Path, fresh_store: Callable[[str], tuple[str, str]]
) -> None:
    uri, artifacts = fresh_store("freshness-store")
    tracking = TrackingConfig(tracking_uri=uri, experiment=EXPERIMENT, artifact_location=artifacts)
    tracker = StudyTracker(tracking, "fresh")
    parent = tracker.ensure_parent_run()
    log_trial(tracker, parent, 0, 10, 0.1, 0.5, {"s1": (0.5, 0.5)}, tmp_path / "t0")
    csv_path = export_leaderboards(uri, EXPERIMENT, tmp_path / "out")[-2]
    assert csv_path.name == "leaderboard.csv"
    table, source = load_leaderboard(csv_path, uri, EXPERIMENT)
    assert len(table) == 1 and source.startswith(f"read from the CSV {csv_path}")
    # a run that finished after the export: the store is fresher
    os.utime(csv_path, (csv_path.stat().st_atime, csv_path.stat().st_mtime - 60))
    log_trial(tracker, parent, 1, 20, 0.1, 0.6, {"s1": (0.6, 0.6)}, tmp_path / "t1")
    table, source = load_leaderboard(csv_path, uri, EXPERIMENT)
    assert len(table) == 2 and "MLflow store" in source and "newer than" in source
    table, source = load_leaderboard(tmp_path / "missing.csv", uri, EXPERIMENT)
    assert len(table) == 2 and "no CSV" in source
    with pytest.raises(FileNotFoundError, match="neither"):
        load_leaderboard(tmp_path / "missing.csv", f"sqlite:///{tmp_path / 'none.db'}", EXPERIMENT)
    assert not (tmp_path / "none.db").exists()


def test_row_labels_name_the_trial_not_a_time_step() -> None:
    assert row_label(1, "timestep", 11) == "#1 timestep trial 11"
    assert row_label(2, "runs", float("nan")) == "#2 runs one-off"
    assert row_label(3, "runs", None) == "#3 runs one-off"
