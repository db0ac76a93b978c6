"""MLflow tracking of studies and trials, against a real SQLite tracking store in a temp folder.

Most tests log small hand-made results (fake scores, a tiny hand-written dataset and predictions) so they
do not depend on the rest of the pipeline; one integration test runs the real pipeline when it imports.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import importlib.util
import io
import json
import re
import shutil
import socket
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState
from PIL import Image, ImageSequence

from harness.config import RunConfig
from harness.data.masks import DAVIS_PALETTE, write_mask
from harness.errors import ConfigError
from harness.evaluation import ObjectScores
from harness.features import CacheStats
from harness.pipeline import RunResult, SequenceOutcome
from harness.tracking import (
    METRIC_NAMES,
    StudyTracker,
    TrackingConfig,
    flatten_settings,
    overlay_image,
    plots,
    project_git_commit,
    resolve_tracking_uri,
    track_run,
)
from harness.tracking.artifacts import (
    FALSE_COLOUR,
    GIF_FRAME_MS,
    MISSED_COLOUR,
    error_overlay_image,
    gif_frame_indices,
    worst_sequences,
)
from harness.tracking.environment import describe_device

optuna.logging.set_verbosity(optuna.logging.WARNING)

# -- a tracking store per module (copied from the session template of conftest.fresh_store) ----------------


@pytest.fixture(scope="module")
def tracking(fresh_store: Callable[[str], tuple[str, str]]) -> TrackingConfig:
    uri, artifacts = fresh_store("tracking-store")
    return TrackingConfig(tracking_uri=uri, experiment="diffvos-test", artifact_location=artifacts)


@pytest.fixture(scope="module")
def client(tracking: TrackingConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.tracking_uri)


# -- hand-made results: the real result types, filled with made-up scores -------------------------------


def object_scores(sequence: str, object_id: int, j: list[float], f: list[float]) -> ObjectScores:
    frames = tuple(f"{i + 1:05d}" for i in range(len(j)))
    return ObjectScores(sequence=sequence, object_id=object_id, frames=frames, j=np.array(j), f=np.array(f))


FRAME_GREY = 100
#: sequence -> (frames, width, height)
SEQUENCES = {"alpha": (5, 600, 300), "beta": (3, 64, 48)}


def write_dataset_and_predictions(root: Path, predictions: Path) -> None:
    """A DAVIS-layout dataset of flat grey PNG frames, plus predictions with a rectangle per object."""
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(SEQUENCES) + "\n")
    for name, (frames, width, height) in SEQUENCES.items():
        frame_dir = root / "JPEGImages" / "480p" / name
        frame_dir.mkdir(parents=True)
        labels = np.zeros((height, width), dtype=np.uint8)
        labels[10:30, 10:40] = 1
        if name == "alpha":
            labels[100:200, 300:500] = 2
        for index in range(frames):
            grey = np.full((height, width, 3), FRAME_GREY, dtype=np.uint8)
            Image.fromarray(grey).save(frame_dir / f"{index:05d}.png")
            write_mask(predictions / name / f"{index:05d}.png", labels, DAVIS_PALETTE)
        write_mask(root / "Annotations" / "480p" / name / "00000.png", labels, DAVIS_PALETTE)


METRICS = {
    "J&F-Mean": 0.6125,
    "J-Mean": 0.65,
    "J-Recall": 0.75,
    "J-Decay": 0.05,
    "F-Mean": 0.575,
    "F-Recall": 0.625,
    "F-Decay": 0.125,
}
TIMINGS = {"setup": 0.5, "extraction": 1.25, "propagation": 2.0, "evaluation": 0.25, "total": 4.0}
# alpha: objects (J, F) = (0.8, 0.6) and (0.4, 0.2) -> J&F = mean(0.7, 0.3) = 0.5; beta: (1.0, 0.9) -> 0.95
EXPECTED_JF = {"alpha": 0.5, "beta": 0.95}
LONG_OPTION = "x" * 7000


#: correspondence diagnostics as the methods report them per sequence (SequenceOutcome.metrics);
#: text and flags are not metrics and must be left out
DIAGNOSTICS = {
    "alpha": {"corr_precision": 0.8, "corr_fg_to_bg": 0.1, "corr_bg_to_fg": 0.05, "note": "x", "flag": True},
    "beta": {"corr_precision": 0.6, "corr_fg_to_bg": float("nan")},
}


def make_config(root: Path, output: Path, **sections: dict[str, object]) -> RunConfig:
    settings: dict[str, object] = {
        "dataset": {"root": str(root), "sequences": list(SEQUENCES)},
        "backbone": {"timestep": 25, "device": "cpu", "options": {"note": LONG_OPTION}},
        "method": {"temperature": 0.1, "topk": 5},
        "output_dir": str(output),
    }
    return RunConfig.from_dict(settings | sections)


def make_result(base: Path) -> RunResult:
    root, output = base / "data", base / "run"
    predictions = output / "predictions"
    write_dataset_and_predictions(root, predictions)
    (output / "config.yaml").write_text("backbone:\n  name: random-conv\nresolved:\n  timestep: 25\n")
    outcomes = [
        # alpha: object 1 J = [1.0, 0.8, 0.6] -> mean 0.8, recall 1, decay mean(1.0, 0.8) - 0.6 = 0.3
        SequenceOutcome(
            0,
            "alpha",
            5,
            [1, 2],
            [
                object_scores("alpha", 1, [1.0, 0.8, 0.6], [0.6] * 3),
                object_scores("alpha", 2, [0.4] * 3, [0.2] * 3),
            ],
            {"extraction": 1.0, "propagation": 1.5},
            dict(DIAGNOSTICS["alpha"]),
        ),
        SequenceOutcome(
            1,
            "beta",
            3,
            [1],
            [object_scores("beta", 1, [1.0], [0.9])],
            {"extraction": 0.25, "propagation": 0.5},
            dict(DIAGNOSTICS["beta"]),
        ),
    ]
    return RunResult(
        make_config(root, output),
        output,
        predictions,
        timestep=25,
        layer=1,
        metrics=dict(METRICS),
        evaluation=None,
        sequences=outcomes,
        timings=dict(TIMINGS),
        cache_stats=CacheStats(hits=3, misses=2),
        ensemble_size=4,
    )


@pytest.fixture(scope="module")
def logged(tracking: TrackingConfig, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One study with a parent run and one fully logged trial."""
    result = make_result(tmp_path_factory.mktemp("result"))
    tracker = StudyTracker(tracking, "study-a")
    parent = tracker.ensure_parent_run("timestep sweep", {"n_trials": 3, "space": {"t": [0, 50]}})
    trial = tracker.start_trial(parent, 0, {"method.temperature": 0.1, "model": "adm"}, result.config)
    for outcome in result.sequences:
        trial.log_sequence(outcome)
    trial.log_result(result)
    trial.end()
    return {"tracker": tracker, "parent": parent, "trial": trial, "result": result}


def download_text(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_text()


def download_table(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> pd.DataFrame:
    """A table logged with ``log_table`` (MLflow's own ``load_table`` reads the global tracking URI)."""
    return pd.read_json(io.StringIO(download_text(client, run_id, path, tmp_path)), orient="split")


# -- configuration -----------------------------------------------------------------------------------


def test_resolve_tracking_uri_prefers_explicit_then_environment_then_sqlite_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    assert resolve_tracking_uri("") == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("postgresql://u@h/db") == "postgresql://u@h/db"
    assert resolve_tracking_uri(str(tmp_path / "runs.db")) == f"sqlite:///{tmp_path / 'runs.db'}"


def test_flatten_settings_uses_dotted_keys_and_mlflow_limits() -> None:
    flat = flatten_settings({"a": {"b": 1, "c": [1, "x"], "d": {}, "e": None}, "long": "y" * 7000, "f": 0.5})
    assert flat["a.b"] == "1"
    assert flat["a.c"] == '[1, "x"]'
    assert flat["a.d"] == "{}"
    assert flat["a.e"] == "None"
    assert flat["f"] == "0.5"
    assert len(flat["long"]) == 6000 and flat["long"].startswith("y" * 100)
    assert set(flat) == {"a.b", "a.c", "a.d", "a.e", "long", "f"}


def test_study_names_that_break_filters_are_refused(tracking: TrackingConfig) -> None:
    for bad in ("", "it's", "a/b", " padded"):
        with pytest.raises(ConfigError, match="study name"):
            StudyTracker(tracking, bad)


def test_project_git_commit_reads_head_or_none(tmp_path: Path) -> None:
    assert project_git_commit(tmp_path) is None
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    assert project_git_commit(tmp_path) is None  # a repository without commits
    (tmp_path / "f.txt").write_text("x")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = (tmp_path / ".git" / "refs" / "heads" / "main").read_text().strip()
    assert project_git_commit(tmp_path) == head


# -- parent and child runs -----------------------------------------------------------------------------


def test_parent_run_is_created_once(
    logged: dict[str, object], tracking: TrackingConfig, client: MlflowClient
) -> None:
    parent = logged["parent"]
    assert logged["tracker"].ensure_parent_run("timestep sweep") == parent
    # another process: a new tracker on the same store finds the same parent
    assert StudyTracker(tracking, "study-a").ensure_parent_run() == parent
    experiment = client.get_experiment_by_name("diffvos-test")
    parents = client.search_runs(
        [experiment.experiment_id], "tags.`diffvos.study` = 'study-a' and tags.`diffvos.role` = 'parent'"
    )
    assert [run.info.run_id for run in parents] == [parent]
    run = client.get_run(parent)
    assert run.data.tags["mlflow.note.content"] == "timestep sweep"
    assert run.data.params["n_trials"] == "3"
    assert run.data.params["space.t"] == "[0, 50]"


def test_duplicate_parents_after_a_race_resolve_to_the_oldest(
    tracking: TrackingConfig, client: MlflowClient
) -> None:
    first = StudyTracker(tracking, "raced").ensure_parent_run()
    # what a second process that created its parent at the same moment would leave behind
    experiment_id = client.get_experiment_by_name("diffvos-test").experiment_id
    late = client.create_run(experiment_id, tags={"diffvos.study": "raced", "diffvos.role": "parent"})
    assert StudyTracker(tracking, "raced").ensure_parent_run() == first
    assert late.info.run_id != first


def test_parents_of_different_studies_are_distinct(
    logged: dict[str, object], tracking: TrackingConfig
) -> None:
    other = StudyTracker(tracking, "study-b").ensure_parent_run()
    assert other != logged["parent"]


def test_trial_run_is_a_child_with_study_tags(logged: dict[str, object], client: MlflowClient) -> None:
    run = client.get_run(logged["trial"].run_id)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == logged["parent"]
    assert tags["diffvos.study"] == "study-a"
    assert tags["diffvos.trial"] == "0"
    assert tags["diffvos.role"] == "trial"
    assert run.info.status == "FINISHED"
    assert logged["tracker"].find_trial_run(0) == logged["trial"].run_id
    assert logged["tracker"].find_trial_run(99) is None


def test_environment_tags(logged: dict[str, object], client: MlflowClient) -> None:
    tags = client.get_run(logged["trial"].run_id).data.tags
    for package in ("torch", "diffusers", "optuna", "mlflow"):
        assert tags[f"diffvos.version.{package}"] == importlib.metadata.version(package)
    assert tags["diffvos.hostname"] == socket.gethostname()
    assert tags["diffvos.device"]
    commit = project_git_commit()
    assert tags.get("diffvos.git_commit") == commit


def test_params_hold_flattened_settings_and_resolved_values(
    logged: dict[str, object], client: MlflowClient
) -> None:
    params = client.get_run(logged["trial"].run_id).data.params
    assert params["method.temperature"] == "0.1"
    assert params["method.topk"] == "5"
    assert params["method.similarity"] == "cosine"  # a default of the real RunConfig
    assert params["backbone.name"] == "random-conv"
    assert params["backbone.timestep"] == "25"
    assert params["backbone.layer"] == "None"
    assert params["dataset.sequences"] == '["alpha", "beta"]'
    assert params["resolved.timestep"] == "25"
    assert params["resolved.layer"] == "1"
    # backbone.ensemble_size null means the backbone's default: the run logs which it was
    assert params["backbone.ensemble_size"] == "None" and params["resolved.ensemble_size"] == "4"
    assert params["model"] == "adm"  # a suggested param that is not a setting
    assert len(params["backbone.options.note"]) == 6000


def test_metrics_use_mlflow_safe_names(logged: dict[str, object], client: MlflowClient) -> None:
    metrics = client.get_run(logged["trial"].run_id).data.metrics
    assert METRIC_NAMES["J&F-Mean"] == "JF_mean"
    for davis_name, value in METRICS.items():
        assert metrics[METRIC_NAMES[davis_name]] == pytest.approx(value)
    assert not any("&" in name for name in metrics)
    for stage in ("extraction", "propagation", "evaluation", "total"):
        assert metrics[f"time_{stage}_s"] == pytest.approx(TIMINGS[stage])
    assert metrics["cache_hits"] == 3 and metrics["cache_misses"] == 2
    for name, jf in EXPECTED_JF.items():
        assert metrics[f"jf/{name}"] == pytest.approx(jf)


def test_per_frame_times_memory_and_diagnostics_are_metrics(
    logged: dict[str, object], client: MlflowClient
) -> None:
    metrics = client.get_run(logged["trial"].run_id).data.metrics
    frames = 5 + 3
    for stage in ("extraction", "propagation", "evaluation", "total"):
        assert metrics[f"time_{stage}_per_frame_ms"] == pytest.approx(1000 * TIMINGS[stage] / frames)
    assert "time_setup_per_frame_ms" not in metrics  # loading the model is no per-frame cost
    assert metrics["peak_rss_mb"] > 0
    # no CUDA on the test machine: no GPU figure rather than a made-up zero
    assert ("peak_gpu_memory_mb" in metrics) == torch.cuda.is_available()
    # diagnostics: the mean over the sequences that report a finite value
    assert metrics["corr_precision"] == pytest.approx(0.7)
    assert metrics["corr_fg_to_bg"] == pytest.approx(0.1)
    assert metrics["corr_bg_to_fg"] == pytest.approx(0.05)
    assert "note" not in metrics and "flag" not in metrics


def test_diagnostic_shares_are_averaged_even_when_the_run_sums_them(
    tracking: TrackingConfig, client: MlflowClient, tmp_path: Path
) -> None:
    """The pipeline adds every per-sequence method metric up into the run's metrics: right for counts
    (the oracle's unfiltered queries), wrong for the correspondence shares."""
    result = make_result(tmp_path)
    summed = {"corr_precision": 0.8 + 0.6, "filter_queries": 10.0}
    for outcome, queries in zip(result.sequences, (4.0, 6.0), strict=True):
        outcome.metrics["filter_queries"] = queries
    result = dataclasses.replace(result, metrics=METRICS | summed)
    tracker = StudyTracker(tracking, "summed-diagnostics")
    trial = tracker.start_trial(tracker.ensure_parent_run(), 0, {}, result.config)
    trial.log_result(result)
    trial.end()
    metrics = client.get_run(trial.run_id).data.metrics
    assert metrics["corr_precision"] == pytest.approx(0.7)
    assert metrics["filter_queries"] == 10.0


def test_device_tag_names_the_kind_and_the_model(logged: dict[str, object], client: MlflowClient) -> None:
    tags = client.get_run(logged["trial"].run_id).data.tags
    expected = describe_device("cpu")
    assert tags["diffvos.device"] == str(expected)
    assert tags["diffvos.device"].startswith("cpu (") and tags["diffvos.device_kind"] == "cpu"


def test_describe_device_names_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: f"Fake GPU {index}")
    assert str(describe_device(None)) == "cuda:0 (Fake GPU 0)"
    assert str(describe_device("cuda:1")) == "cuda:1 (Fake GPU 1)"
    assert describe_device("cpu").kind == "cpu"


def test_experiment_opens_in_the_model_training_view(
    logged: dict[str, object], client: MlflowClient, tracking: TrackingConfig
) -> None:
    experiment = client.get_experiment(logged["tracker"].experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made without the tag (older harness, another tool) gets it on first use
    bare = client.create_experiment("made-elsewhere")
    StudyTracker(TrackingConfig(tracking.tracking_uri, "made-elsewhere"), "s").experiment_id  # noqa: B018
    assert client.get_experiment(bare).tags["mlflow.experimentKind"] == "custom_model_development"


def test_per_sequence_scores_are_a_table_artifact_not_a_stepped_metric(
    logged: dict[str, object], client: MlflowClient, tmp_path: Path
) -> None:
    run_id = logged["trial"].run_id
    assert client.get_metric_history(run_id, "sequence_jf") == []
    table = download_table(client, run_id, "per_sequence.json", tmp_path)
    assert table["sequence"].tolist() == ["alpha", "beta"]
    assert table["J&F"].tolist() == pytest.approx([EXPECTED_JF["alpha"], EXPECTED_JF["beta"]])
    assert table["frames"].tolist() == [5, 3] and table["objects"].tolist() == [2, 1]
    assert table["seconds"].tolist() == pytest.approx([2.5, 0.75])
    assert table["corr_precision"].tolist() == pytest.approx([0.8, 0.6])
    assert table["corr_bg_to_fg"][0] == pytest.approx(0.05) and pd.isna(table["corr_bg_to_fg"][1])
    # the UI lists it as a table (MLflow's logged-artifacts tag)
    assert '"type": "table"' in client.get_run(run_id).data.tags["mlflow.loggedArtifacts"]
    # log_result does not log the per-sequence metric a second time
    assert [m.step for m in client.get_metric_history(run_id, "jf/beta")] == [1]


def test_artifacts(logged: dict[str, object], client: MlflowClient, tmp_path: Path) -> None:
    run_id = logged["trial"].run_id
    result: RunResult = logged["result"]
    config_text = (result.output_dir / "config.yaml").read_text()
    assert download_text(client, run_id, "config.yaml", tmp_path) == config_text

    archive_path = Path(client.download_artifacts(run_id, "predictions.zip", str(tmp_path)))
    predictions = result.predictions_dir
    pngs = sorted(p.relative_to(predictions).as_posix() for p in predictions.rglob("*.png"))
    with zipfile.ZipFile(archive_path) as archive:
        assert sorted(archive.namelist()) == pngs
        assert archive.read("beta/00001.png") == (result.predictions_dir / "beta" / "00001.png").read_bytes()

    overlays = Path(client.download_artifacts(run_id, "overlays", str(tmp_path)))
    found = sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*.png"))
    assert found == [
        "alpha/00000.png",
        "alpha/00002.png",
        "alpha/00004.png",
        "beta/00000.png",
        "beta/00001.png",
        "beta/00002.png",
    ]
    assert Image.open(overlays / "alpha" / "00002.png").size == (480, 240)
    beta = np.asarray(Image.open(overlays / "beta" / "00001.png").convert("RGB"))
    assert beta.shape == (48, 64, 3)
    # object 1 is DAVIS red (128, 0, 0) blended half and half with the grey frame
    assert tuple(beta[20, 20]) == (114, 50, 50)
    assert tuple(beta[0, 0]) == (FRAME_GREY,) * 3

    rows = list(csv.DictReader(io.StringIO(download_text(client, run_id, "per_sequence.csv", tmp_path))))
    assert [row["sequence"] for row in rows] == ["alpha", "beta"]
    assert float(rows[0]["corr_precision"]) == pytest.approx(0.8) and rows[1]["corr_bg_to_fg"] == ""
    assert "note" not in rows[0]

    gifs = Path(client.download_artifacts(run_id, "worst_sequences", str(tmp_path)))
    assert sorted(p.name for p in gifs.iterdir()) == ["01-alpha.gif", "02-beta.gif"]  # alpha 0.5 < beta 0.95
    with Image.open(gifs / "01-alpha.gif") as gif:
        # the 5 frames are identical here, so Pillow stores one frame that lasts as long as the five
        shown_ms = sum(frame.info["duration"] for frame in ImageSequence.Iterator(gif))
        assert shown_ms == 5 * GIF_FRAME_MS and gif.size == (320, 160)
    assert float(rows[0]["J&F"]) == pytest.approx(0.5)
    assert float(rows[0]["J-Mean"]) == pytest.approx(0.6) and float(rows[0]["F-Mean"]) == pytest.approx(0.4)
    objects = list(csv.DictReader(io.StringIO(download_text(client, run_id, "per_object.csv", tmp_path))))
    assert [(row["sequence"], row["object"]) for row in objects] == [
        ("alpha", "1"),
        ("alpha", "2"),
        ("beta", "1"),
    ]
    first, second = objects[0], objects[1]
    assert float(first["J-Mean"]) == pytest.approx(0.8) and float(first["J-Decay"]) == pytest.approx(0.3)
    assert float(first["J-Recall"]) == 1.0 and first["scored_frames"] == "3"
    assert float(second["J-Mean"]) == pytest.approx(0.4) and float(second["J-Recall"]) == 0.0
    assert float(second["F-Mean"]) == pytest.approx(0.2) and float(second["J&F"]) == pytest.approx(0.3)


def test_overlay_image_blends_and_downscales() -> None:
    frame = np.full((10, 1000, 3), 200, dtype=np.uint8)
    labels = np.zeros((10, 1000), dtype=np.uint8)
    labels[:, :500] = 2  # DAVIS colour 2 = (0, 128, 0)
    labels[:, 500:520] = 255  # void is not an object
    image = overlay_image(frame, labels, DAVIS_PALETTE, max_width=100, alpha=0.25)
    assert image.size == (100, 1)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 10]) == (150, 182, 150)  # 0.75 * 200 + 0.25 * (0, 128, 0)
    assert tuple(pixels[0, 90]) == (200, 200, 200)


def test_error_overlay_colours_missed_and_false_pixels() -> None:
    frame = np.full((2, 4, 3), 100, dtype=np.uint8)
    truth = np.array([[1, 1, 0, 255], [2, 0, 0, 0]], dtype=np.uint8)
    predicted = np.array([[1, 0, 1, 1], [1, 0, 0, 0]], dtype=np.uint8)
    pixels = np.asarray(error_overlay_image(frame, predicted, truth, DAVIS_PALETTE, alpha=0.5))
    correct = tuple(pixels[0, 0])
    assert correct == (114, 50, 50)  # object 1 in DAVIS red, half and half
    missed = np.array(MISSED_COLOUR) * 0.75 + 100 * 0.25
    # object 1 predicted as background
    assert tuple(pixels[0, 1]) == tuple(np.floor(missed + 0.5).astype(int))
    false = np.array(FALSE_COLOUR) * 0.75 + np.array([114, 50, 50]) * 0.25
    assert tuple(pixels[0, 2]) == tuple(np.floor(false + 0.5).astype(int))  # background labelled 1
    assert tuple(pixels[1, 0]) == tuple(pixels[0, 2])  # object 2 labelled 1: a false label too
    assert tuple(pixels[0, 3]) == correct  # void in the ground truth: no error
    assert tuple(pixels[1, 1]) == (100, 100, 100)
    # without ground truth: the predicted masks only
    plain = np.asarray(error_overlay_image(frame, predicted, None, DAVIS_PALETTE, alpha=0.5))
    assert tuple(plain[0, 2]) == correct and tuple(plain[0, 1]) == (100, 100, 100)


def test_gif_frames_are_evenly_spaced_and_worst_sequences_come_first() -> None:
    assert gif_frame_indices(5, 40) == [0, 1, 2, 3, 4]
    picked = gif_frame_indices(100, 5)
    assert picked == [0, 25, 50, 74, 99]
    outcomes = [
        SequenceOutcome(i, name, 3, [1], [object_scores(name, 1, [jf], [jf])], {})
        for i, (name, jf) in enumerate([("a", 0.9), ("b", 0.2), ("c", 0.5), ("d", 0.2)])
    ]
    assert worst_sequences(outcomes, 3) == ["b", "d", "c"]
    unscored = [SequenceOutcome(i, name, 3, [1], None, {}) for i, name in enumerate("xyz")]
    assert worst_sequences(unscored, 2) == ["x", "y"]


# -- ending runs ---------------------------------------------------------------------------------------


def test_end_statuses_and_error_text(logged: dict[str, object], client: MlflowClient, tmp_path: Path) -> None:
    tracker: StudyTracker = logged["tracker"]
    config = logged["result"].config
    failed = tracker.start_trial(logged["parent"], 1, {}, config)
    failed.end("FAILED", error="ValueError: bad temperature")
    failed.end("FINISHED")  # a second end (e.g. in a finally) changes nothing
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["diffvos.error"] == "ValueError: bad temperature"
    assert download_text(client, failed.run_id, "error.txt", tmp_path) == "ValueError: bad temperature"

    killed = tracker.start_trial(logged["parent"], 2, {}, config)
    killed.set_tags({"pruned": "true"})
    killed.end("KILLED")
    run = client.get_run(killed.run_id)
    assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"
    assert "diffvos.error" not in run.data.tags

    with pytest.raises(ValueError, match="status"):
        killed.end("DONE")


def test_context_manager_fails_the_run_on_exception(logged: dict[str, object], client: MlflowClient) -> None:
    tracker: StudyTracker = logged["tracker"]
    config = logged["result"].config
    with pytest.raises(RuntimeError), tracker.start_trial(logged["parent"], 3, {}, config) as run:
        raise RuntimeError("out of memory")
    info = client.get_run(run.run_id)
    assert info.info.status == "FAILED"
    assert "out of memory" in info.data.tags["diffvos.error"]

    with pytest.raises(optuna.TrialPruned), tracker.start_trial(logged["parent"], 5, {}, config) as pruned:
        raise optuna.TrialPruned()
    info = client.get_run(pruned.run_id)
    assert info.info.status == "KILLED" and info.data.tags["pruned"] == "true"
    assert "diffvos.error" not in info.data.tags


def test_changed_setting_is_kept_and_reported_not_fatal(
    logged: dict[str, object], client: MlflowClient, tmp_path: Path
) -> None:
    tracker: StudyTracker = logged["tracker"]
    result: RunResult = logged["result"]
    started = result.config.with_overrides({"output_dir": "somewhere/else"})
    trial = tracker.start_trial(logged["parent"], 4, {}, started)
    with pytest.warns(UserWarning, match="output_dir"):
        trial.log_result(result)
    trial.end()
    run = client.get_run(trial.run_id)
    assert run.data.params["output_dir"] == "somewhere/else"
    assert run.data.tags["diffvos.param_conflict.output_dir"] == str(result.output_dir)


def test_close_stale_trials_closes_only_running_runs_of_failed_trials(
    tracking: TrackingConfig, client: MlflowClient, logged: dict[str, object]
) -> None:
    tracker = StudyTracker(tracking, "stale")
    parent = tracker.ensure_parent_run()
    config = logged["result"].config
    runs = {number: tracker.start_trial(parent, number, {}, config) for number in range(4)}
    runs[2].end("FINISHED")
    closed = tracker.close_stale_trials({0: "FAIL", 1: "RUNNING", 2: "FAIL", 3: "COMPLETE"})
    assert closed == 1
    status = {n: client.get_run(r.run_id).info.status for n, r in runs.items()}
    assert status == {0: "KILLED", 1: "RUNNING", 2: "FINISHED", 3: "RUNNING"}
    # runs of other studies with the same trial number are untouched
    assert client.get_run(logged["trial"].run_id).info.status == "FINISHED"
    assert tracker.close_stale_trials({0: "FAIL"}) == 0
    assert tracker.close_stale_trials({1: TrialState.FAIL, 3: TrialState.FAIL}) == 2
    assert {client.get_run(runs[n].run_id).info.status for n in (1, 3)} == {"KILLED"}


# -- the parent's summary ------------------------------------------------------------------------------


SPACE = {
    "backbone.timestep": IntDistribution(0, 100, step=10),
    "backbone.layer": CategoricalDistribution(["6", "up_ft2"]),
}


#: per-sequence scores a trial reports: its value plus these offsets (two sequences)
SEQUENCE_OFFSETS = (-0.1, 0.1)


def make_study(outcomes: list[tuple[int, str, float | TrialState]]) -> optuna.Study:
    """An in-memory study whose trials have the given (timestep, layer, value or end state); complete
    trials report per-sequence scores value -0.1 and +0.1 as the objective does."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for timestep, layer, value in outcomes:
        study.enqueue_trial({"backbone.timestep": timestep, "backbone.layer": layer})
        trial = study.ask(SPACE)
        if isinstance(value, TrialState):
            study.tell(trial, state=value)
        else:
            for step, offset in enumerate(SEQUENCE_OFFSETS):
                trial.report(value + offset, step)
            study.tell(trial, value)
    return study


def line_segments(ax: object, label: str) -> list[np.ndarray]:
    """The segments of the line collection (``vlines``) with ``label``."""
    collections = [c for c in ax.collections if c.get_label() == label]
    assert len(collections) == 1, [c.get_label() for c in ax.collections]
    return collections[0].get_segments()


def test_setting_plot_has_per_sequence_spread_and_integer_ticks() -> None:
    study = make_study([(10, "6", 0.5), (20, "6", 0.7), (20, "up_ft2", 0.6), (30, "up_ft2", 0.65)])
    figures = plots.study_figures(study)
    ax = figures["jf_vs_timestep.png"].axes[0]
    assert ax.get_xticks().tolist() == [10, 20, 30]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["10", "20", "30"]
    # t 20: trials 0.7 and 0.6 -> sequences 0.6, 0.8, 0.5, 0.7: range 0.5-0.8, middle half 0.575-0.725
    ranges = {round(seg[0][0]): (seg[0][1], seg[1][1]) for seg in line_segments(ax, "sequences: range")}
    assert ranges[20] == pytest.approx((0.5, 0.8)) and ranges[10] == pytest.approx((0.4, 0.6))
    middle = {round(seg[0][0]): (seg[0][1], seg[1][1]) for seg in line_segments(ax, "sequences: middle half")}
    assert middle[20] == pytest.approx((0.575, 0.725))
    means = [line for line in ax.get_lines() if line.get_label() == "mean"][0]
    assert means.get_ydata().tolist() == pytest.approx([0.5, 0.65, 0.65])
    layer_ax = figures["jf_vs_layer.png"].axes[0]
    assert [label.get_text() for label in layer_ax.get_xticklabels()] == ["6", "up_ft2"]
    # values too many and too close to label each (t 0..100 by 10, plus 25 and 51): integer ticks only
    dense = optuna.create_study(direction="maximize")
    for t in [*range(0, 101, 10), 25]:
        dense.enqueue_trial({"backbone.timestep": t})
        dense.tell(dense.ask({"backbone.timestep": IntDistribution(0, 100)}), 0.5 + t / 1000)
    dense_ax = plots.study_figures(dense)["jf_vs_timestep.png"].axes[0]
    ticks = dense_ax.get_xticks()
    assert len(ticks) < 12 and all(float(tick).is_integer() for tick in ticks)


def test_published_setting_is_marked_when_the_study_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import published

    system = published.PublishedSystem(
        name="paper-adm",
        description="",
        jf=76.8,
        source="test",
        weights=("adm",),
        overrides={"backbone.name": "adm", "backbone.timestep": 30, "backbone.layer": 6},
    )
    unnumbered = dataclasses.replace(
        system, name="released-t60", jf=None, overrides={"backbone.timestep": 60}
    )
    monkeypatch.setattr(published, "PUBLISHED", {"paper-adm": system, "released-t60": unnumbered})
    study = optuna.create_study(direction="maximize")
    for timestep, value in ((0, 0.5), (30, 0.7), (60, 0.6)):
        study.enqueue_trial({"backbone.timestep": timestep})
        trial = study.ask({"backbone.timestep": SPACE["backbone.timestep"]})
        study.tell(trial, value)

    def marks(fixed: dict[str, object]) -> list[tuple[float, str]]:
        ax = plots.study_figures(study, fixed=fixed)["jf_vs_timestep.png"].axes[0]
        return [
            (line.get_xdata()[0], line.get_label())
            for line in ax.get_lines()
            if line.get_label().startswith("published")
        ]

    # the study's fixed settings hold layer 6 as text, as MLflow params do
    assert marks({"backbone.name": "adm", "backbone.layer": "6"}) == [
        (30, "published: paper-adm (76.8 J&F)"),
        (60, "published: released-t60"),  # a released setting without a published number
    ]
    assert marks({"backbone.name": "sd2.1"}) == [(60, "published: released-t60")]
    assert marks({"backbone.name": "adm", "backbone.layer": 9}) == [(60, "published: released-t60")]


def test_confounded_settings_get_a_marginal_plot_not_importance() -> None:
    # every t 10 trial used layer 6 and every t 30 trial layer up_ft2: their effects cannot be separated
    study = make_study([(10, "6", 0.5), (10, "6", 0.55), (30, "up_ft2", 0.7), (30, "up_ft2", 0.65)])
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert plots.confounded_pairs(complete, ["backbone.timestep", "backbone.layer"]) == [
        ("backbone.timestep", "backbone.layer")
    ]
    figures = plots.study_figures(study)
    assert "param_importance.png" not in figures
    ax = figures["marginal_effects.png"].axes[0]
    assert "not adjusted" in ax.get_title()
    assert [bar.get_width() for bar in ax.patches] == pytest.approx([0.15, 0.15])
    # a continuous axis whose values never repeat confounds nothing by itself
    crossed = make_study([(10, "6", 0.5), (20, "6", 0.55), (30, "up_ft2", 0.7), (40, "up_ft2", 0.65)])
    assert (
        plots.confounded_pairs(
            crossed.get_trials(states=(TrialState.COMPLETE,)), ["backbone.timestep", "backbone.layer"]
        )
        == []
    )


def test_update_parent_passes_the_study_fixed_settings_to_the_plots(
    tracking: TrackingConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []

    def record(study: optuna.Study, fixed: dict[str, object] | None = None) -> dict[str, object]:
        seen.append(fixed)
        return {}

    monkeypatch.setattr(plots, "study_figures", record)
    tracker = StudyTracker(tracking, "fixed-settings")
    parent = tracker.ensure_parent_run(params={"fixed": {"backbone.name": "adm", "backbone.layer": 6}})
    tracker.update_parent(parent, make_study([(10, "6", 0.5)]))
    assert seen == [{"backbone.name": "adm", "backbone.layer": 6}]


def test_update_parent_logs_counts_best_value_and_plots(
    tracking: TrackingConfig, client: MlflowClient, tmp_path: Path
) -> None:
    study = make_study(
        [
            (10, "6", 0.5),
            (20, "6", 0.7),
            (30, "up_ft2", 0.6),
            (20, "up_ft2", 0.65),
            (40, "6", TrialState.FAIL),
            (50, "6", TrialState.PRUNED),
        ]
    )
    tracker = StudyTracker(tracking, "plots")
    parent = tracker.ensure_parent_run()
    running = study.ask(SPACE)
    tracker.update_parent(parent, study)
    assert client.get_run(parent).info.status == "RUNNING"  # a trial is still running
    study.tell(running, 0.1)
    tracker.update_parent(parent, study)

    run = client.get_run(parent)
    metrics = run.data.metrics
    counts = (metrics["n_complete"], metrics["n_failed"], metrics["n_pruned"], metrics["n_running"])
    assert counts == (5, 1, 1, 0)
    assert metrics["best_value"] == pytest.approx(0.7)
    assert metrics["best_trial"] == 1
    assert run.data.tags["best.backbone.timestep"] == "20"
    assert run.info.status == "FINISHED"
    names = sorted(a.path for a in client.list_artifacts(parent, "plots"))
    expected = ["plots/jf_vs_layer.png", "plots/jf_vs_timestep.png", "plots/optimization_history.png"]
    if importlib.util.find_spec("sklearn") is not None:  # Optuna's fANOVA importance needs scikit-learn
        expected.append("plots/param_importance.png")
    assert names == expected
    image = Image.open(client.download_artifacts(parent, "plots/jf_vs_timestep.png", str(tmp_path)))
    assert image.width > 100 and image.height > 100
    assert tracker.ensure_parent_run() == parent
    assert client.get_run(parent).info.status == "RUNNING"  # a resumed sweep reopens its parent


def test_update_parent_survives_importance_failure(
    tracking: TrackingConfig, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, float]:
        raise RuntimeError("fANOVA exploded")

    monkeypatch.setattr(optuna.importance, "get_param_importances", broken)
    study = make_study([(10, "6", 0.5), (20, "6", 0.7), (10, "up_ft2", 0.4), (20, "up_ft2", 0.6)])
    tracker = StudyTracker(tracking, "importance-fails")
    parent = tracker.ensure_parent_run()
    with pytest.warns(UserWarning, match="fANOVA exploded"):
        tracker.update_parent(parent, study)
    names = sorted(a.path for a in client.list_artifacts(parent, "plots"))
    assert names == ["plots/jf_vs_layer.png", "plots/jf_vs_timestep.png", "plots/optimization_history.png"]


def test_update_parent_without_complete_trials_logs_no_plots(
    tracking: TrackingConfig, client: MlflowClient
) -> None:
    study = make_study([(10, "6", TrialState.FAIL)])
    tracker = StudyTracker(tracking, "all-failed")
    parent = tracker.ensure_parent_run()
    tracker.update_parent(parent, study)
    run = client.get_run(parent)
    assert run.data.metrics["n_failed"] == 1 and "best_value" not in run.data.metrics
    assert client.list_artifacts(parent, "plots") == []


# -- the real pipeline ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_pipeline_run_is_tracked(tracking: TrackingConfig, client: MlflowClient, tmp_path: Path) -> None:
    from harness.data.synth import make_synthetic_dataset
    from harness.pipeline import run

    root = make_synthetic_dataset(tmp_path / "data")
    config = RunConfig.from_dict(
        {
            "dataset": {"root": str(root), "split": "val"},
            "backbone": {"name": "random-conv", "device": "cpu"},
            "input": {"short_side": 64},
            "cache": {"enabled": False},
            "output_dir": str(tmp_path / "run"),
            "progress": False,
        }
    )
    tracker = StudyTracker(tracking, "integration")
    parent = tracker.ensure_parent_run()
    trial = tracker.start_trial(parent, 0, {}, config)
    try:
        result = run(config, on_sequence=trial.log_sequence)
        trial.log_result(result)
    finally:
        trial.end()
    logged = client.get_run(trial.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["JF_mean"] == pytest.approx(result.metrics["J&F-Mean"])
    assert logged.data.params["resolved.layer"] == str(result.layer)
    assert logged.data.params["resolved.ensemble_size"] == "1"  # random-conv's default, config null
    table = download_table(client, trial.run_id, "per_sequence.json", tmp_path)
    assert table["sequence"].tolist() == [o.name for o in result.sequences]
    artifacts = {a.path for a in client.list_artifacts(trial.run_id)}
    assert {"config.yaml", "predictions.zip", "overlays", "per_sequence.csv", "per_object.csv"} <= artifacts
    table = download_text(client, trial.run_id, "per_object.csv", tmp_path)
    objects = list(csv.DictReader(io.StringIO(table)))
    assert len(objects) == len(result.evaluation.objects)
    assert float(objects[0]["J-Mean"]) == pytest.approx(result.evaluation.objects[0].j_statistics.mean)
    overlays = client.list_artifacts(trial.run_id, "overlays")
    assert sorted(Path(a.path).name for a in overlays) == sorted(o.name for o in result.sequences)


# -- one-off runs: harness run --track / --overlays --------------------------------------------------------


def cli_args(result: RunResult, tracking: TrackingConfig, *extra: str) -> list[str]:
    """``harness run`` arguments that give the same settings as ``result.config``."""
    config = result.config
    return [
        "run",
        "--quiet",
        "--set",
        f"dataset.root={config.dataset.root}",
        "--set",
        f"dataset.sequences={json.dumps(list(config.dataset.sequences))}",
        "--set",
        f"backbone.timestep={config.backbone.timestep}",
        "--set",
        f"output_dir={config.output_dir}",
        "--tracking-uri",
        tracking.tracking_uri,
        "--experiment",
        tracking.experiment,
        *extra,
    ]


def test_harness_run_track_logs_like_a_trial(
    tracking: TrackingConfig,
    client: MlflowClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import harness.pipeline
    from harness.cli import main
    from harness.tracking.leaderboard import build_leaderboard

    template = make_result(tmp_path)
    template = dataclasses.replace(template, config=make_config(tmp_path / "data", tmp_path / "run"))
    given: list[RunConfig] = []

    def fake_run(config: RunConfig, **kwargs: object) -> RunResult:
        given.append(config)
        kwargs["on_sequence"](template.sequences[0])  # type: ignore[operator]
        return dataclasses.replace(template, config=config)

    monkeypatch.setattr(harness.pipeline, "run", fake_run)
    assert main(cli_args(template, tracking, "--track", "--study", "one-offs", "--overlays", "1")) == 0
    printed = capsys.readouterr().out
    run_id = re.search(r"MLflow run (\w+) \(experiment diffvos-test, study one-offs\)", printed).group(1)
    assert given[0].backbone.timestep == 25 and given[0].dataset.sequences == ["alpha", "beta"]

    # the same result logged as a sweep trial
    tracker = StudyTracker(tracking, "one-offs-as-trials")
    trial = tracker.start_trial(tracker.ensure_parent_run(), 0, {}, given[0])
    trial.log_sequence(template.sequences[0])
    trial.log_result(dataclasses.replace(template, config=given[0]), worst_sequences=1)
    trial.end()

    one_off, as_trial = client.get_run(run_id), client.get_run(trial.run_id)
    assert one_off.info.status == "FINISHED"
    assert one_off.data.params == as_trial.data.params
    assert set(one_off.data.metrics) == set(as_trial.data.metrics)
    assert one_off.data.metrics["JF_mean"] == as_trial.data.metrics["JF_mean"]

    def artifacts(run: str) -> set[str]:
        found, folders = set(), [None]
        while folders:
            for item in client.list_artifacts(run, folders.pop()):
                (folders.append(item.path) if item.is_dir else found.add(item.path))
        return found

    assert artifacts(run_id) == artifacts(trial.run_id)
    assert "worst_sequences/01-alpha.gif" in artifacts(run_id)
    tags = one_off.data.tags
    assert (
        tags["diffvos.role"] == "run" and tags["diffvos.study"] == "one-offs" and "diffvos.trial" not in tags
    )
    parent = client.get_run(tags["mlflow.parentRunId"])
    assert parent.data.tags["diffvos.role"] == "parent" and parent.info.status == "FINISHED"
    # it sits on the leaderboard beside trials, with no trial number
    table = build_leaderboard(tracking.tracking_uri, tracking.experiment, "one-offs")
    assert table["run_id"].tolist() == [run_id] and pd.isna(table["trial"][0])
    # --overlays also wrote the worst sequence's GIF next to the predictions
    assert sorted(p.name for p in (tmp_path / "run" / "overlays").iterdir()) == ["01-alpha.gif"]


def test_track_run_records_a_failed_run(
    tracking: TrackingConfig, client: MlflowClient, tmp_path: Path
) -> None:
    def broken(config: RunConfig, **kwargs: object) -> RunResult:
        raise RuntimeError("CUDA out of memory")

    config = make_config(tmp_path / "data", tmp_path / "run")
    with pytest.raises(RuntimeError, match="out of memory"):
        track_run(
            config, tracking, study="failing-one-offs", runner=broken, tags={"diffvos.system": "paper-adm"}
        )
    experiment = client.get_experiment_by_name(tracking.experiment).experiment_id
    [run] = client.search_runs(
        [experiment], "tags.`diffvos.study` = 'failing-one-offs' and tags.`diffvos.role` = 'run'"
    )
    assert run.info.status == "FAILED" and "out of memory" in run.data.tags["diffvos.error"]
    assert run.data.tags["diffvos.system"] == "paper-adm"


@pytest.mark.slow
def test_harness_run_track_with_the_real_pipeline(
    tracking: TrackingConfig,
    client: MlflowClient,
    synth_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from harness.cli import main

    args = [
        "run",
        "--quiet",
        "--track",
        "--tracking-uri",
        tracking.tracking_uri,
        "--experiment",
        tracking.experiment,
        "--set",
        f"dataset.root={synth_root}",
        "--set",
        "input.short_side=64",
        "--set",
        "cache.enabled=false",
        "--set",
        f"output_dir={tmp_path / 'run'}",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    run_id = re.search(r"MLflow run (\w+)", printed).group(1)
    run = client.get_run(run_id)
    jf = float(re.search(r"J&F-Mean (\S+)", printed).group(1))
    assert run.info.status == "FINISHED" and run.data.metrics["JF_mean"] == pytest.approx(jf, abs=1e-4)
    assert run.data.tags["diffvos.study"] == "runs"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"per_sequence.json", "per_sequence.csv", "predictions.zip", "worst_sequences"} <= names


def test_peak_gpu_memory_covers_the_run_since_it_started(
    tracking: TrackingConfig, client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA faked: the run resets the peak counters of every GPU when it starts and logs their sum."""
    peaks = {0: 7 * 1024**2, 1: 5 * 1024**2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda index: peaks.update({index: 0}))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: peaks[index])
    tracker = StudyTracker(tracking, "gpu-memory")
    parent = tracker.ensure_parent_run()
    logged = {}
    for device in ("cuda", "cpu"):
        result = make_result(tmp_path / device)
        result = dataclasses.replace(result, config=result.config.with_overrides({"backbone.device": device}))
        trial = tracker.start_trial(parent, len(logged), {}, result.config)
        assert peaks == {0: 0, 1: 0}  # reset when the run started
        peaks.update({0: 3 * 1024**2, 1: 1024**2})  # what the run itself allocated at most
        trial.log_result(result)
        trial.end()
        logged[device] = client.get_run(trial.run_id).data
    assert logged["cuda"].metrics["peak_gpu_memory_mb"] == pytest.approx(4.0)
    assert logged["cuda"].tags["diffvos.device"] == "cuda:0 (Fake GPU)"
    # a run the config keeps on the CPU gets no GPU figure, even on a machine with GPUs
    assert "peak_gpu_memory_mb" not in logged["cpu"].metrics
    assert logged["cpu"].tags["diffvos.device"].startswith("cpu (")
