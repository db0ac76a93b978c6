"""SD prompt learning as a method setting: learn (or load) one vector per object for a sequence, and read
features conditioned on it (see backbones.sd_prompt for what is computed, harness.features.prompts for
the cache).

A method with a ``prompt: PromptSettings`` setting calls :func:`learn_object_prompts` once per sequence and
:func:`object_features` once per object; with ``learn: false`` (the default) nothing here runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from backbones.sd import StableDiffusionBackbone
from backbones.sd_prompt import CONDITION_VECTOR, PromptLearningSettings
from harness.errors import ConfigError
from harness.features.prompts import ObjectPrompt, PromptCache, learn_sequence_prompts, write_prompt_artifacts
from harness.methods.base import FeatureReader, SequenceContext

#: subfolder of a sequence's artifact folder that holds its learned vectors
PROMPT_ARTIFACTS = "prompts"


@dataclass(frozen=True)
class PromptSettings:
    """``method.prompt``: learn a vector per object on frame 0; the defaults are the released ones.

    ``timestep`` and ``ensemble_size`` are those of the learning; the features are then extracted with the
    run's backbone settings (the released configuration uses t 100, ensemble 4 for both).
    """

    learn: bool = False
    steps: int = 100
    lr: float = 0.01
    timestep: int = 100
    ensemble_size: int = 4
    init_value: float = 1e-4
    #: seeds the learning noise of each (sequence, object)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.learn, bool):
            raise ConfigError(f"prompt.learn must be true or false, got {self.learn!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"prompt.seed must be an integer, got {self.seed!r}")
        self.learning_settings()  # every other value is checked where it is used

    def learning_settings(self) -> PromptLearningSettings:
        return PromptLearningSettings(
            steps=self.steps,
            lr=self.lr,
            timestep=self.timestep,
            ensemble_size=self.ensemble_size,
            init_value=self.init_value,
        )


def learn_object_prompts(ctx: SequenceContext, settings: PromptSettings) -> list[ObjectPrompt]:
    """One :class:`harness.features.prompts.ObjectPrompt` per object channel 1..K of ``ctx.first_labels``.

    Vectors are cached beside the run's features (``ctx.cache_root``) and written to the sequence's artifact
    folder (``ctx.artifact_dir / "prompts"``); ``ctx.metrics`` counts learned and cached vectors.
    """
    if not isinstance(ctx.backbone, StableDiffusionBackbone):
        name = ctx.backbone.name if ctx.backbone is not None else None
        raise ConfigError(
            f"prompt learning needs a Stable Diffusion backbone (sd2.1, sd-tiny, ...), got {name!r}"
        )
    if ctx.load_frames is None:
        raise ConfigError("prompt learning needs the sequence's frames, and this context gives none")
    cache = PromptCache.beside_features(ctx.cache_root) if ctx.cache_root is not None else None
    prompts = learn_sequence_prompts(
        ctx.backbone,
        sequence=ctx.name,
        first_frame=ctx.load_frames([0]),
        first_labels=ctx.first_labels,
        object_ids=list(range(1, ctx.num_classes)),
        settings=settings.learning_settings(),
        seed=settings.seed,
        cache=cache,
    )
    if ctx.artifact_dir is not None:
        write_prompt_artifacts(prompts, ctx.artifact_dir / PROMPT_ARTIFACTS)
    cached = sum(prompt.cached for prompt in prompts)
    ctx.metrics["prompts_learned"] = ctx.metrics.get("prompts_learned", 0.0) + len(prompts) - cached
    ctx.metrics["prompts_cached"] = ctx.metrics.get("prompts_cached", 0.0) + cached
    return prompts


def object_features(ctx: SequenceContext, prompt: ObjectPrompt) -> FeatureReader:
    """Frame -> features of the run's layer, t and ensemble, extracted with ``prompt``'s vector in place of
    the empty prompt (cached under a key that includes the vector)."""
    return ctx.extract_features(condition={CONDITION_VECTOR: prompt.learned.vector})


__all__ = ["PROMPT_ARTIFACTS", "PromptSettings", "learn_object_prompts", "object_features"]
