"""Prompt learning through the pipeline: a method with a ``prompt`` setting learns vectors per object on
sd-tiny, reads conditioned features through the cache, keeps the vectors as run artifacts, and tracking
logs them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.methods import get_method, register_method
from harness.methods.base import METHOD_ARTIFACTS, SequenceContext
from harness.methods.labelprop import PropagationSettings
from harness.methods.prompting import PROMPT_ARTIFACTS, PromptSettings, learn_object_prompts, object_features
from harness.pipeline import run
from harness.tracking import StudyTracker, TrackingConfig

SEQUENCE = "synth-reenter"  # two objects


@dataclass(frozen=True)
class ProbeSettings:
    prompt: PromptSettings = field(default_factory=PromptSettings)


#: what the probe method saw, per sequence: (prompts, frame-0 features per object, plain frame-0 features)
SEEN: dict[str, tuple[list, list[torch.Tensor], torch.Tensor]] = {}


@register_method("prompt-probe-test")
class PromptProbe:
    """Learns the prompts and reads each object's features, then segments with plain label propagation (the
    released per-object propagation is another method's business; this checks the plumbing)."""

    settings_class = ProbeSettings

    def segment_sequence(
        self, ctx: SequenceContext, settings: ProbeSettings
    ) -> Iterator[tuple[int, np.ndarray]]:
        prompts = learn_object_prompts(ctx, settings.prompt) if settings.prompt.learn else []
        per_object = [object_features(ctx, prompt)(0).cpu() for prompt in prompts]
        SEEN[ctx.name] = (prompts, per_object, ctx.features(0).cpu())
        yield from get_method("labelprop").segment_sequence(
            ctx, PropagationSettings(radius=4, n_last_frames=3)
        )


def config_for(root: Path, out: Path, **overrides: object) -> RunConfig:
    settings = {
        "dataset.root": str(root),
        "dataset.sequences": [SEQUENCE],
        "backbone.name": "sd-tiny",
        "backbone.timestep": 100,
        "input.short_side": 64,
        "method.name": "prompt-probe-test",
        "method.prompt": {"learn": True, "steps": 3, "ensemble_size": 1},
        "cache.dir": str(out / "cache"),
        "output_dir": str(out / "run"),
        "progress": False,
    }
    return RunConfig().with_overrides(settings | overrides)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_prompt_settings_parse_and_validate(synth_root: Path, tmp_path: Path) -> None:
    base = config_for(synth_root, tmp_path)
    config = base.with_overrides({"method.prompt.lr": 0.05})  # how a study sets one prompt setting
    assert config.method.settings.prompt == PromptSettings(learn=True, steps=3, lr=0.05, ensemble_size=1)
    assert config.to_dict()["method"]["prompt"]["lr"] == 0.05
    with pytest.raises(ConfigError, match="steps"):
        base.with_overrides({"method.prompt.steps": 0})
    with pytest.raises(ConfigError, match="learn"):
        base.with_overrides({"method.prompt.learn": "yes"})


def test_prompt_learning_needs_stable_diffusion(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Stable Diffusion"):
        run(config_for(synth_root, tmp_path, **{"backbone.name": "random-conv"}))


def test_pipeline_learns_caches_and_logs_the_vectors(
    synth_root: Path, tmp_path: Path, fresh_store: Callable[[str], tuple[str, str]]
) -> None:
    config = config_for(synth_root, tmp_path)
    first = run(config)
    prompts, per_object, plain = SEEN[SEQUENCE]
    assert [p.channel for p in prompts] == [1, 2] and not any(p.cached for p in prompts)
    assert all(len(p.learned.losses) == 3 for p in prompts)
    # each object's features come from its own vector: different from each other and from the plain ones
    assert per_object[0].shape == plain.shape
    assert not torch.allclose(per_object[0], per_object[1]) and not torch.allclose(per_object[0], plain)
    outcome = first.sequences[0]
    assert outcome.metrics == {"prompts_learned": 2.0, "prompts_cached": 0.0}
    artifacts = Path(config.output_dir) / METHOD_ARTIFACTS / SEQUENCE / PROMPT_ARTIFACTS
    assert sorted(path.name for path in artifacts.iterdir()) == ["1.safetensors", "2.safetensors"]
    misses = first.cache_stats.misses

    # a second run learns nothing and extracts nothing: vectors and conditioned features come from the caches
    second = run(config)
    again, per_object_again, _ = SEEN[SEQUENCE]
    assert second.sequences[0].metrics == {"prompts_learned": 0.0, "prompts_cached": 2.0}
    assert second.cache_stats.misses == 0 and misses > 0
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
    config = config_for(synth_root, tmp_path, **{"method.prompt": {"learn": False}})
    stale = Path(config.output_dir) / METHOD_ARTIFACTS / "old"
    stale.mkdir(parents=True)
    result = run(config)
    assert SEEN[SEQUENCE][0] == [] and result.sequences[0].metrics == {}
    assert not stale.exists()
