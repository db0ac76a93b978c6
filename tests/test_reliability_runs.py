"""Runs under hostile or careless input (issues #13, #15): confined names, whole outputs or none, honest
scoring, one-line errors. Each test reproduces a reported failure on the synthetic set."""

from __future__ import annotations

import csv
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harness.pipeline as pipeline
from harness.cli import main
from harness.config import RunConfig
from harness.data import open_dataset, read_mask, write_mask
from harness.errors import ConfigError, DataError, HarnessWarning
from harness.pipeline import run

ONE = "synth-reenter"  # the shortest val sequence
TWO = ["synth-reenter", "synth-occlusion"]


def small_config(root: Path, out: Path, **overrides: object) -> RunConfig:
    base = {
        "dataset.root": str(root),
        "input.short_side": 64,
        "method.radius": 4,
        "method.n_last_frames": 3,
        "cache.dir": str(out / "cache"),
        "output_dir": str(out / "run"),
        "progress": False,
    }
    return RunConfig().with_overrides(base | overrides)


@pytest.fixture
def data(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic dataset that a test may damage."""
    return Path(shutil.copytree(synth_root, tmp_path / "data"))


def _split_file(root: Path, split: str = "val") -> Path:
    return root / "ImageSets" / "2017" / f"{split}.txt"


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- path confinement ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["..", "../outside", "/abs/path", "a/b"])
def test_sequence_names_that_leave_the_root_are_refused_before_any_work(
    data: Path, tmp_path: Path, bad: str
) -> None:
    # an absolute name pointing at a real folder of frames and masks: the run used to overwrite its masks
    victim = tmp_path / "victim"
    shutil.copytree(data / "JPEGImages" / "480p" / ONE, victim / "JPEGImages" / "480p" / ONE)
    if bad == "/abs/path":
        bad = str(data / "JPEGImages" / "480p" / ONE)
    _split_file(data).write_text(f"{ONE}\n{bad}\n")
    before = _listing(data)
    config = small_config(data, tmp_path)
    with pytest.raises(DataError, match="not a plain name"):
        run(config)
    assert _listing(data) == before
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_configured_sequence_names_are_confined_too(data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a plain name"):
        run(small_config(data, tmp_path, **{"dataset.sequences": [f"../480p/{ONE}"]}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["dataset.split", "dataset.resolution"])
def test_split_and_resolution_are_confined_too(data: Path, tmp_path: Path, key: str) -> None:
    # the split names the result files (global_results-<split>.csv): '..' in it wrote them outside
    # output_dir; an absolute resolution read frames (and masks) from anywhere
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ImageSets" / "2017").mkdir(parents=True)
    shutil.copy(_split_file(data), elsewhere / "ImageSets" / "2017" / "x.txt")
    bad = {
        "dataset.split": "../../../elsewhere/ImageSets/2017/x",
        "dataset.resolution": str(data / "JPEGImages" / "480p"),
    }[key]
    with pytest.raises(DataError, match="not a plain name"):
        run(small_config(data, tmp_path, **{key: bad, "dataset.sequences": [ONE]}))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    assert sorted(p.name for p in elsewhere.rglob("*")) == ["2017", "ImageSets", "x.txt"]


def test_cli_evaluate_and_cache_refuse_escaping_names_with_one_line(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _split_file(data).write_text("../../etc\n")
    code = main(
        ["evaluate", "--root", str(data), "--predictions", str(tmp_path), "--out", str(tmp_path / "e")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'../../etc' is not a plain name" in err
    assert not (tmp_path / "e").exists()
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: {{root: {data}}}\ncache: {{dir: {tmp_path / 'cache'}}}\n")
    assert main(["run", "--config", str(config), "--quiet"]) == 2
    assert "not a plain name" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_duplicate_names_in_imagesets_are_an_error(data: Path, tmp_path: Path) -> None:
    _split_file(data).write_text(f"{ONE}\nsynth-shapes\n{ONE}\n")
    with pytest.raises(DataError, match=f"listed more than once: {ONE}"):
        open_dataset(data, "val")
    with pytest.raises(DataError, match="more than once"):
        run(small_config(data, tmp_path, **{"dataset.split": "val", "dataset.sequences": [ONE, ONE]}))


# -- whole outputs or none -------------------------------------------------------------------------------


def test_a_failing_run_leaves_the_previous_outputs_untouched(data: Path, tmp_path: Path) -> None:
    config = small_config(data, tmp_path, **{"dataset.sequences": [ONE]})
    run(config)
    out = Path(config.output_dir)
    before = _listing(out)
    assert "config.yaml" in before and "global_results-val.csv" in before

    # fails after its predictions and scores exist (as a pruned sweep trial does)
    def stop(outcome: object) -> None:
        raise RuntimeError("stopped after the sequence")

    changed = config.with_overrides({"method.topk": 3})
    with pytest.raises(RuntimeError, match="stopped"):
        run(changed, on_sequence=stop)
    assert _listing(out) == before
    # every first-frame mask empty: "nothing to evaluate", now before any work
    first = data / "Annotations" / "480p" / ONE / "00000.png"
    write_mask(first, np.zeros_like(read_mask(first)))
    with pytest.raises(DataError, match="nothing to evaluate"):
        run(changed)
    assert _listing(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_run_replaces_all_outputs_of_the_previous_one(data: Path, tmp_path: Path) -> None:
    """A test-dev run after a val run in one folder must not leave the val CSVs beside its zip."""
    run(small_config(data, tmp_path, **{"dataset.sequences": [ONE]}))
    notes = tmp_path / "run" / "notes.txt"
    notes.write_text("mine")
    result = run(small_config(data, tmp_path, **{"dataset.split": "test-dev"}))
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["config.yaml", "notes.txt", "predictions", "submission-test-dev.zip"]
    assert result.submission_zip == tmp_path / "run" / "submission-test-dev.zip"
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in result.predictions_dir.iterdir()) == ["synth-td-drift", "synth-td-orbit"]


def test_staging_folders_of_killed_runs_are_removed_when_old(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    old, fresh = out / ".predictions-killed", out / ".predictions-running"
    for folder in (old, fresh):
        (folder / "predictions").mkdir(parents=True)
    stale = os.path.getmtime(old) - 2 * pipeline.STALE_STAGING_SECONDS
    os.utime(old, (stale, stale))
    with pytest.warns(HarnessWarning, match="killed runs"):
        run(small_config(data, tmp_path, **{"dataset.sequences": [ONE]}))
    assert not old.exists() and fresh.exists()


# -- honest scoring --------------------------------------------------------------------------------------


def test_a_missing_ground_truth_mask_is_scored_without_it_and_named(data: Path, tmp_path: Path) -> None:
    missing = data / "Annotations" / "480p" / ONE / "00004.png"
    missing.unlink()
    config = small_config(data, tmp_path, **{"dataset.sequences": TWO})
    with pytest.warns(HarnessWarning, match=str(missing)):
        result = run(config)
    assert result.metrics is not None and result.submission_zip is None
    assert not list((tmp_path / "run").glob("submission-*"))
    assert result.scoring is not None and "00004" not in result.scoring.scored[ONE]
    assert result.scoring.unannotated == {ONE: ("00004",)}
    with open(tmp_path / "run" / "per-frame_results-val.csv") as stream:
        frames = {(row["Sequence"], row["Frame"]) for row in csv.DictReader(stream)}
    assert (ONE, "00004") not in frames and (ONE, "00003") in frames
    assert {(seq, frame) for seq, scored in result.scoring.scored.items() for frame in scored} == frames
    summary = result.scoring.summary()
    assert f"scored {len(frames)} of" in summary and f"{ONE}/00004" in summary


def test_a_sequence_whose_only_masks_are_first_frame_fails_a_split_with_ground_truth(
    data: Path, tmp_path: Path
) -> None:
    for mask in sorted((data / "Annotations" / "480p" / ONE).glob("*.png"))[1:]:
        mask.unlink()
    with pytest.raises(DataError, match=f"{ONE}.*no ground truth"):
        run(small_config(data, tmp_path, **{"dataset.sequences": TWO}))
    assert not (tmp_path / "run" / "predictions").exists()


def test_a_sequence_with_an_empty_first_mask_is_warned_and_listed_as_skipped(
    data: Path, tmp_path: Path
) -> None:
    first = data / "Annotations" / "480p" / ONE / "00000.png"
    write_mask(first, np.zeros_like(read_mask(first)))
    with pytest.warns(HarnessWarning, match=f"no object in the first-frame mask of {ONE}"):
        result = run(small_config(data, tmp_path, **{"dataset.sequences": TWO}))
    with open(tmp_path / "run" / "per-sequence_results-val.csv") as stream:
        rows = list(csv.reader(stream))
    assert [ONE, "skipped", "skipped"] in rows
    occlusion = open_dataset(data, "val").sequence("synth-occlusion").object_ids()
    assert [row[0] for row in rows[1:] if row[1] != "skipped"] == [f"synth-occlusion_{i}" for i in occlusion]
    assert [o.name for o in result.sequences if o.skipped] == [ONE]
    assert "skip" in result.sequence_table


@pytest.mark.parametrize("split", ["val", "test-dev"])
def test_frames_of_different_sizes_stop_the_run_naming_the_frame(
    data: Path, tmp_path: Path, split: str
) -> None:
    sequence = open_dataset(data, split).sequences[0]
    odd = sequence.frames[2]
    with Image.open(odd) as image:
        image.resize((image.width + 16, image.height)).save(odd)
    with pytest.raises(DataError, match=f"frame {odd} is"):
        run(small_config(data, tmp_path, **{"dataset.split": split, "dataset.sequences": [sequence.name]}))
    assert not (tmp_path / "run").exists()


# -- settings --------------------------------------------------------------------------------------------


def test_numeric_strings_are_accepted_for_float_settings(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("method: {temperature: 1e-3}\ncache: {max_gb: 5e1}\n")
    config = RunConfig.from_yaml(path)
    assert config.method.settings.temperature == 0.001 and config.cache.max_gb == 50.0
    with pytest.raises(ConfigError, match="temperature"):
        RunConfig.from_dict({"method": {"temperature": "warm"}})
    with pytest.raises(ConfigError):
        RunConfig.from_dict({"method": {"temperature": "nan"}})


def test_max_gb_zero_is_rejected(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_gb must be > 0"):
        run(small_config(data, tmp_path, **{"cache.max_gb": 0}))


@pytest.mark.parametrize("max_gb", [0, -1])
def test_cache_info_refuses_a_configured_cap_of_zero_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], max_gb: int
) -> None:
    # `harness cache info --config` read the cap without the run's check and divided by it
    config = tmp_path / "run.yaml"
    config.write_text(f"cache: {{dir: {tmp_path / 'cache'}, max_gb: {max_gb}}}\n")
    assert main(["cache", "info", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_gb must be > 0" in err


# -- one line instead of a traceback ---------------------------------------------------------------------


def _no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(config: RunConfig) -> None:
        raise AssertionError("the backbone must not be built")

    monkeypatch.setattr(pipeline, "build_backbone", fail)


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _config_file(tmp_path: Path, data: Path, extra: str = "") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"dataset: {{root: {data}, sequences: [{ONE}]}}\ninput: {{short_side: 64}}\n"
        f"cache: {{dir: {tmp_path / 'cache'}}}\noutput_dir: {tmp_path / 'out'}\n{extra}"
    )
    return path


def test_output_dir_that_is_a_file_fails_before_the_backbone(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_backbone(monkeypatch)
    (tmp_path / "out").write_text("a file")
    code = main(["run", "--config", str(_config_file(tmp_path, data)), "--quiet"])
    assert "exists and is not a folder" in _one_line_error(capsys, code)


def test_output_dir_that_cannot_be_written_fails_before_the_backbone(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_backbone(monkeypatch)

    def denied(folder: Path, prefix: str) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pipeline, "mkdtemp_shared", denied)  # tests run as root: chmod would not stop us
    code = main(["run", "--config", str(_config_file(tmp_path, data)), "--quiet"])
    assert "cannot be written: Permission denied" in _one_line_error(capsys, code)


def test_evaluate_out_that_is_a_file_fails_before_evaluating(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import harness.evaluation

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not evaluate")

    monkeypatch.setattr(harness.evaluation, "evaluate_dataset", fail)
    (tmp_path / "out").write_text("a file")
    args = [
        "evaluate",
        "--root",
        str(synth_root),
        "--predictions",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    ]
    assert "--out" in _one_line_error(capsys, main(args))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("k=[1", "not valid YAML"),
        ("backbone.device=tpu", "'tpu' is not a device"),
        ("backbone.options={wings: 2}", "does not take option(s) 'wings'"),
    ],
)
def test_bad_settings_are_one_line(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    code = main(["run", "--config", str(_config_file(tmp_path, data)), "--set", setting, "--quiet"])
    assert message in _one_line_error(capsys, code)


def test_a_cache_folder_that_cannot_be_written_runs_without_cache(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cache").mkdir()
    original = Path.write_text

    def read_only(self: Path, *args: object, **kwargs: object) -> int:
        if self.parent == tmp_path / "cache":
            raise PermissionError(13, "Read-only file system")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)  # tests run as root: chmod would not stop us
    assert main(["run", "--config", str(_config_file(tmp_path, data)), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "warning: feature cache folder" in captured.err and "without a feature cache" in captured.err
    assert list((tmp_path / "cache").iterdir()) == []
    assert "J&F-Mean" in captured.out


# -- the command line's small things ---------------------------------------------------------------------


def test_bench_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0
    assert "usage: harness bench" in capsys.readouterr().out


def test_run_without_the_default_dataset_says_how_to_make_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capsys, main(["run", "--quiet"]))
    assert "harness data synth --out data/synth" in err
    assert not (tmp_path / "runs").exists()


def test_backbones_list_is_a_short_table_and_layers_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < 20
    assert lines[0].split()[:3] == ["name", "default", "t"]
    adm = next(line for line in lines if line.startswith("adm "))
    assert adm.split()[1:3] == ["30", "6"] and ("yes" in adm or "no (" in adm)
    assert "none needed" in next(line for line in lines if line.startswith("random-conv"))
    assert main(["backbones", "list", "--layers", "adm"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "adm: default t 30, default layer 6"
    assert ["6", "512", "8"] in [line.split() for line in table]


def test_run_prints_a_per_sequence_table_and_names_sequences_in_its_progress(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config_file(tmp_path, data).read_text().replace(f"[{ONE}]", "[synth-reenter, synth-shapes]")
    (tmp_path / "run.yaml").write_text(path)
    assert main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split() == ["sequence", "J&F", "frames", "seconds"]
    for row, name in zip(table[1:3], ["synth-reenter", "synth-shapes"], strict=True):
        cells = row.split()
        assert (
            cells[0] == name and 0.0 <= float(cells[1]) <= 1.0 and int(cells[2]) > 0 and float(cells[3]) >= 0
        )
    assert "run:" in captured.err and "synth-shapes (2/2)" in captured.err
    assert "scored " in captured.out


def test_offline_download_leaves_no_empty_archive_folder(tmp_path: Path) -> None:
    from harness.data.download import download_davis2017
    from harness.errors import HarnessError

    with socket.socket() as probe:  # a port nobody listens on: connection refused, like being offline
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HarnessError):
        download_davis2017(
            tmp_path / "DAVIS", base_url=f"http://127.0.0.1:{port}/", progress=False, timeout=2
        )
    assert list(tmp_path.iterdir()) == []
