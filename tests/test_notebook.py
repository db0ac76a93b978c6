"""The analysis notebook runs on a leaderboard exported from a tracking store filled through the tracker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from harness.config import RunConfig
from harness.evaluation import ObjectScores
from harness.pipeline import RunResult, SequenceOutcome
from harness.tracking import StudyTracker, TrackingConfig
from harness.tracking.leaderboard import export_leaderboards

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

# the fake results below have no dataset on disk, so the tracker warns that it cannot draw overlays
pytestmark = pytest.mark.filterwarnings("ignore:run .* no overlay images")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"
EXPERIMENT = "diffvos-notebook"


#: study -> list of (timestep, layer, temperature)
STUDIES = {
    "timestep": [(0, 6, 0.2), (25, 6, 0.2), (50, 6, 0.2), (100, 6, 0.2)],
    "affinity": [(30, 6, 0.05), (30, 6, 0.1), (30, "up_ft2", 0.2)],
}


@pytest.fixture(scope="module")
def leaderboard_csv(
    tmp_path_factory: pytest.TempPathFactory, fresh_store: Callable[[str], tuple[str, str]]
) -> tuple[Path, str]:
    """The exported leaderboard CSV and the tracking store it came from (the CSV is the fresher)."""
    uri, artifacts = fresh_store("notebook-store")
    tracking = TrackingConfig(tracking_uri=uri, experiment=EXPERIMENT, artifact_location=artifacts)
    for study, trials in STUDIES.items():
        tracker = StudyTracker(tracking, study)
        parent = tracker.ensure_parent_run()
        for number, (timestep, layer, temperature) in enumerate(trials):
            # a made-up score with some structure so that the plots have something to show
            jf = 0.8 - abs(timestep - 40) / 200 - abs(temperature - 0.1)
            folder = tmp_path_factory.mktemp(f"{study}-{number}")
            config = RunConfig.from_dict(
                {
                    "dataset": {"root": str(folder.parent / "no-data")},
                    "backbone": {"name": "adm", "timestep": timestep, "layer": layer},
                    "method": {"temperature": temperature, "topk": 5},
                    "output_dir": str(folder),
                }
            )
            scores = [
                ObjectScores(
                    f"seq{i}", 1, ("00001",), j=np.array([jf + 0.1 * i]), f=np.array([jf - 0.05 * i])
                )
                for i in range(3)
            ]
            outcomes = [
                SequenceOutcome(i, f"seq{i}", 3, [1], [scores[i]], {}, {"corr_precision": jf + 0.1})
                for i in range(3)
            ]
            metrics = {
                "J&F-Mean": jf,
                "J-Mean": jf + 0.01,
                "J-Recall": 1.0,
                "J-Decay": 0.0,
                "F-Mean": jf - 0.01,
                "F-Recall": 1.0,
                "F-Decay": 0.0,
            }
            run = tracker.start_trial(parent, number, {}, config)
            run.log_result(
                RunResult(
                    config,
                    folder,
                    folder / "predictions",
                    timestep,
                    layer,
                    metrics,
                    None,
                    outcomes,
                    {"total": 1.0},
                )
            )
            run.end()
    out = tmp_path_factory.mktemp("results")
    export_leaderboards(uri, EXPERIMENT, out)
    return out / "leaderboard.csv", uri


def python3_kernel_available() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        return False
    return True


def test_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebook_runs_on_a_leaderboard(
    leaderboard_csv: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not python3_kernel_available():
        pytest.skip("no 'python3' Jupyter kernel; install one with `python -m ipykernel install --user`")
    csv_path, uri = leaderboard_csv
    monkeypatch.setenv("DIFFVOS_LEADERBOARD", str(csv_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DIFFVOS_EXPERIMENT", EXPERIMENT)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError if a cell fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    # one row of plots per study, the per-sequence heat map, J&F against corr_precision
    assert len(images) == len(STUDIES) + 2
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "7 finished trials in 2 studies" in text
    # the CSV was written after the last run: it is the fresher source, and the notebook says so
    assert f"read from the CSV {csv_path} (no run in the store is newer" in text
    assert f"{len(STUDIES)} studies plotted" in text
    assert "J&F vs corr_precision: 7 trials" in text
