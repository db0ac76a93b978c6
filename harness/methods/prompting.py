"""``prompt-learning``: the paper's SD-2.1 + prompt learning, a registered method.

Per sequence: one vector per object is learned on frame 0 (or read from the cache), every frame is
extracted again once per object with that object's vector in place of the empty prompt (layer, t and
ensemble of the run's backbone settings; the released ones are layer 9, t 100, ensemble 4), and the objects
are propagated one at a time and aggregated (label propagation's per-object mode, through its
``segment_per_object`` hook). What is learned and how: backbones.sd_prompt; the vector cache:
harness.features.prompts. Released code: github thanosDelatolas/diff-zvos ``src/learn_prompts.py`` and
``src/eval_vos_prompts.py``.

The settings are label propagation's (all of ``method.<setting>`` as for labelprop, ``per_object`` true) plus
the learning's as flat ``prompt_*`` keys, so a study can set any of them with one dotted key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from backbones.sd import StableDiffusionBackbone
from backbones.sd_prompt import CONDITION_VECTOR, PromptLearningSettings
from harness.errors import ConfigError
from harness.features.prompts import ObjectPrompt, PromptCache, learn_sequence_prompts, write_prompt_artifacts
from harness.methods import register_method
from harness.methods.base import FeatureReader, SequenceContext
from harness.methods.labelprop.method import segment_per_object
from harness.methods.labelprop.sequence import PropagationSettings

#: subfolder of a sequence's artifact folder that holds its learned vectors
PROMPT_ARTIFACTS = "prompts"


@dataclass(frozen=True)
class PromptLearningMethodSettings(PropagationSettings):
    """Label propagation's settings, per object, and the prompt learning's (defaults: the released ones,
    ``config/eval_prompt_learning.yaml``). ``prompt_timestep`` and ``prompt_ensemble_size`` are the
    learning's; the features use the run's backbone settings."""

    per_object: bool = True
    prompt_steps: int = 100
    prompt_lr: float = 0.01
    prompt_timestep: int = 100
    prompt_ensemble_size: int = 4
    prompt_init_value: float = 1e-4
    #: seeds the learning noise of each (sequence, object)
    prompt_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_object is not True:
            raise ConfigError(
                "method prompt-learning propagates each object with its own features: per_object must be true"
            )
        if isinstance(self.prompt_seed, bool) or not isinstance(self.prompt_seed, int):
            raise ConfigError(f"prompt_seed must be an integer, got {self.prompt_seed!r}")
        self.learning_settings()  # the learning's own checks, when the config is read

    def learning_settings(self) -> PromptLearningSettings:
        return PromptLearningSettings(
            steps=self.prompt_steps,
            lr=self.prompt_lr,
            timestep=self.prompt_timestep,
            ensemble_size=self.prompt_ensemble_size,
            init_value=self.prompt_init_value,
        )


def learn_object_prompts(
    ctx: SequenceContext, settings: PromptLearningSettings, *, seed: int = 0
) -> list[ObjectPrompt]:
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
        settings=settings,
        seed=seed,
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


@register_method("prompt-learning")
class PromptLearning:
    """Learned prompt per object (SD only), features per object, per-object label propagation."""

    settings_class = PromptLearningMethodSettings

    def segment_sequence(
        self, ctx: SequenceContext, settings: PromptLearningMethodSettings
    ) -> Iterator[tuple[int, np.ndarray]]:
        prompts = learn_object_prompts(ctx, settings.learning_settings(), seed=settings.prompt_seed)
        by_channel = {prompt.channel: prompt for prompt in prompts}
        yield from segment_per_object(
            ctx, settings, lambda channel: object_features(ctx, by_channel[channel])
        )


__all__ = [
    "PROMPT_ARTIFACTS",
    "PromptLearning",
    "PromptLearningMethodSettings",
    "learn_object_prompts",
    "object_features",
]
