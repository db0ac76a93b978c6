"""Prompt learning for Stable Diffusion: one learned text-embedding vector per object.

The paper's "SD-2.1 + prompt learning" (released code: github thanosDelatolas/diff-zvos,
``src/learn_prompts.py``, ``src/model/sd_feature_extractor_prompt_learning.py``,
``src/config/eval_prompt_learning.yaml``, ``src/eval_vos_prompts.py``) conditions the UNet on a one-token
prompt whose token is learned per object on the first frame:

* the prompt is ``"*"``; the text encoder's output for it (padded to the tokenizer's length, so
  ``[<start>, *, <end>, pad...]``) has its position 1, the ``*``, replaced by a free vector of the text
  encoder's width (1024 for SD 2.1), initialised to 1e-4 everywhere
  (``sd_feature_extractor_prompt_learning.py:322-336``, ``learn_prompts.py:88``);
* the prediction is the softmax attention probability on that position in the cross-attention of the
  first transformer of the finest up block (``up_blocks[3].attentions[0]``, the 14th cross-attention call
  of SD 2.1: ``cross_att_cnt == 13`` at ``sd_feature_extractor_prompt_learning.py:43-44``), averaged over
  heads (line 41) and ensemble members (line 349), on the latent grid;
* the loss is mean binary cross-entropy against the object's first-frame mask resized (nearest) to that
  grid (``learn_prompts.py:98-103``, ``arg_utils.py:124-125``); AdamW with lr 0.01, 100 steps, every step
  a new VAE posterior sample and new noise (``OneStepSDPipeline.__call__``, lines 265-268), t 100,
  ensemble 4, the UNet frozen (``eval_prompt_learning.yaml``);
* at evaluation, every frame is re-extracted once per object with that object's vector in place of the
  empty prompt, and the layer-9 features are taken from that conditioned pass
  (``eval_vos_prompts.py:111-123``, ``sd_feature_extractor_prompt_learning.py:348``).

Here the prediction is read by a forward hook that recomputes the attention probabilities of that one
module from its inputs (diffusers' own processor, e.g. scaled-dot-product attention, runs unchanged, so
features are the same as without the hook), and training stops the UNet right after that module. Noise is
drawn from a caller-given generator, so learning is reproducible. :class:`PromptedStableDiffusion` is a
:class:`Backbone` whose features are conditioned on a learned vector and whose identity includes it, so
features extracted with a vector are cached apart from plain ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import Backbone, LayerInfo, LayerKey, frame_generator
from backbones.errors import ConfigError
from backbones.sd import StableDiffusionBackbone

#: bump when the learning procedure changes, so that cached vectors are not reused
PROMPT_LEARNING_VERSION = "sd-prompt-learning-v1"

#: the token whose text-encoder output is replaced (0 is the start token, 1 the prompt's only token)
TOKEN_POSITION = 1


@dataclass(frozen=True)
class PromptLearningSettings:
    """How a vector is learned; the defaults are the released ones (``eval_prompt_learning.yaml``)."""

    steps: int = 100
    lr: float = 0.01
    timestep: int = 100
    ensemble_size: int = 4
    #: every entry of the initial vector (``learn_prompts.py:88``)
    init_value: float = 1e-4
    #: a prompt of exactly one token; its text-encoder output is replaced by the vector
    prompt: str = "*"

    def __post_init__(self) -> None:
        def positive_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not positive_int(self.steps):
            raise ConfigError(f"prompt learning steps must be a positive integer, got {self.steps!r}")
        if not positive_int(self.ensemble_size):
            raise ConfigError(
                f"prompt learning ensemble size must be a positive integer, got {self.ensemble_size!r}"
            )
        if isinstance(self.timestep, bool) or not isinstance(self.timestep, int):
            raise ConfigError(f"prompt learning time step must be an integer, got {self.timestep!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ConfigError(f"prompt learning rate must be a positive number, got {self.lr!r}")
        if isinstance(self.init_value, bool) or not isinstance(self.init_value, int | float):
            raise ConfigError(f"prompt learning init_value must be a number, got {self.init_value!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"the learned prompt must be a non-empty string, got {self.prompt!r}")
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "init_value", float(self.init_value))

    def fields(self) -> dict[str, object]:
        """JSON-ready values, with the procedure's version (for cache keys and run parameters)."""
        return {**asdict(self), "version": PROMPT_LEARNING_VERSION}


@dataclass(frozen=True)
class LearnedPrompt:
    """A learned vector (D,) float32 on the CPU and the loss before each optimiser step."""

    vector: torch.Tensor
    losses: tuple[float, ...]


class _StopForward(Exception):
    """Raised by the probe once the cross-attention map is read, to skip the rest of the UNet."""


# -- the text conditioning ------------------------------------------------------------------------------


def vector_width(backbone: StableDiffusionBackbone) -> int:
    """Width of a learned vector: the text encoder's hidden size (1024 for SD 2.1, 768 for SD 1.x)."""
    return int(backbone.text_encoder.config.hidden_size)


def prompt_embedding(backbone: StableDiffusionBackbone, prompt: str = "*") -> torch.Tensor:
    """(1, L, D) float32 text-encoder output of a one-token ``prompt`` padded to the tokenizer's length.

    Encoded like the pipeline's ``encode_prompt`` (no attention mask, last hidden state), as the released
    extractor does. A prompt of several tokens is refused: only position 1 would be learned.
    """
    tokenizer = backbone.tokenizer
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    words = tokenizer(prompt, add_special_tokens=False).input_ids
    if len(words) != 1:
        raise ConfigError(
            f"the learned prompt must be one token for this tokenizer; {prompt!r} is {len(words)} tokens"
        )
    with torch.no_grad():
        return backbone.text_encoder(ids.to(backbone.device))[0].float()


def conditioning_with_vector(embedding: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``embedding`` (1, L, D) with position 1 replaced by ``vector`` (D,); differentiable in ``vector``."""
    if vector.ndim != 1 or vector.shape[0] != embedding.shape[-1]:
        raise ConfigError(
            f"a learned prompt vector must have shape ({embedding.shape[-1]},), got {tuple(vector.shape)}"
        )
    vector = vector.to(embedding.device, embedding.dtype)
    before, after = embedding[:, :TOKEN_POSITION], embedding[:, TOKEN_POSITION + 1 :]
    return torch.cat([before, vector.reshape(1, 1, -1), after], dim=1)


def vector_digest(vector: torch.Tensor, prompt: str = "*") -> str:
    """sha256 of the vector's float32 bytes and the prompt: identifies a conditioning in cache keys."""
    raw = vector.detach().to("cpu", torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{prompt}@{TOKEN_POSITION}:".encode())
    digest.update(memoryview(raw))
    return digest.hexdigest()


# -- the cross-attention map --------------------------------------------------------------------------


def probe_attention_module(unet: nn.Module) -> nn.Module:
    """The cross-attention whose map is learned: the first transformer of the finest up block.

    In SD 1.x/2.x this is ``up_blocks[3].attentions[0]``, the 14th cross-attention the UNet calls (6 in the
    down blocks, 1 in the middle, 3 + 3 in up blocks 1 and 2), the one the released code reads.
    """
    block = unet.up_blocks[-1]
    attentions = getattr(block, "attentions", None)
    if not attentions:
        raise ConfigError("prompt learning needs cross-attention in the UNet's finest up block; it has none")
    return attentions[0].transformer_blocks[0].attn2


class _CrossAttentionProbe:
    """A forward hook on one cross-attention module that stores the mean over heads of the attention
    probability on one context position: (B, h * w)."""

    def __init__(self, module: nn.Module, position: int, *, stop: bool) -> None:
        self.module = module
        self.position = position
        self.stop = stop
        self.probabilities: torch.Tensor | None = None

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None:
            raise RuntimeError("the probed attention module was called without a text context")
        if module.norm_cross is not None:
            context = module.norm_encoder_hidden_states(context)
        query = module.head_to_batch_dim(module.to_q(hidden))
        key = module.head_to_batch_dim(module.to_k(context))
        probabilities = module.get_attention_scores(query, key, None)  # (B * heads, h * w, L)
        batch = hidden.shape[0]
        on_token = probabilities[..., self.position].float()
        self.probabilities = on_token.reshape(batch, module.heads, -1).mean(dim=1)
        if self.stop:
            raise _StopForward


def _autocast(backbone: StableDiffusionBackbone) -> Any:
    if backbone.autocast_dtype is None:
        return torch.autocast(device_type=backbone.device.type, enabled=False)
    return torch.autocast(device_type=backbone.device.type, dtype=backbone.autocast_dtype)


def attention_on_token(
    backbone: StableDiffusionBackbone, x_t: torch.Tensor, timestep: int, context: torch.Tensor
) -> torch.Tensor:
    """(N, h, w) attention probability on position 1 of ``context`` (1, L, D) at the probed module, mean
    over heads, for noisy latents ``x_t`` (N, 4, h, w); the UNet stops right after that module.

    Runs with gradients when the caller has them enabled (learning), so the map is differentiable in the
    context.
    """
    timestep = backbone.check_timestep(timestep)
    x_t = x_t.to(backbone.device, torch.float32)
    timesteps = torch.full((x_t.shape[0],), timestep, dtype=torch.long, device=backbone.device)
    probe = _CrossAttentionProbe(probe_attention_module(backbone.unet), TOKEN_POSITION, stop=True)
    handle = probe.module.register_forward_hook(probe, with_kwargs=True)
    try:
        with _autocast(backbone):
            backbone.unet(x_t, timesteps, encoder_hidden_states=context.expand(x_t.shape[0], -1, -1))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if probe.probabilities is None:
        raise RuntimeError("the UNet forward pass never reached the probed cross-attention")
    return probe.probabilities.reshape(x_t.shape[0], *x_t.shape[-2:])


def prompt_grid_size(backbone: StableDiffusionBackbone, input_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the cross-attention map (and target mask) for frames of ``input_size``: the latent grid."""
    height, width = (int(side) for side in input_size)
    return height // backbone.vae_scale, width // backbone.vae_scale


class _NoisyLatents:
    """Draws ensembles of noisy latents of one frame: a fresh VAE posterior sample and fresh noise each
    call, as the released pipeline does on every step (``OneStepSDPipeline.__call__``)."""

    def __init__(self, backbone: StableDiffusionBackbone, frame: torch.Tensor) -> None:
        self.backbone = backbone
        with torch.no_grad():
            posterior = backbone.vae.encode(frame.to(backbone.device, torch.float32)).latent_dist
        self.mean, self.std = posterior.mean.detach(), posterior.std.detach()

    def draw(self, timestep: int, ensemble_size: int, generator: torch.Generator) -> torch.Tensor:
        backbone = self.backbone
        shape = (ensemble_size, *self.mean.shape[1:])
        sample = torch.randn(shape, generator=generator, device=backbone.device, dtype=self.mean.dtype)
        z0 = self.mean + self.std * sample
        noise = torch.randn(shape, generator=generator, device=backbone.device, dtype=self.mean.dtype)
        shift = backbone.vae.config.get("shift_factor")
        if shift is not None:
            z0 = z0 - shift
        z0 = z0 * backbone.vae.config.scaling_factor
        timesteps = torch.full((ensemble_size,), timestep, dtype=torch.long, device=backbone.device)
        return backbone.scheduler.add_noise(z0, noise, timesteps)


def _check_frame(backbone: StableDiffusionBackbone, frame: torch.Tensor) -> tuple[int, int]:
    if frame.ndim != 4 or frame.shape[0] != 1 or frame.shape[1] != 3:
        raise ConfigError(f"prompt learning takes one frame of shape (1, 3, H, W), got {tuple(frame.shape)}")
    height, width = frame.shape[-2:]
    if height % backbone.size_multiple or width % backbone.size_multiple:
        raise ConfigError(
            f"frame size {height}x{width} is not a multiple of {backbone.size_multiple} "
            f"as backbone {backbone.name!r} requires"
        )
    return height, width


def cross_attention_map(
    backbone: StableDiffusionBackbone,
    frame: torch.Tensor,
    vector: torch.Tensor,
    *,
    timestep: int = 100,
    ensemble_size: int = 4,
    generator: torch.Generator,
    prompt: str = "*",
) -> torch.Tensor:
    """(h, w) attention on the learned token for one frame (1, 3, H, W), averaged over heads and an
    ensemble of noise draws: what the learning fits to the mask."""
    _check_frame(backbone, frame)
    context = conditioning_with_vector(prompt_embedding(backbone, prompt), vector)
    x_t = _NoisyLatents(backbone, frame).draw(timestep, ensemble_size, generator)
    with torch.no_grad():
        return attention_on_token(backbone, x_t, timestep, context).mean(dim=0).cpu()


def learn_prompt_vector(
    backbone: StableDiffusionBackbone,
    frame: torch.Tensor,
    target: torch.Tensor,
    settings: PromptLearningSettings = PromptLearningSettings(),
    *,
    generator: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
) -> LearnedPrompt:
    """Learn one object's vector on its first frame.

    ``frame`` is (1, 3, H, W) in [-1, 1]; ``target`` is the object's mask (h, w) in [0, 1] on the grid of
    :func:`prompt_grid_size` (the caller resizes it with nearest neighbour, as the released reader does).
    The UNet, VAE and text encoder stay frozen; only the vector is optimised.
    """
    if not isinstance(backbone, StableDiffusionBackbone):
        raise ConfigError(f"prompt learning needs a Stable Diffusion backbone, got {backbone.name!r}")
    input_size = _check_frame(backbone, frame)
    grid = prompt_grid_size(backbone, input_size)
    if tuple(target.shape) != grid:
        raise ConfigError(
            f"the prompt-learning target must be the mask on the {grid[0]}x{grid[1]} attention grid, "
            f"got shape {tuple(target.shape)}"
        )
    target = target.to(backbone.device, torch.float32)
    if target.numel() and not bool(((target >= 0) & (target <= 1)).all()):
        raise ConfigError("the prompt-learning target must hold values in [0, 1]")
    timestep = backbone.check_timestep(settings.timestep)
    latents = _NoisyLatents(backbone, frame)
    embedding = prompt_embedding(backbone, settings.prompt)
    vector = torch.full(
        (vector_width(backbone),), settings.init_value, device=backbone.device, requires_grad=True
    )
    optimiser = torch.optim.AdamW([vector], lr=settings.lr)
    losses: list[float] = []
    with torch.enable_grad():
        for step in range(settings.steps):
            optimiser.zero_grad(set_to_none=True)
            x_t = latents.draw(timestep, settings.ensemble_size, generator)
            context = conditioning_with_vector(embedding, vector)
            prediction = attention_on_token(backbone, x_t, timestep, context).mean(dim=0)
            loss = F.binary_cross_entropy(prediction, target)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    return LearnedPrompt(vector=vector.detach().to("cpu", torch.float32), losses=tuple(losses))


def prompt_generator(seed: int, sequence: str, object_id: int, device: torch.device | str) -> torch.Generator:
    """The generator of one object's learning noise: depends only on (seed, sequence, object)."""
    return frame_generator(seed, f"{sequence}#prompt-object-{object_id}", 0, device)


# -- features conditioned on a learned vector ----------------------------------------------------------


class PromptedStableDiffusion(Backbone):
    """A Stable Diffusion backbone whose UNet sees a learned vector in place of the empty prompt.

    Its identity is the base identity plus the vector's digest, so the feature cache keeps its features
    apart from the plain ones and from those of any other vector. Noise per frame is the base backbone's
    (seeded by seed, sequence and frame index), so features of two objects differ only by their vectors.
    """

    def __init__(self, base: StableDiffusionBackbone, vector: torch.Tensor, prompt: str = "*") -> None:
        if not isinstance(base, StableDiffusionBackbone):
            raise ConfigError(f"a learned prompt needs a Stable Diffusion backbone, got {base.name!r}")
        self.base = base
        self.vector = vector.detach().to("cpu", torch.float32)
        self.prompt = prompt
        self.name = base.name
        self.device = base.device
        self.num_train_timesteps = base.num_train_timesteps
        self.default_timestep = base.default_timestep
        self.default_layer = base.default_layer
        self.size_multiple = base.size_multiple
        self.context = conditioning_with_vector(prompt_embedding(base, prompt), self.vector).detach()
        self._identity = f"{base.identity()}/prompt={vector_digest(self.vector, prompt)}"

    def layers(self) -> dict[LayerKey, LayerInfo]:
        return self.base.layers()

    def identity(self) -> str:
        return self._identity

    def extract(
        self,
        frames: torch.Tensor,
        *,
        timestep: int,
        layers: list[LayerKey],
        ensemble_size: int,
        seed: int,
        sequence: str,
        frame_indices: list[int],
    ) -> dict[LayerKey, torch.Tensor]:
        return self.base.extract(
            frames,
            timestep=timestep,
            layers=layers,
            ensemble_size=ensemble_size,
            seed=seed,
            sequence=sequence,
            frame_indices=frame_indices,
            context=self.context,
        )


#: the key of a feature-extraction condition that holds a learned vector (see :func:`condition_backbone`)
CONDITION_VECTOR = "prompt_vector"
CONDITION_PROMPT = "prompt"


def condition_backbone(backbone: Backbone, condition: Mapping[str, Any] | None) -> Backbone:
    """The backbone that extracts features under ``condition``: ``{"prompt_vector": (D,) tensor}`` (and
    optionally ``"prompt"``, default ``"*"``) gives a :class:`PromptedStableDiffusion`; no condition gives
    ``backbone`` itself. Unknown keys and non-SD backbones are ConfigErrors."""
    if not condition:
        return backbone
    unknown = sorted(set(condition) - {CONDITION_VECTOR, CONDITION_PROMPT})
    if unknown or CONDITION_VECTOR not in condition:
        raise ConfigError(
            f"feature condition keys must be {CONDITION_VECTOR!r} (and optionally {CONDITION_PROMPT!r}), "
            f"got {sorted(condition)}"
        )
    vector = condition[CONDITION_VECTOR]
    if not isinstance(vector, torch.Tensor):
        raise ConfigError(f"{CONDITION_VECTOR!r} must be a tensor, got {type(vector).__name__}")
    if not isinstance(backbone, StableDiffusionBackbone):
        raise ConfigError(f"a learned prompt needs a Stable Diffusion backbone, got {backbone.name!r}")
    return PromptedStableDiffusion(backbone, vector, str(condition.get(CONDITION_PROMPT, "*")))


__all__ = [
    "CONDITION_PROMPT",
    "CONDITION_VECTOR",
    "PROMPT_LEARNING_VERSION",
    "TOKEN_POSITION",
    "LearnedPrompt",
    "PromptLearningSettings",
    "PromptedStableDiffusion",
    "attention_on_token",
    "condition_backbone",
    "conditioning_with_vector",
    "cross_attention_map",
    "learn_prompt_vector",
    "probe_attention_module",
    "prompt_embedding",
    "prompt_generator",
    "prompt_grid_size",
    "vector_digest",
    "vector_width",
]
