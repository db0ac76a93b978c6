"""End-to-end runs on the synthetic dataset: predictions, evaluation, caching, failure handling, CLI."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.config import RunConfig
from harness.data import open_dataset, read_mask
from harness.data.masks import read_palette
from harness.errors import ConfigError, HarnessError, WeightsNotFoundError
from harness.evaluation import evaluate_dataset
from harness.pipeline import build_backbone, run


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


@pytest.fixture(scope="module")
def first_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pipeline")
    config = small_config(synth_root, out)
    return config, run(config)


def test_writes_every_frame_at_original_size_with_dataset_palette(synth_root: Path, first_run) -> None:
    _, result = first_run
    dataset = open_dataset(synth_root, "val")
    for sequence in dataset.sequences:
        width, height = sequence.frame_size()
        written = sorted(p.stem for p in (result.predictions_dir / sequence.name).glob("*.png"))
        assert written == sequence.frame_names
        for name in written:
            mask = read_mask(result.predictions_dir / sequence.name / f"{name}.png")
            assert mask.shape == (height, width)
            assert set(np.unique(mask)) <= {0, *sequence.object_ids()}
        first = read_mask(result.predictions_dir / sequence.name / f"{written[0]}.png")
        expected = sequence.first_mask().copy()
        expected[expected == 255] = 0
        np.testing.assert_array_equal(first, expected)
        assert read_palette(result.predictions_dir / sequence.name / f"{written[0]}.png") == dataset.palette


def test_metrics_equal_an_independent_evaluation_of_the_written_pngs(synth_root: Path, first_run) -> None:
    _, result = first_run
    again = evaluate_dataset(open_dataset(synth_root, "val"), result.predictions_dir, progress=False)
    # besides the evaluation's metrics, the run carries the method's (the correspondence diagnostics)
    assert {name: result.metrics[name] for name in again.global_metrics} == again.global_metrics
    assert set(result.metrics) - set(again.global_metrics) == set(result.method_metrics)
    assert 0.0 <= result.metrics["J&F-Mean"] <= 1.0
    assert (result.output_dir / "global_results-val.csv").is_file()
    assert (result.output_dir / "per-sequence_results-val.csv").is_file()
    assert set(result.per_sequence_jf) == {s.name for s in open_dataset(synth_root, "val").sequences}
    # backbone.ensemble_size null resolves to the backbone's default, reported with the result
    assert result.config.backbone.ensemble_size is None and result.ensemble_size == 1


def test_propagation_beats_a_static_first_frame(synth_root: Path, first_run, tmp_path: Path) -> None:
    """Objects move, so copying the first mask to every frame must score worse than tracking them."""
    _, result = first_run
    dataset = open_dataset(synth_root, "val")
    static = tmp_path / "static"
    for sequence in dataset.sequences:
        first = sequence.first_mask().copy()
        first[first == 255] = 0
        for name in sequence.frame_names:
            from harness.data import write_mask

            write_mask(static / sequence.name / f"{name}.png", first)
    baseline = evaluate_dataset(dataset, static, progress=False).global_metrics["J&F-Mean"]
    assert result.metrics["J&F-Mean"] > baseline


def test_warm_cache_runs_no_backbone_and_gives_identical_masks(
    synth_root: Path, first_run, tmp_path: Path
) -> None:
    config, result = first_run
    backbone = build_backbone(config)
    calls = []
    original = backbone.extract
    backbone.extract = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    second = run(config.with_overrides({"output_dir": str(tmp_path / "again")}), backbone=backbone)
    assert calls == []
    assert second.cache_stats is not None and second.cache_stats.misses == 0
    for png in result.predictions_dir.rglob("*.png"):
        twin = second.predictions_dir / png.relative_to(result.predictions_dir)
        np.testing.assert_array_equal(read_mask(png), read_mask(twin))


def test_failure_leaves_no_half_written_predictions(synth_root: Path, tmp_path: Path) -> None:
    config = small_config(synth_root, tmp_path)

    def stop_after_first(outcome) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        run(config, on_sequence=stop_after_first)
    run_dir = Path(config.output_dir)
    assert not (run_dir / "predictions").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".predictions")] == []


def test_test_dev_split_writes_a_submission_archive(synth_root: Path, tmp_path: Path) -> None:
    config = small_config(synth_root, tmp_path, **{"dataset.split": "test-dev"})
    result = run(config)
    assert result.metrics is None and result.submission_zip is not None
    dataset = open_dataset(synth_root, "test-dev")
    with zipfile.ZipFile(result.submission_zip) as archive:
        names = set(archive.namelist())
    expected = {f"{s.name}/{n}.png" for s in dataset.sequences for n in s.frame_names}
    assert names == expected


def test_bad_layer_and_timestep_fail_before_any_work(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no layer 9"):
        run(small_config(synth_root, tmp_path, **{"backbone.layer": 9}))
    with pytest.raises(ConfigError, match="time step 1000"):
        run(small_config(synth_root, tmp_path, **{"backbone.timestep": 1000}))
    assert not (tmp_path / "run" / "predictions").exists()


@pytest.mark.parametrize("name", ["adm-tiny", "sd-tiny"])
def test_tiny_diffusion_presets_run_end_to_end(synth_root: Path, tmp_path: Path, name: str) -> None:
    config = small_config(
        synth_root,
        tmp_path,
        **{"backbone.name": name, "dataset.sequences": ["synth-reenter"], "backbone.timestep": 30},
    )
    result = run(config)
    assert result.metrics is not None and 0.0 <= result.metrics["J&F-Mean"] <= 1.0


def test_adm_offline_without_weights_fails_with_where_to_put_them(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import backbones.download

    def offline(url: str, dest: Path, **_: object) -> None:
        raise HarnessError(f"cannot reach {url}: network is unreachable")

    monkeypatch.setattr(backbones.download, "download_file", offline)
    monkeypatch.setenv("DIFFVOS_WEIGHTS_DIR", str(tmp_path / "weights"))
    config = small_config(synth_root, tmp_path, **{"backbone.name": "adm"})
    with pytest.raises(WeightsNotFoundError) as raised:
        run(config)
    message = str(raised.value)
    assert str(tmp_path / "weights" / "256x256_diffusion_uncond.pt") in message
    assert "256x256_diffusion_uncond.pt" in message and "http" in message


def test_cli_run_evaluate_and_errors(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        f"dataset: {{root: {synth_root}, sequences: [synth-occlusion]}}\n"
        f"input: {{short_side: 64}}\nmethod: {{radius: 4}}\n"
        f"cache: {{dir: {tmp_path / 'cache'}}}\noutput_dir: {tmp_path / 'cli-run'}\n"
    )
    assert main(["run", "--config", str(config_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "J&F-Mean" in printed

    code = main(
        [
            "evaluate",
            "--root",
            str(synth_root),
            "--predictions",
            str(tmp_path / "cli-run" / "predictions"),
            "--out",
            str(tmp_path / "eval"),
            "--quiet",
        ]
    )
    # the run covered one sequence only, so evaluating the whole split must fail clearly
    assert code == 2
    assert "synth-" in capsys.readouterr().err

    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--config", str(config_path), "--set", "backbone.layer=42", "--quiet"]) == 2
    assert "no layer 42" in capsys.readouterr().err


def test_cli_backbones_list_and_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones", "list"]) == 0
    listing = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert ["adm", "30", "6"] in listing and ["sd2.1", "100", "9"] in listing
    assert main(["cache", "info", "--dir", str(tmp_path / "c")]) == 0
    assert "entries" in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(tmp_path / "c")]) == 0


def test_prefetched_layers_are_cached_by_the_same_pass(synth_root: Path, tmp_path: Path) -> None:
    config = small_config(
        synth_root,
        tmp_path,
        **{
            "dataset.sequences": ["synth-reenter"],
            "backbone.layer": 2,
            "backbone.prefetch_layers": [0, 1, 2],
        },
    )
    backbone = build_backbone(config)
    calls: list[list] = []
    original = backbone.extract

    def counting(*args, **kwargs):
        calls.append(list(kwargs["layers"]))
        return original(*args, **kwargs)

    backbone.extract = counting  # type: ignore[method-assign]
    run(config, backbone=backbone)
    assert calls and all(sorted(map(str, layers)) == ["0", "1", "2"] for layers in calls)
    calls.clear()
    for layer in (0, 1):
        run(
            config.with_overrides({"backbone.layer": layer, "output_dir": str(tmp_path / f"l{layer}")}),
            backbone=backbone,
        )
    assert calls == []
