"""Feature extraction for one sequence through the cache.

Every (frame, layer) pair is looked up first; only frames with a missing layer are decoded, and they go
through the backbone in batches, one forward pass per batch for all of their missing layers. A sweep over
propagation settings therefore never touches the network or the frame files once the cache is warm, and
a layer sweep computes each frame once for all layers that one call asks for.

The next batch of frames is decoded on a background thread while the backbone runs on the current one, so
JPEG decoding and resizing hide behind the forward pass. A CUDA out-of-memory error halves the batch once;
a second one ends the call with a HarnessError that names the batch size, so a sweep's trial fails cleanly
instead of taking the worker down.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


_Batch = list[tuple[int, list[LayerKey]]]
"""(frame index, layers missing from the cache) for each frame of one backbone batch."""


class _OutOfMemoryRetry:
    """Halves the batch once after a CUDA out-of-memory error; a second one fails the call cleanly.

    The smaller batch stays in force for the rest of the sequence: the batch that failed is no larger than
    the ones after it, so they would fail too.
    """

    def __init__(self, sequence: str) -> None:
        self.sequence = sequence
        self.reduced_size: int | None = None
        self.first_failure: int | None = None

    def chunk_size(self, batch_length: int) -> int:
        return batch_length if self.reduced_size is None else min(batch_length, self.reduced_size)

    def record_failure(self, failed_size: int, error: BaseException) -> None:
        """Called inside the except block: halve, or raise HarnessError if that is no longer possible."""
        advice = "lower backbone.batch_size, the ensemble size or the input size"
        if self.first_failure is not None:
            raise HarnessError(
                f"CUDA out of memory extracting features of sequence {self.sequence!r} with a batch of "
                f"{failed_size} frame(s), after halving from {self.first_failure}; {advice}"
            ) from error
        if failed_size == 1:
            raise HarnessError(
                f"CUDA out of memory extracting features of sequence {self.sequence!r} with a batch of "
                f"1 frame; {advice}"
            ) from error
        self.first_failure = failed_size
        self.reduced_size = failed_size // 2

    @staticmethod
    def release_memory() -> None:
        """Hand the failed pass's cached blocks back once (never per frame: that would stall every batch)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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

    retry = _OutOfMemoryRetry(sequence)

    def load_batch(batch: _Batch) -> torch.Tensor:
        indices = [index for index, _ in batch]
        frames = load_frames(indices)
        expected = (len(indices), 3, height, width)
        if tuple(frames.shape) != expected:
            raise ValueError(
                f"load_frames({indices}) returned shape {tuple(frames.shape)}, expected {expected}"
            )
        return frames

    def store(batch: _Batch, computed: dict[LayerKey, torch.Tensor], batch_layers: list[LayerKey]) -> None:
        for layer in batch_layers:
            if layer not in computed or computed[layer].shape[0] != len(batch):
                raise RuntimeError(f"backbone {backbone.name!r} did not return layer {layer} for every frame")
        for position, (index, missing) in enumerate(batch):
            for layer in missing:
                features = computed[layer][position].detach().to("cpu", torch.float32)
                if cache is not None:
                    if cache.fp16:
                        features = features.half().float()
                    cache.put(spec.key(frame_ids[index], index, layer), features)
                outputs.store(layer, index, features)

    def compute(batch: _Batch, frames: torch.Tensor) -> None:
        batch_layers = list(dict.fromkeys(layer for _, missing in batch for layer in missing))
        start = 0
        while start < len(batch):
            stop = start + retry.chunk_size(len(batch))
            part = batch[start:stop]
            try:
                with torch.no_grad():
                    computed = backbone.extract(
                        frames[start:stop],
                        timestep=timestep,
                        layers=batch_layers,
                        ensemble_size=ensemble_size,
                        seed=seed,
                        sequence=sequence,
                        frame_indices=[index for index, _ in part],
                    )
            except torch.cuda.OutOfMemoryError as error:
                retry.record_failure(len(part), error)
                computed = None
            if computed is None:
                # outside the except block, so the failed pass's tensors (held by the traceback) are freed
                retry.release_memory()
                continue
            store(part, computed, batch_layers)
            del computed
            start = stop

    batches: list[_Batch] = []
    pending: _Batch = []
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
                batches.append(pending)
                pending = []
        if pending:
            batches.append(pending)
        if batches:
            # One worker decodes the next batch while the backbone runs on this one; at most two batches
            # of frames are held at once.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch-frames") as prefetcher:
                upcoming = prefetcher.submit(load_batch, batches[0])
                for position, batch in enumerate(batches):
                    frames = upcoming.result()
                    if position + 1 < len(batches):
                        upcoming = prefetcher.submit(load_batch, batches[position + 1])
                    compute(batch, frames)
                    del frames
                    bar.update(len(batch))

    stacked = outputs.result()
    return {layer: stacked[resolved[layer]] for layer in layers}
