"""MLflow tracking of studies and trials, against a real SQLite tracking store in a temp folder.

Most tests log small hand-made results (fake scores, a tiny hand-written dataset and predictions) so they
do not depend on the rest of the pipeline; one integration test runs the real pipeline when it imports.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import shutil
import socket
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState
from PIL import Image

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
    project_git_commit,
    resolve_tracking_uri,
)

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


METRICS = {"J&F-Mean": 0.6125, "J-Mean": 0.65, "J-Recall": 0.75, "J-Decay": 0.05,
           "F-Mean": 0.575, "F-Recall": 0.625, "F-Decay": 0.125}
TIMINGS = {"setup": 0.5, "extraction": 1.25, "propagation": 2.0, "evaluation": 0.25, "total": 4.0}
# alpha: objects (J, F) = (0.8, 0.6) and (0.4, 0.2) -> J&F = mean(0.7, 0.3) = 0.5; beta: (1.0, 0.9) -> 0.95
EXPECTED_JF = {"alpha": 0.5, "beta": 0.95}
LONG_OPTION = "x" * 7000


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
        SequenceOutcome(0, "alpha", 5, [1, 2], [object_scores("alpha", 1, [1.0, 0.8, 0.6], [0.6] * 3),
                                                object_scores("alpha", 2, [0.4] * 3, [0.2] * 3)],
                        {"extraction": 1.0, "propagation": 1.5}),
        SequenceOutcome(1, "beta", 3, [1], [object_scores("beta", 1, [1.0], [0.9])],
                        {"extraction": 0.25, "propagation": 0.5}),
    ]
    return RunResult(make_config(root, output), output, predictions, timestep=25, layer=1,
                     metrics=dict(METRICS), evaluation=None, sequences=outcomes, timings=dict(TIMINGS),
                     cache_stats=CacheStats(hits=3, misses=2))


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


def test_parent_run_is_created_once(logged: dict[str, object], tracking: TrackingConfig,
                                    client: MlflowClient) -> None:
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


def test_duplicate_parents_after_a_race_resolve_to_the_oldest(tracking: TrackingConfig,
                                                              client: MlflowClient) -> None:
    first = StudyTracker(tracking, "raced").ensure_parent_run()
    # what a second process that created its parent at the same moment would leave behind
    experiment_id = client.get_experiment_by_name("diffvos-test").experiment_id
    late = client.create_run(experiment_id, tags={"diffvos.study": "raced", "diffvos.role": "parent"})
    assert StudyTracker(tracking, "raced").ensure_parent_run() == first
    assert late.info.run_id != first


def test_parents_of_different_studies_are_distinct(logged: dict[str, object],
                                                    tracking: TrackingConfig) -> None:
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


def test_params_hold_flattened_settings_and_resolved_values(logged: dict[str, object],
                                                            client: MlflowClient) -> None:
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


def test_sequence_metric_is_stepped_by_sequence_index(logged: dict[str, object],
                                                       client: MlflowClient) -> None:
    history = client.get_metric_history(logged["trial"].run_id, "sequence_jf")
    assert sorted((m.step, round(m.value, 9)) for m in history) == [(0, EXPECTED_JF["alpha"]),
                                                                     (1, EXPECTED_JF["beta"])]
    # log_result does not log the per-sequence metric a second time
    assert [m.step for m in client.get_metric_history(logged["trial"].run_id, "jf/beta")] == [1]


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
    assert found == ["alpha/00000.png", "alpha/00002.png", "alpha/00004.png",
                     "beta/00000.png", "beta/00001.png", "beta/00002.png"]
    assert Image.open(overlays / "alpha" / "00002.png").size == (480, 240)
    beta = np.asarray(Image.open(overlays / "beta" / "00001.png").convert("RGB"))
    assert beta.shape == (48, 64, 3)
    # object 1 is DAVIS red (128, 0, 0) blended half and half with the grey frame
    assert tuple(beta[20, 20]) == (114, 50, 50)
    assert tuple(beta[0, 0]) == (FRAME_GREY,) * 3

    rows = list(csv.DictReader(io.StringIO(download_text(client, run_id, "per_sequence.csv", tmp_path))))
    assert [row["sequence"] for row in rows] == ["alpha", "beta"]
    assert float(rows[0]["J&F"]) == pytest.approx(0.5)
    assert float(rows[0]["J-Mean"]) == pytest.approx(0.6) and float(rows[0]["F-Mean"]) == pytest.approx(0.4)
    objects = list(csv.DictReader(io.StringIO(download_text(client, run_id, "per_object.csv", tmp_path))))
    assert [(row["sequence"], row["object"]) for row in objects] == [("alpha", "1"), ("alpha", "2"),
                                                                       ("beta", "1")]
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


def test_changed_setting_is_kept_and_reported_not_fatal(logged: dict[str, object], client: MlflowClient,
                                                        tmp_path: Path) -> None:
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


SPACE = {"backbone.timestep": IntDistribution(0, 100, step=10),
         "backbone.layer": CategoricalDistribution(["6", "up_ft2"])}


def make_study(outcomes: list[tuple[int, str, float | TrialState]]) -> optuna.Study:
    """An in-memory study whose trials have the given (timestep, layer, value or end state)."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for timestep, layer, value in outcomes:
        study.enqueue_trial({"backbone.timestep": timestep, "backbone.layer": layer})
        trial = study.ask(SPACE)
        if isinstance(value, TrialState):
            study.tell(trial, state=value)
        else:
            study.tell(trial, value)
    return study


def test_update_parent_logs_counts_best_value_and_plots(tracking: TrackingConfig, client: MlflowClient,
                                                        tmp_path: Path) -> None:
    study = make_study([(10, "6", 0.5), (20, "6", 0.7), (30, "up_ft2", 0.6), (20, "up_ft2", 0.65),
                        (40, "6", TrialState.FAIL), (50, "6", TrialState.PRUNED)])
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


def test_update_parent_survives_importance_failure(tracking: TrackingConfig, client: MlflowClient,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> dict[str, float]:
        raise RuntimeError("fANOVA exploded")

    monkeypatch.setattr(optuna.importance, "get_param_importances", broken)
    study = make_study([(10, "6", 0.5), (20, "6", 0.7)])
    tracker = StudyTracker(tracking, "importance-fails")
    parent = tracker.ensure_parent_run()
    with pytest.warns(UserWarning, match="fANOVA exploded"):
        tracker.update_parent(parent, study)
    names = sorted(a.path for a in client.list_artifacts(parent, "plots"))
    assert names == ["plots/jf_vs_timestep.png", "plots/optimization_history.png"]


def test_update_parent_without_complete_trials_logs_no_plots(tracking: TrackingConfig,
                                                             client: MlflowClient) -> None:
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
    config = RunConfig.from_dict({
        "dataset": {"root": str(root), "split": "val"},
        "backbone": {"name": "random-conv", "device": "cpu"},
        "input": {"short_side": 64},
        "cache": {"enabled": False},
        "output_dir": str(tmp_path / "run"),
        "progress": False,
    })
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
    history = client.get_metric_history(trial.run_id, "sequence_jf")
    assert sorted(m.step for m in history) == list(range(len(result.sequences)))
    artifacts = {a.path for a in client.list_artifacts(trial.run_id)}
    assert {"config.yaml", "predictions.zip", "overlays", "per_sequence.csv", "per_object.csv"} <= artifacts
    table = download_text(client, trial.run_id, "per_object.csv", tmp_path)
    objects = list(csv.DictReader(io.StringIO(table)))
    assert len(objects) == len(result.evaluation.objects)
    assert float(objects[0]["J-Mean"]) == pytest.approx(result.evaluation.objects[0].j_statistics.mean)
    overlays = client.list_artifacts(trial.run_id, "overlays")
    assert sorted(Path(a.path).name for a in overlays) == sorted(o.name for o in result.sequences)
