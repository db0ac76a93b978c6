"""Feature extraction for one sequence through the cache.

Every (frame, layer) pair is looked up first; only frames with a missing layer are decoded, and they go
through the backbone in batches, one forward pass per batch for all of their missing layers. A sweep over
propagation settings therefore never touches the network or the frame files once the cache is warm, and
a layer sweep computes each frame once for all layers that one call asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from backbones.base import Backbone, LayerKey
from harness.errors import ConfigError, DataError, HarnessError
from harness.features.cache import DTYPES, FeatureCache, FeatureKey


@dataclass(frozen=True)
class _ExtractionSpec:
    """The settings shared by every cache key of one call."""

    backbone: str
    sequence: str
    timestep: int
    ensemble_size: int
    seed: int
    input_size: tuple[int, int]
    dtype: str

    def key(self, frame_id: str, frame_index: int, layer: LayerKey) -> FeatureKey:
        return FeatureKey(
            backbone=self.backbone,
            timestep=self.timestep,
            layer=str(layer),
            ensemble_size=self.ensemble_size,
            seed=self.seed,
            input_size=self.input_size,
            dtype=self.dtype,
            frame=frame_id,
            sequence=self.sequence,
            frame_index=frame_index,
        )


class _StackedOutputs:
    """Per-layer (T, C, h, w) tensors allocated once the first frame's shape is known and filled in place,
    so that at most one copy of the sequence's features is held."""

    def __init__(self, layers: list[LayerKey], num_frames: int, sequence: str) -> None:
        self.tensors: dict[LayerKey, torch.Tensor | None] = dict.fromkeys(layers)
        self.num_frames = num_frames
        self.sequence = sequence

    def store(self, layer: LayerKey, index: int, features: torch.Tensor) -> None:
        stacked = self.tensors[layer]
        if stacked is None:
            stacked = torch.empty((self.num_frames, *features.shape), dtype=torch.float32)
            self.tensors[layer] = stacked
        if features.shape != stacked.shape[1:]:
            raise HarnessError(
                f"layer {layer} features of frame {index} of sequence {self.sequence!r} have shape "
                f"{tuple(features.shape)}, other frames {tuple(stacked.shape[1:])}; the feature cache may "
                "hold entries of an older backbone version (run `harness cache clear`)"
            )
        stacked[index] = features

    def result(self) -> dict[LayerKey, torch.Tensor]:
        out: dict[LayerKey, torch.Tensor] = {}
        for layer, stacked in self.tensors.items():
            assert stacked is not None, "every frame was stored"
            out[layer] = stacked
        return out


def extract_sequence_features(
    backbone: Backbone,
    *,
    sequence: str,
    frame_ids: list[str],
    load_frames: Callable[[list[int]], torch.Tensor],
    input_size: tuple[int, int],
    timestep: int,
    layers: list[LayerKey],
    ensemble_size: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    dtype: str = "fp32",
    cache: FeatureCache | None = None,
    progress: bool = True,
) -> dict[LayerKey, torch.Tensor]:
    """Features of every frame of a sequence: {layer: (T, C, h, w) float32}, keyed by ``layers`` as given.

    ``frame_ids[i]`` is the content identity of frame ``i`` (see :func:`frame_identity`);
    ``load_frames(indices)`` returns those frames as a (B, 3, H, W) batch in [-1, 1] at ``input_size``.
    ``dtype`` only labels the cache entries: the backbone was built for that precision by its caller.
    With an fp16 cache, freshly computed features are rounded through float16 as well, so a cold and a warm
    run return identical values.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if ensemble_size < 1:
        raise ConfigError(f"ensemble size must be at least 1, got {ensemble_size}")
    if not layers:
        raise ConfigError("no feature layers requested")
    if not frame_ids:
        raise DataError(f"sequence {sequence!r} has no frames")
    backbone.check_timestep(timestep)
    resolved = {layer: backbone.resolve_layer(layer) for layer in layers}
    unique_layers = list(dict.fromkeys(resolved.values()))
    height, width = (int(side) for side in input_size)
    spec = _ExtractionSpec(
        backbone=backbone.identity(),
        sequence=sequence,
        timestep=timestep,
        ensemble_size=ensemble_size,
        seed=seed,
        input_size=(height, width),
        dtype=dtype,
    )
    outputs = _StackedOutputs(unique_layers, len(frame_ids), sequence)

    def compute(batch: list[tuple[int, list[LayerKey]]]) -> None:
        indices = [index for index, _ in batch]
        batch_layers = list(dict.fromkeys(layer for _, missing in batch for layer in missing))
        frames = load_frames(indices)
        expected = (len(indices), 3, height, width)
        if tuple(frames.shape) != expected:
            raise ValueError(
                f"load_frames({indices}) returned shape {tuple(frames.shape)}, expected {expected}"
            )
        with torch.no_grad():
            computed = backbone.extract(
                frames,
                timestep=timestep,
                layers=batch_layers,
                ensemble_size=ensemble_size,
                seed=seed,
                sequence=sequence,
                frame_indices=indices,
            )
        del frames
        for layer in batch_layers:
            if layer not in computed or computed[layer].shape[0] != len(indices):
                raise RuntimeError(f"backbone {backbone.name!r} did not return layer {layer} for every frame")
        for position, (index, missing) in enumerate(batch):
            for layer in missing:
                features = computed[layer][position].detach().to("cpu", torch.float32)
                if cache is not None:
                    if cache.fp16:
                        features = features.half().float()
                    cache.put(spec.key(frame_ids[index], index, layer), features)
                outputs.store(layer, index, features)

    pending: list[tuple[int, list[LayerKey]]] = []
    with tqdm(total=len(frame_ids), desc=f"features {sequence}", unit="frame", disable=not progress) as bar:
        for index, frame_id in enumerate(frame_ids):
            missing: list[LayerKey] = []
            for layer in unique_layers:
                cached = cache.get(spec.key(frame_id, index, layer)) if cache is not None else None
                if cached is None:
                    missing.append(layer)
                else:
                    outputs.store(layer, index, cached)
            if not missing:
                bar.update(1)
                continue
            pending.append((index, missing))
            if len(pending) == batch_size:
                compute(pending)
                bar.update(len(pending))
                pending = []
        if pending:
            compute(pending)
            bar.update(len(pending))

    stacked = outputs.result()
    return {layer: stacked[resolved[layer]] for layer in layers}
