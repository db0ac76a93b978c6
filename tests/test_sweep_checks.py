"""What a sweep checks before it creates its study: the study file (metric, search space, name), the
journal file (a torn last record), the dataset, the weights, the disk and the tracking store.

Every refusal must leave no journal file behind, so that a fixed command starts cleanly.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from harness.cli import main as cli_main
from harness.errors import ConfigError, WeightsNotFoundError
from harness.study import main, parse_study_spec, resolve_storage, run_sweep
from harness.study.preflight import check_tracking_store, preflight
from harness.study.storage import open_storage, repair_journal
from harness.tracking import TrackingConfig
from tests.test_study import FakeRunner, FakeTracker, base_study, temperature_score, write_study


def synth_data(synth_root: Path, **changes: Any) -> dict[str, Any]:
    data = base_study(dataset={"root": str(synth_root), "split": "val"})
    data.update(changes)
    return data


def sweep(study_file: Path, tmp_path: Path, **kwargs: Any) -> Any:
    return run_sweep(
        study_file,
        storage=None,
        tracking=TrackingConfig(),
        output_root=tmp_path / "runs",
        storage_dir=tmp_path / "storage",
        runner=kwargs.pop("runner", FakeRunner(temperature_score)),
        tracker_factory=lambda config, name: kwargs.pop("tracker", FakeTracker()),
        **kwargs,
    )


# -- the study file ------------------------------------------------------------------------------------------


def test_metric_typo_is_refused_with_the_known_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = base_study(objective={"metric": "JF-Mean", "direction": "maximize"})
    with pytest.raises(ConfigError, match=r"objective.metric 'JF-Mean'.*did you mean 'J&F-Mean'"):
        parse_study_spec(data)
    path = write_study(tmp_path, data)
    assert main([str(path), "--validate"]) == 2
    assert "J-Recall" in capsys.readouterr().err  # the known names are listed
    parse_study_spec(base_study(objective={"metric": "F-Recall", "direction": "maximize"}))  # a real column


def test_empty_search_space_is_refused() -> None:
    for empty in ({}, None):
        with pytest.raises(ConfigError, match="search_space is empty"):
            parse_study_spec(base_study(search_space=empty, n_trials=3))


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "x\n", "/abs"])
def test_study_names_cannot_leave_their_folders(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        parse_study_spec(base_study(name=name))
    with pytest.raises(ConfigError, match="study name"):
        resolve_storage(None, name, tmp_path / "storage")
    assert not list(tmp_path.rglob("*.journal"))


# -- the journal file ----------------------------------------------------------------------------------------


def test_torn_last_journal_record_is_cut_with_a_backup(tmp_path: Path, synth_root: Path) -> None:
    study_file = write_study(tmp_path, synth_data(synth_root, n_trials=3))
    assert sweep(study_file, tmp_path, n_trials=2).n_complete == 2
    journal = tmp_path / "storage" / "unit.journal"
    complete = journal.read_bytes()
    torn = b'{"op_code": 5, "worker_id": "dead", "trial_id": 1, "user_attr'
    journal.write_bytes(complete + torn)  # a writer killed in the middle of a record

    summary = sweep(study_file, tmp_path)
    assert summary.n_complete == 3  # carried on from the last complete record
    backups = list(journal.parent.glob("unit.journal.torn-*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == complete + torn
    assert journal.read_bytes().startswith(complete) and torn not in journal.read_bytes()
    # and the repaired journal reads back completely
    study = optuna.load_study(
        study_name="unit", storage=open_storage(resolve_storage(None, "unit", journal.parent))
    )
    assert len(study.get_trials()) == 3


def test_torn_line_with_newline_and_a_damaged_middle(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    good = b'{"op_code": 0, "a": 1}\n{"op_code": 1, "b": 2}\n'
    journal.write_bytes(good + b'{"op_code": 2, "c": \n')  # torn, but the newline made it out
    assert repair_journal(journal) is not None
    assert journal.read_bytes() == good
    assert repair_journal(journal) is None  # nothing left to cut

    journal.write_bytes(b'{"op_code": 0}\n{"op_co\n{"op_code": 1}\n')
    with pytest.raises(ConfigError, match="damaged at record 2"):
        repair_journal(journal)


# -- pre-flight ----------------------------------------------------------------------------------------------


def test_missing_dataset_names_the_download_and_leaves_no_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    timestep = yaml.safe_load((Path(__file__).resolve().parents[1] / "studies" / "timestep.yaml").read_text())
    timestep["dataset"]["root"] = str(tmp_path / "data" / "DAVIS")
    study_file = write_study(tmp_path, timestep)
    code = main([str(study_file), "--storage-dir", str(tmp_path / "storage"), "--output-root", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"harness data download davis2017 --root {tmp_path / 'data' / 'DAVIS'}" in err
    assert not (tmp_path / "storage").exists() or not list((tmp_path / "storage").iterdir())


def test_missing_weights_stop_before_any_trial(
    tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFFVOS_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    data = synth_data(
        synth_root,
        fixed={"cache.enabled": False, "input.short_side": 64},
        search_space={"backbone.name": {"type": "categorical", "choices": ["random-conv", "adm"]}},
        sampler={"type": "grid"},
        n_trials=None,
    )
    study_file = write_study(tmp_path, data)
    runner = FakeRunner(temperature_score)
    with pytest.raises(WeightsNotFoundError) as caught:
        sweep(study_file, tmp_path, runner=runner)
    message = str(caught.value)
    assert "'adm'" in message and str(tmp_path / "no-weights" / "256x256_diffusion_uncond.pt") in message
    assert "random-conv" not in message  # only what is missing
    assert runner.configs == [] and not (tmp_path / "storage").exists()

    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "256x256_diffusion_uncond.pt").write_bytes(b"present")
    assert sweep(study_file, tmp_path, runner=runner).n_complete == 2  # weights there: it runs


def test_too_little_disk_for_the_feature_cache(tmp_path: Path, synth_root: Path) -> None:
    data = synth_data(
        synth_root,
        fixed={"backbone.name": "random-conv", "input.short_side": 64, "cache.dir": str(tmp_path / "cache")},
        search_space={"backbone.layer": {"type": "categorical", "choices": [0, 1, 2]}},
        sampler={"type": "grid"},
        n_trials=None,
    )
    study_file = write_study(tmp_path, data)
    spec = parse_study_spec(data)
    report = preflight(spec, 3, free_disk=lambda folder: 10**12)
    assert (
        report.problems == [] and report.notes == [] and report.feature_sets == 3 and report.cache_bytes > 0
    )
    assert "frames per trial" in report.format() and "feature cache" in report.format()
    one_trial = max(
        preflight(replace_layer(data, layer), 1, free_disk=lambda f: 10**12).cache_bytes
        for layer in (0, 1, 2)
    )

    # the whole study does not fit under the default cap (half the free disk), one trial does: a note
    free = 2 * one_trial + 1
    assert report.cache_bytes > free // 2  # the three layers together are more than the cap
    roomy = preflight(spec, 3, free_disk=lambda folder: free)
    assert roomy.problems == [] and "evicted" in roomy.notes[0]

    # not even one trial's features fit: the sweep stops before the study exists
    with pytest.raises(ConfigError, match="one trial's features take about") as caught:
        sweep(study_file, tmp_path, free_disk=lambda folder: one_trial)
    assert "cache.fp16" in str(caught.value)
    assert not (tmp_path / "storage").exists()
    # the same through the environment hook the command line uses
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFVOS_FREE_DISK_BYTES", "1000")
        with pytest.raises(ConfigError, match="1000 bytes free there|0.0 MB free there"):
            sweep(study_file, tmp_path)

    # an explicit cap above the free disk, with an estimate that does not fit: refused
    capped = dict(data, fixed=data["fixed"] | {"cache.max_gb": 1000})
    tight = preflight(parse_study_spec(capped), 3, free_disk=lambda folder: report.cache_bytes - 1)
    assert [p.kind for p in tight.problems] == ["disk"] and "cache.max_gb" in tight.problems[0].message


def replace_layer(data: dict[str, Any], layer: int) -> Any:
    one = dict(data, search_space={"method.topk": {"type": "categorical", "choices": [1]}})
    one["fixed"] = data["fixed"] | {"backbone.layer": layer}
    return parse_study_spec(one)


def test_cache_estimate_counts_layer_channels_and_grid(tmp_path: Path, synth_root: Path) -> None:
    """fp16 halves the estimate; a bigger input grows it with the grid (frames x C x h x w x bytes)."""
    base = synth_data(
        synth_root,
        fixed={"backbone.name": "random-conv", "input.short_side": 64, "backbone.layer": 1},
        search_space={"method.topk": {"type": "categorical", "choices": [1, 2]}},
        sampler={"type": "grid"},
        n_trials=None,
    )
    full = preflight(parse_study_spec(base), 2, free_disk=lambda f: 10**12)
    assert full.feature_sets == 1  # top-k does not change the features
    half = dict(base, fixed=base["fixed"] | {"cache.fp16": True})
    assert (
        preflight(parse_study_spec(half), 2, free_disk=lambda f: 10**12).cache_bytes * 2 == full.cache_bytes
    )
    bigger = dict(base, fixed=base["fixed"] | {"input.short_side": 128})
    assert (
        preflight(parse_study_spec(bigger), 2, free_disk=lambda f: 10**12).cache_bytes > 3 * full.cache_bytes
    )


# -- tracking store ------------------------------------------------------------------------------------------


def test_unreachable_tracking_server_fails_fast_before_the_study(tmp_path: Path, synth_root: Path) -> None:
    silent = socket.socket()  # accepts connections, never answers: what a dead proxy or firewall does
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        uri = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match="did not answer within 1 s"):
            check_tracking_store(uri, timeout=1.0)
        assert time.monotonic() - start < 10
        study_file = write_study(tmp_path, synth_data(synth_root))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("harness.study.preflight.TRACKING_TIMEOUT_S", 1.0)
            with pytest.raises(ConfigError, match="MLflow tracking server"):
                run_sweep(
                    study_file,
                    storage=None,
                    tracking=TrackingConfig(tracking_uri=uri),
                    storage_dir=tmp_path / "storage",
                )
        assert not (tmp_path / "storage").exists()
    finally:
        silent.close()


class _NotFound(http.server.BaseHTTPRequestHandler):
    """Another web service: answers every request with 404."""

    def do_GET(self) -> None:  # noqa: N802 - the handler's API
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_mlflow_uri() -> Any:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_is_not_mlflow_fails_before_the_study(
    tmp_path: Path, synth_root: Path, not_mlflow_uri: str
) -> None:
    # a wrong port or path prefix reaches another web service: it answers, but with 404; the sweep used to
    # create the study and then end in a raw MlflowException traceback
    with pytest.raises(ConfigError, match="not an MLflow tracking server"):
        check_tracking_store(not_mlflow_uri, timeout=2.0)
    study_file = write_study(tmp_path, synth_data(synth_root))
    with pytest.raises(ConfigError, match="not an MLflow tracking server"):
        run_sweep(
            study_file,
            storage=None,
            tracking=TrackingConfig(tracking_uri=not_mlflow_uri),
            storage_dir=tmp_path / "storage",
        )
    assert not (tmp_path / "storage").exists()


@pytest.mark.parametrize("command", ["run", "reproduce"])
def test_tracked_runs_check_the_store_before_running(
    tmp_path: Path, synth_root: Path, not_mlflow_uri: str, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # `harness run --track` and `harness reproduce` ran first and then died in a traceback (or hung on an
    # unreachable server) when the store could not be used
    out = tmp_path / "out"
    if command == "run":
        config = tmp_path / "run.yaml"
        config.write_text(f"dataset: {{root: {synth_root}}}\noutput_dir: {out}\n")
        argv = ["run", "--config", str(config), "--quiet", "--track"]
    else:
        argv = ["reproduce", "paper-adm", "--dataset", str(synth_root), "--output", str(out), "--quiet"]
    assert cli_main([*argv, "--tracking-uri", not_mlflow_uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an MLflow tracking server" in err
    assert not out.exists()


# -- optuna-dashboard ----------------------------------------------------------------------------------------


def test_study_names_its_objective_for_the_dashboard(tmp_path: Path, synth_root: Path) -> None:
    study_file = write_study(tmp_path, synth_data(synth_root, n_trials=1))
    sweep(study_file, tmp_path)
    study = optuna.load_study(
        study_name="unit", storage=open_storage(resolve_storage(None, "unit", tmp_path / "storage"))
    )
    assert study.metric_names == ["J&F-Mean"]


def test_dashboard_gathers_every_study(tmp_path: Path, synth_root: Path) -> None:
    from harness.study.dashboard import gather_studies

    for name in ("first", "second"):
        sweep(write_study(tmp_path, synth_data(synth_root, name=name, n_trials=1), f"{name}.yaml"), tmp_path)
    storage, names = gather_studies(tmp_path / "storage")
    assert sorted(names) == ["first", "second"]
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        assert study.metric_names == ["J&F-Mean"] and len(study.get_trials()) == 1


def test_weights_status_without_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backbones.status import weights_status

    monkeypatch.setenv("DIFFVOS_WEIGHTS_DIR", str(tmp_path))
    assert weights_status("random-conv").present and weights_status("sd-tiny").present
    missing = weights_status("adm")
    assert not missing.present and missing.location == str(tmp_path / "256x256_diffusion_uncond.pt")
    assert "curl" in missing.fix
    folder = tmp_path / "sd21"
    assert not weights_status("sd2.1", str(folder)).present
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    assert weights_status("sd2.1", str(folder)).present
    assert weights_status("sd", options={"model": str(folder)}).present
