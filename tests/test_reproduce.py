"""`harness reproduce`: every published system resolves to the released settings (one cited table), the
listing and dry run say what runs, and a registered row runs end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import published
from harness.cli import main
from harness.config import RunConfig
from harness.errors import ConfigError
from harness.published import PUBLISHED, PublishedSystem
from harness.reproduce import RELEASED, reproduce, resolved_settings, system_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("paper-adm", "paper-sd21", "dift-adm", "dift-sd21")
#: systems of the released code that later issues added; their settings are in RELEASED too
RELEASED_SYSTEMS = (*SYSTEMS, "paper-sd21-prompt")


def register_smoke_row(
    monkeypatch: pytest.MonkeyPatch, description: str, **overrides: object
) -> PublishedSystem:
    """A published row named ``smoke`` (J&F 50.0) that runs the random-conv backbone in seconds."""
    row = PublishedSystem(
        name="smoke",
        description=description,
        jf=50.0,
        source="test",
        weights=("random-conv",),
        overrides={
            "backbone.name": "random-conv",
            "input.short_side": 64,
            "method.n_last_frames": 3,
            "method.radius": 4,
            "cache.enabled": False,
            **overrides,
        },
    )
    monkeypatch.setitem(published.PUBLISHED, "smoke", row)
    return row


def test_the_released_table_covers_the_paper_and_dift_with_sources() -> None:
    assert set(RELEASED_SYSTEMS) <= set(RELEASED) and set(RELEASED_SYSTEMS) <= set(PUBLISHED)
    for name in RELEASED_SYSTEMS:
        for key, released in RELEASED[name].items():
            assert ".py:" in released.source or ".md:" in released.source or ".yaml:" in released.source, key


@pytest.mark.parametrize("name", RELEASED_SYSTEMS)
def test_each_system_resolves_to_the_released_settings(name: str) -> None:
    settings = resolved_settings(system_config(name))
    for key, released in RELEASED[name].items():
        assert settings[key] == released.value, f"{name} {key}: released {released.value} ({released.source})"
    assert settings["dataset.root"] == "data/DAVIS"


@pytest.mark.parametrize("name", ["paper-adm", "paper-sd21"])
def test_the_defaults_alone_are_the_papers_settings(name: str) -> None:
    """Only the backbone named: the backbone's and the run's defaults must be the released values."""
    model = RELEASED[name]["backbone.name"].value
    settings = resolved_settings(RunConfig().with_overrides({"backbone.name": model}))
    for key, released in RELEASED[name].items():
        assert settings[key] == released.value, (
            f"default {key}: released {released.value} ({released.source})"
        )


def test_list_shows_systems_numbers_and_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in SYSTEMS:
        assert name in out
    assert "75.7" in out and "70.0" in out and "70.5" in out
    assert "adm (yes)" in out or "adm (no (" in out  # where the file is looked for, when it is missing
    assert "dino-vitb8" in out  # rows other systems add are listed too


def test_dry_run_prints_the_resolved_configuration_with_sources(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--dry-run", "dift-adm", "--dataset", "/data/davis"]) == 0
    out = capsys.readouterr().out
    assert "dataset.root: '/data/davis'" in out
    assert "backbone.timestep: 51  # github Tsingularity/dift README.md:186" in out
    assert "backbone.ensemble_size: 4" in out and "method.topk: 10" in out


def test_unknown_systems_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "paper-xyz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown published system 'paper-xyz'" in err
    with pytest.raises(ConfigError, match="name a system"):
        from harness.reproduce import main_from_args

        main_from_args(type("Args", (), {"list": False, "system": None})())


def test_a_new_row_just_works(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    row = register_smoke_row(monkeypatch, "random-conv on the synthetic set")
    out_dir = tmp_path / "smoke"
    argv = ["reproduce", "smoke", "--dataset", str(synth_root), "--output", str(out_dir), "--quiet"]
    assert main([*argv, "--no-track"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("smoke: ours ") and "published 50.0, difference " in line
    assert (out_dir / "global_results-val.csv").is_file()
    comparison = reproduce("smoke", str(synth_root), str(tmp_path / "again"), progress=False)
    assert comparison.difference == pytest.approx(comparison.ours - 50.0)
    assert f"{comparison.ours:.1f}" in line  # the same features and settings: the same J&F
    unpublished = PublishedSystem(**{**row.__dict__, "name": "smoke2", "jf": None})
    monkeypatch.setitem(published.PUBLISHED, "smoke2", unpublished)
    assert (
        "no published number" in reproduce("smoke2", str(synth_root), str(tmp_path / "u"), False).describe()
    )


def test_make_reproduce_runs_the_command() -> None:
    result = subprocess.run(
        ["make", "-n", "reproduce", "SYSTEM=dift-adm", "DATASET=/d"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert "harness.cli reproduce dift-adm --dataset /d" in result.stdout


def test_the_paper_study_rows_are_the_released_settings(tmp_path: Path) -> None:
    from harness.study.spec import load_study_spec

    spec = load_study_spec(REPO_ROOT / "studies" / "paper.yaml")
    assert len(spec.enqueue) == 6  # the four systems, the paper's oracle, then SD 2.1 + prompt learning
    rows = [*zip(SYSTEMS, spec.enqueue[:4], strict=True), ("paper-sd21-prompt", spec.enqueue[5])]
    for name, params in rows:
        settings = resolved_settings(spec.build_config(params, output_dir=tmp_path))
        for key, released in RELEASED[name].items():
            assert settings[key] == released.value, f"studies/paper.yaml {name} {key} ({released.source})"


def test_dift_caps_the_memory_of_shooting_only() -> None:
    settings = system_config("dift-adm").method.settings
    assert settings.n_last_frames_for("shooting") == 10 and settings.n_last_frames_for("bmx-trees") == 28
    assert system_config("paper-adm").method.settings.n_last_frames_for("shooting") == 28
    with pytest.raises(ConfigError, match="memory_caps"):
        RunConfig().with_overrides({"method.memory_caps": "shooting:10"})


def test_a_tracked_reproduction_is_tagged_with_its_system(
    synth_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_store,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    register_smoke_row(
        monkeypatch,
        "random-conv on two synthetic sequences",
        **{"dataset.sequences": ["synth-shapes", "synth-crossing"]},
    )
    uri, _ = fresh_store("reproduce-store")
    argv = ["reproduce", "smoke", "--dataset", str(synth_root), "--output", str(tmp_path / "o"), "--quiet"]
    assert main([*argv, "--tracking-uri", uri]) == 0
    assert "published 50.0" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("diffvos")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`diffvos.system` = 'smoke'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "JF_mean" in runs[0].data.metrics
