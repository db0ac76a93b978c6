"""Learned prompt vectors (SD prompt learning, :mod:`backbones.sd_prompt`) on disk, and the per-sequence
step that learns or loads one vector per object.

A vector takes a hundred UNet forward and backward passes to learn, so it is cached like features: keyed by
the model identity, sequence, object, the content of frame 0 and of the object's mask on the attention
grid, the input size, the seed and the learning settings. Entries are single safetensors files written
atomically (temporary file + ``os.replace``), so workers sharing the folder never read half an entry.
Features extracted with a vector are cached by the feature cache under the identity of
:class:`backbones.sd_prompt.PromptedStableDiffusion`, which includes the vector's digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_tensors

from backbones.sd import StableDiffusionBackbone
from backbones.sd_prompt import (
    LearnedPrompt,
    PromptLearningSettings,
    learn_prompt_vector,
    prompt_generator,
    prompt_grid_size,
)
from harness.errors import ConfigError
from harness.features.cache import _write_atomically
from harness.methods.labelprop.sequence import labels_to_onehot

ENTRY_FORMAT = "diffvos-prompt/1"
TENSOR_NAME = "vector"
ENTRY_SUFFIX = ".prompt.safetensors"
#: where prompt vectors live inside a feature cache folder
PROMPTS_FOLDER = "prompts"


@dataclass(frozen=True)
class PromptKey:
    """Everything a learned vector depends on."""

    backbone: str
    sequence: str
    object_id: int
    frame: str
    mask: str
    input_size: tuple[int, int]
    seed: int
    settings: str

    def canonical_json(self) -> str:
        values = asdict(self)
        values["input_size"] = [int(side) for side in self.input_size]
        return json.dumps(values, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()


def tensor_identity(frame: torch.Tensor) -> str:
    """sha256 of a network input's shape and float32 bytes: frame-0 content as the backbone sees it."""
    values = frame.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(values.shape)).encode())
    digest.update(memoryview(values.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


@dataclass
class PromptCacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0


class PromptCache:
    """Learned vectors on disk, one file per :class:`PromptKey` (``root/<digest>.prompt.safetensors``)."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"prompt cache folder {root} exists and is not a folder")
        self.root = root
        self.stats = PromptCacheStats()

    @classmethod
    def beside_features(cls, feature_cache_root: Path) -> PromptCache:
        """The prompt cache in ``<feature cache>/prompts``. The feature cache's size cap, ``harness cache
        info`` and ``harness cache clear`` leave it alone: vectors are a few KiB each and expensive to
        learn (delete the folder to drop them)."""
        return cls(Path(feature_cache_root) / PROMPTS_FOLDER)

    def path_for(self, key: PromptKey) -> Path:
        return self.root / f"{key.digest()}{ENTRY_SUFFIX}"

    def get(self, key: PromptKey) -> LearnedPrompt | None:
        """The stored vector and losses; None when absent or unreadable (an unreadable entry is deleted)."""
        path = self.path_for(key)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                vector = handle.get_tensor(TENSOR_NAME) if list(handle.keys()) == [TENSOR_NAME] else None
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError):
            vector, metadata = None, {}
        valid = (
            vector is not None
            and vector.ndim == 1
            and vector.dtype == torch.float32
            and metadata.get("format") == ENTRY_FORMAT
            and metadata.get("key") == key.canonical_json()
        )
        losses: tuple[float, ...] = ()
        if valid:
            try:
                losses = tuple(float(value) for value in json.loads(metadata.get("losses", "")))
            except (ValueError, TypeError):
                valid = False
        if not valid:
            path.unlink(missing_ok=True)
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        assert vector is not None
        return LearnedPrompt(vector=vector, losses=losses)

    def put(self, key: PromptKey, learned: LearnedPrompt) -> Path:
        metadata = {
            "format": ENTRY_FORMAT,
            "key": key.canonical_json(),
            "losses": json.dumps(list(learned.losses)),
        }
        tensor = learned.vector.detach().to("cpu", torch.float32).contiguous()
        path = self.path_for(key)
        _write_atomically(path, serialize_tensors({TENSOR_NAME: tensor}, metadata=metadata))
        return path


@dataclass(frozen=True)
class ObjectPrompt:
    """One object's learned vector, and whether it came from the cache."""

    channel: int
    object_id: int
    learned: LearnedPrompt
    cached: bool


def object_targets(first_labels: np.ndarray, num_classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """(num_classes, h, w) one-hot first-frame masks on the attention grid (PIL nearest, as released)."""
    return labels_to_onehot(first_labels, num_classes, grid)


def learn_sequence_prompts(
    backbone: StableDiffusionBackbone,
    *,
    sequence: str,
    first_frame: torch.Tensor,
    first_labels: np.ndarray,
    object_ids: list[int],
    settings: PromptLearningSettings,
    seed: int,
    cache: PromptCache | None,
    first_frame_id: str | None = None,
    on_learned: Callable[[ObjectPrompt], None] | None = None,
) -> list[ObjectPrompt]:
    """One vector per object (channels 1..K of ``first_labels``, dataset ids ``object_ids``), each
    learned on frame 0 (``first_frame``: (1, 3, H, W) in [-1, 1]) or read from ``cache``.

    ``first_frame_id`` identifies frame 0's content in the cache key (default: the hash of
    ``first_frame`` itself, which also covers the resize to the input size).
    """
    if not isinstance(backbone, StableDiffusionBackbone):
        raise ConfigError(f"prompt learning needs a Stable Diffusion backbone, got {backbone.name!r}")
    input_size = (int(first_frame.shape[-2]), int(first_frame.shape[-1]))
    grid = prompt_grid_size(backbone, input_size)
    targets = object_targets(first_labels, len(object_ids) + 1, grid)
    settings_json = json.dumps(settings.fields(), sort_keys=True, separators=(",", ":"))
    prompts: list[ObjectPrompt] = []
    for channel, object_id in enumerate(object_ids, start=1):
        target = targets[channel]
        key = PromptKey(
            backbone=backbone.identity(),
            sequence=sequence,
            object_id=int(object_id),
            frame=first_frame_id if first_frame_id is not None else tensor_identity(first_frame),
            mask=tensor_identity(target),
            input_size=input_size,
            seed=seed,
            settings=settings_json,
        )
        learned = cache.get(key) if cache is not None else None
        cached = learned is not None
        if learned is None:
            generator = prompt_generator(seed, sequence, int(object_id), backbone.device)
            learned = learn_prompt_vector(backbone, first_frame, target, settings, generator=generator)
            if cache is not None:
                cache.put(key, learned)
        prompt = ObjectPrompt(channel=channel, object_id=int(object_id), learned=learned, cached=cached)
        if on_learned is not None:
            on_learned(prompt)
        prompts.append(prompt)
    return prompts


def write_prompt_artifacts(prompts: list[ObjectPrompt], folder: Path) -> list[Path]:
    """One ``<object id>.safetensors`` per object (the vector, its losses as metadata) for run artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for prompt in prompts:
        path = folder / f"{prompt.object_id}.safetensors"
        metadata = {"object_id": str(prompt.object_id), "losses": json.dumps(list(prompt.learned.losses))}
        tensor = prompt.learned.vector.detach().to("cpu", torch.float32).contiguous()
        _write_atomically(path, serialize_tensors({TENSOR_NAME: tensor}, metadata=metadata))
        written.append(path)
    return written


__all__ = [
    "ObjectPrompt",
    "PromptCache",
    "PromptCacheStats",
    "PromptKey",
    "learn_sequence_prompts",
    "object_targets",
    "tensor_identity",
    "write_prompt_artifacts",
]
