"""Prompt learning through the pipeline on sd-tiny and the synthetic set: the ``prompt-learning`` method
(settings, errors, an end-to-end `harness run`), and the
plumbing it uses: vectors per object, conditioned features through the cache, run artifacts, MLflow."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from backbones.sd_prompt import PromptLearningSettings
from harness.cli import main
from harness.config import RunConfig
from harness.errors import ConfigError
from harness.methods import get_method, register_method
from harness.methods.base import METHOD_ARTIFACTS, SequenceContext
from harness.methods.labelprop import PropagationSettings
from harness.methods.prompting import (
    PROMPT_ARTIFACTS,
    PromptLearningMethodSettings,
    learn_object_prompts,
    object_features,
)
from harness.pipeline import run
from harness.tracking import StudyTracker, TrackingConfig

SEQUENCE = "synth-reenter"  # two objects


@dataclass(frozen=True)
class ProbeSettings:
    learn: bool = True


#: what the probe method saw, per sequence: (prompts, frame-0 features per object, plain frame-0 features)
SEEN: dict[str, tuple[list, list[torch.Tensor], torch.Tensor]] = {}


@register_method("prompt-probe-test")
class PromptProbe:
    """Learns the prompts and reads each object's features, then segments with plain label propagation: the
    plumbing alone, whatever the propagation."""

    settings_class = ProbeSettings

    def segment_sequence(
        self, ctx: SequenceContext, settings: ProbeSettings
    ) -> Iterator[tuple[int, np.ndarray]]:
        learning = PromptLearningSettings(steps=3, ensemble_size=1)
        prompts = learn_object_prompts(ctx, learning) if settings.learn else []
        per_object = [object_features(ctx, prompt)(0).cpu() for prompt in prompts]
        SEEN[ctx.name] = (prompts, per_object, ctx.features(0).cpu())
        yield from get_method("labelprop").segment_sequence(
            ctx, PropagationSettings(radius=4, n_last_frames=3)
        )


def config_for(root: Path, out: Path, method: dict, **overrides: object) -> RunConfig:
    settings = {
        "dataset.root": str(root),
        "dataset.sequences": [SEQUENCE],
        "backbone.name": "sd-tiny",
        "backbone.timestep": 100,
        "input.short_side": 64,
        "cache.dir": str(out / "cache"),
        "output_dir": str(out / "run"),
        "progress": False,
    }
    return RunConfig().with_overrides(settings | overrides).with_overrides({"method": method})


def prompt_counts(metrics: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if name.startswith("prompts_")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the method's settings -----------------------------------------------------------------------------


def test_method_settings_default_to_the_released_ones(synth_root: Path, tmp_path: Path) -> None:
    config = config_for(synth_root, tmp_path, {"name": "prompt-learning"})
    settings = config.method.settings
    assert isinstance(settings, PromptLearningMethodSettings) and settings.per_object is True
    assert settings.learning_settings() == PromptLearningSettings(
        steps=100, lr=0.01, timestep=100, ensemble_size=4
    )
    assert (settings.temperature, settings.topk, settings.radius, settings.n_last_frames) == (0.2, 15, 15, 28)
    tuned = config.with_overrides({"method.prompt_lr": 0.05, "method.prompt_steps": 7})
    assert tuned.method.settings.learning_settings().lr == 0.05
    assert tuned.to_dict()["method"]["prompt_steps"] == 7
    for bad, match in (
        ({"method.prompt_steps": 0}, "steps"),
        ({"method.prompt_seed": 1.5}, "prompt_seed"),
        ({"method.per_object": False}, "per_object"),
        ({"method.prompt_ensemble_size": 0}, "ensemble"),
    ):
        with pytest.raises(ConfigError, match=match):
            config.with_overrides(bad)


def test_prompt_learning_needs_stable_diffusion(synth_root: Path, tmp_path: Path) -> None:
    config = config_for(
        synth_root, tmp_path, {"name": "prompt-probe-test"}, **{"backbone.name": "random-conv"}
    )
    with pytest.raises(ConfigError, match="Stable Diffusion"):
        run(config)


# -- the plumbing ------------------------------------------------------------------------------------------


def test_pipeline_learns_caches_and_logs_the_vectors(
    synth_root: Path, tmp_path: Path, fresh_store: Callable[[str], tuple[str, str]]
) -> None:
    config = config_for(synth_root, tmp_path, {"name": "prompt-probe-test"})
    first = run(config)
    prompts, per_object, plain = SEEN[SEQUENCE]
    assert [p.channel for p in prompts] == [1, 2] and not any(p.cached for p in prompts)
    assert all(len(p.learned.losses) == 3 for p in prompts)
    # each object's features come from its own vector: different from each other and from the plain ones
    assert per_object[0].shape == plain.shape
    assert not torch.allclose(per_object[0], per_object[1]) and not torch.allclose(per_object[0], plain)
    assert prompt_counts(first.sequences[0].metrics) == {"prompts_learned": 2.0, "prompts_cached": 0.0}
    artifacts = Path(config.output_dir) / METHOD_ARTIFACTS / SEQUENCE / PROMPT_ARTIFACTS
    assert sorted(path.name for path in artifacts.iterdir()) == ["1.safetensors", "2.safetensors"]
    assert first.cache_stats is not None and first.cache_stats.misses > 0

    # a second run learns nothing and extracts nothing: vectors and conditioned features come from the caches
    second = run(config)
    again, per_object_again, _ = SEEN[SEQUENCE]
    assert prompt_counts(second.sequences[0].metrics) == {"prompts_learned": 0.0, "prompts_cached": 2.0}
    assert second.cache_stats is not None and second.cache_stats.misses == 0
    for before, after in zip(prompts, again, strict=True):
        assert torch.equal(before.learned.vector, after.learned.vector)
    for before, after in zip(per_object, per_object_again, strict=True):
        assert torch.equal(before, after)

    # tracking logs the vectors with the trial
    uri, artifact_location = fresh_store("prompt-tracking")
    tracker = StudyTracker(TrackingConfig(uri, "prompt-test", artifact_location), "prompt-study")
    parent = tracker.ensure_parent_run("prompt learning")
    trial = tracker.start_trial(parent, 0, {}, second.config)
    trial.log_result(second)
    trial.end()
    client = MlflowClient(tracking_uri=uri)
    listed = client.list_artifacts(trial.run_id, f"{METHOD_ARTIFACTS}/{SEQUENCE}/{PROMPT_ARTIFACTS}")
    assert sorted(Path(item.path).name for item in listed) == ["1.safetensors", "2.safetensors"]


def test_a_run_without_learning_keeps_no_artifacts(synth_root: Path, tmp_path: Path) -> None:
    config = config_for(synth_root, tmp_path, {"name": "prompt-probe-test", "learn": False})
    stale = Path(config.output_dir) / METHOD_ARTIFACTS / "old"
    stale.mkdir(parents=True)
    result = run(config)
    assert SEEN[SEQUENCE][0] == [] and prompt_counts(result.sequences[0].metrics) == {}
    assert not stale.exists()


# -- end to end ----------------------------------------------------------------------------------------------


def test_harness_run_with_prompt_learning(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "dataset": {"root": str(synth_root), "sequences": [SEQUENCE]},
                "backbone": {"name": "sd-tiny", "timestep": 100, "ensemble_size": 1},
                "input": {"short_side": 64},
                "method": {"name": "prompt-learning", "radius": 4, "n_last_frames": 3, "prompt_steps": 2},
                "cache": {"dir": str(tmp_path / "cache")},
                "output_dir": str(tmp_path / "run"),
                "progress": False,
            }
        )
    )
    assert main(["run", "--config", str(config_file), "--set", "method.prompt_ensemble_size=1"]) == 0
    assert "J&F" in capsys.readouterr().out
    predictions = tmp_path / "run" / "predictions" / SEQUENCE
    assert len(list(predictions.glob("*.png"))) == 12
    vectors = tmp_path / "run" / METHOD_ARTIFACTS / SEQUENCE / PROMPT_ARTIFACTS
    assert sorted(path.name for path in vectors.iterdir()) == ["1.safetensors", "2.safetensors"]
    # the run's resolved settings name the method and the learning
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["method"]["name"] == "prompt-learning" and written["method"]["prompt_steps"] == 2


def test_published_row_is_the_released_configuration() -> None:
    from harness.published import PUBLISHED

    entry = PUBLISHED["paper-sd21-prompt"]
    assert entry.jf == 70.5 and entry.weights == ("sd2.1",)
    config = RunConfig().with_overrides(dict(entry.overrides))
    assert (config.backbone.name, config.backbone.timestep, config.backbone.layer) == ("sd2.1", 100, 9)
    assert config.backbone.ensemble_size == 4 and config.method.name == "prompt-learning"
    settings = config.method.settings
    assert settings.per_object and (settings.temperature, settings.topk, settings.n_last_frames) == (
        0.2,
        15,
        28,
    )
    # src/config/eval_prompt_learning.yaml: lr 0.01, 100 steps (n_epochs), t 100, ensemble 4
    assert settings.learning_settings() == PromptLearningSettings(
        steps=100, lr=0.01, timestep=100, ensemble_size=4
    )
