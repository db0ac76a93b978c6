"""Run configuration: YAML loading, validation and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.frames import load_network_input, network_input_size


def test_defaults_are_the_papers_propagation_settings() -> None:
    config = RunConfig()
    settings = config.method.settings
    assert config.method.name == "labelprop"
    assert settings.similarity == "cosine" and settings.temperature == pytest.approx(0.2)
    assert (settings.topk, settings.radius, settings.n_last_frames, settings.filter) == (15, 15, 28, None)
    assert config.input.short_side == 480


def test_yaml_round_trip_and_nested_values(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "dataset: {root: /data/davis, split: val, sequences: [a, b]}\n"
        "backbone: {name: adm, timestep: 50, layer: 7, ensemble_size: 4}\n"
        "method: {temperature: 0.1, topk: 10}\n"
        "output_dir: out\n"
    )
    config = RunConfig.from_yaml(path)
    assert config.dataset.sequences == ["a", "b"]
    assert (config.backbone.name, config.backbone.timestep, config.backbone.layer) == ("adm", 50, 7)
    assert config.method.settings.topk == 10 and config.method.settings.radius == 15
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backbone: {nmae: adm}\n", "nmae"),
        ("colour: red\n", "colour"),
        ("backbone: {timestep: fifty}\n", "backbone.timestep"),
        ("backbone: {ensemble_size: 0}\n", "ensemble_size"),
        ("backbone: {dtype: fp8}\n", "dtype"),
        ("method: {similarity: dot}\n", "dot"),
        ("method: {topk: 0}\n", "topk"),
        ("method: {tempreature: 0.1}\n", "method.tempreature for method 'labelprop'"),
        ("method: {name: magic}\n", "unknown method 'magic'; available: .*labelprop"),
        ("method: {filter: sieve}\n", "unknown correspondence filter 'sieve'; available: .*first-frame"),
        ("method: [labelprop]\n", "method must be a mapping"),
        ("propagation: {topk: 10}\n", "'propagation:' section is now 'method:'"),
        ("- just\n- a list\n", "mapping"),
        ("backbone: [1, 2\n", "YAML"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        RunConfig.from_yaml(path)
    assert str(path) in str(raised.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml("/nonexistent/run.yaml")


def test_overrides() -> None:
    config = RunConfig().with_overrides({"backbone.timestep": 50, "method.temperature": 0.1})
    assert config.backbone.timestep == 50
    assert config.method.settings.temperature == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="backbone.tmestep"):
        RunConfig().with_overrides({"backbone.tmestep": 1})
    with pytest.raises(ConfigError, match="method.topkk for method 'labelprop'"):
        RunConfig().with_overrides({"method.topkk": 1})
    with pytest.raises(ConfigError, match="now 'method'"):
        RunConfig().with_overrides({"propagation.topk": 1})


def test_method_section_is_flat_in_dicts_and_round_trips() -> None:
    config = RunConfig().with_overrides({"method.topk": 10, "method.filter": "first-frame"})
    section = config.to_dict()["method"]
    assert section["name"] == "labelprop" and section["topk"] == 10 and section["filter"] == "first-frame"
    assert RunConfig.from_dict(config.to_dict()) == config
    assert config.method.settings.filter == "first-frame"


@pytest.mark.parametrize(
    ("size", "short", "multiple", "expected"),
    [
        ((854, 480), 480, 32, (480, 832)),
        ((910, 480), 480, 32, (480, 896)),
        ((1152, 480), 480, 32, (480, 1152)),
        ((480, 854), 480, 32, (832, 480)),  # portrait
        ((160, 96), 96, 8, (96, 160)),
        ((144, 88), 96, 8, (96, 128)),  # 144 * 96/88 = 157.09 -> the released floor to 32: 128
        ((854, 480), 480, 64, (448, 768)),  # a multiple-64 backbone: 448 short, 448 * 854/480 = 797 -> 768
    ],
)
def test_network_input_size(
    size: tuple[int, int], short: int, multiple: int, expected: tuple[int, int]
) -> None:
    assert network_input_size(*size, short_side=short, multiple=multiple) == expected


def test_network_input_is_scaled_to_minus_one_one(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "frame.png"
    Image.new("RGB", (20, 10), (255, 0, 127)).save(path)
    tensor = load_network_input(path, (8, 16))
    assert tensor.shape == (3, 8, 16)
    assert tensor[0].min() == pytest.approx(1.0)
    assert tensor[1].max() == pytest.approx(-1.0)
    assert tensor[2].mean() == pytest.approx(127 / 127.5 - 1, abs=1e-6)
