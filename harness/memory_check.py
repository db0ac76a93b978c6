"""Refuse, before any work, a run whose memory cannot fit (``input.short_side: 100000`` once drove a machine
into the OOM killer).

The estimate adds what a run holds at once: the backbone's extraction pass (its own
:meth:`Backbone.estimate_memory`), the features of the longest sequence (the pipeline keeps a whole
sequence's maps of the requested layer), and the propagation memory (first frame + the last N frames:
frames x grid x (channels + classes)) with its bounded working set and the upsampled soft output. On a
GPU, extraction retries smaller chunks down to one frame when it runs out of memory, so only one frame's
ensemble has to fit there; on a CPU the whole batch does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from backbones.base import FLOAT32_BYTES, Backbone, LayerKey
from harness.config import MAX_SHORT_SIDE, RunConfig
from harness.data import Dataset
from harness.errors import ConfigError, NotEnoughMemoryError
from harness.frames import network_input_size

#: the propagation's windowed affinity work is planned to stay under this (harness.methods.labelprop.affinity)
PROPAGATION_WORKING_BYTES = 256 * 2**20
#: a margin for what is not counted (the interpreter, libraries, allocator slack)
OVERHEAD_BYTES = 512 * 2**20

_GIB = 2**30


@dataclass(frozen=True)
class AvailableMemory:
    """Bytes free for the run: host RAM, and the GPU's free memory when the backbone runs on one."""

    host: int
    device: int | None = None


@dataclass(frozen=True)
class RunMemoryEstimate:
    """What a run needs at once, in bytes, and where (``device`` is None for a CPU run)."""

    input_size: tuple[int, int]
    grid: tuple[int, int]
    extraction: int
    sequence_features: int
    propagation: int
    host: int
    device: int | None

    def describe(self) -> str:
        parts = (
            f"input {self.input_size[0]}x{self.input_size[1]}, feature grid {self.grid[0]}x{self.grid[1]}: "
            f"extraction {_gib(self.extraction)}, features of the longest sequence "
            f"{_gib(self.sequence_features)}, propagation {_gib(self.propagation)}"
        )
        return parts


def _gib(size: int) -> str:
    return f"{size / _GIB:.1f} GiB"


def _cgroup_limit() -> int | None:
    """Bytes this process's cgroup (v2) may still use, if it is limited."""
    folder = Path("/sys/fs/cgroup")
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> AvailableMemory:
    """Free host memory (MemAvailable, capped by a cgroup limit) and free GPU memory on ``device``."""
    try:
        import psutil

        host = int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_limit()
    if limit is not None:
        host = min(host, limit)
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = int(torch.cuda.mem_get_info(device)[0])
    return AvailableMemory(host=host, device=gpu)


def estimate_run_memory(
    config: RunConfig, dataset: Dataset, backbone: Backbone, layer: LayerKey
) -> RunMemoryEstimate:
    """The memory of the run's most demanding sequence (largest frames x most frames)."""
    short_side = config.input.short_side
    if short_side > MAX_SHORT_SIDE:  # InputConfig refuses it already; a hand-built config may not
        raise ConfigError(
            f"input.short_side {short_side} is above the largest supported {MAX_SHORT_SIDE} "
            "(the paper uses 480)"
        )
    info = backbone.layers()[layer]
    ensemble = backbone.resolve_ensemble_size(config.backbone.ensemble_size)
    on_gpu = backbone.device.type == "cuda"
    frames_per_pass = 1 if on_gpu else config.backbone.batch_size
    # a method without a frame memory (none besides labelprop here) keeps the first frame only
    slots = 1 + int(getattr(config.method.settings, "n_last_frames", 0))
    worst: RunMemoryEstimate | None = None
    for sequence in dataset.sequences:
        width, height = sequence.frame_size()
        size = network_input_size(width, height, short_side, backbone.size_multiple, layout=dataset.layout)
        grid = (math.ceil(size[0] / info.stride), math.ceil(size[1] / info.stride))
        cells = grid[0] * grid[1]
        frames = len(sequence.frames)
        extraction = backbone.estimate_memory(size, [layer]).peak(min(frames_per_pass, frames), ensemble)
        features = FLOAT32_BYTES * frames * info.channels * cells
        classes = len(sequence.object_ids()) + 1
        propagation = (
            FLOAT32_BYTES * min(slots, frames) * cells * (info.channels + classes) * 3 // 2  # + a bf16 copy
            + PROPAGATION_WORKING_BYTES
            + 3 * FLOAT32_BYTES * classes * (size[0] * size[1] + height * width)  # the upsampled soft output
        )
        if on_gpu:
            host = 2 * features + OVERHEAD_BYTES
            device: int | None = max(extraction, features + propagation)
        else:
            host = extraction + features + propagation + OVERHEAD_BYTES
            device = None
        estimate = RunMemoryEstimate(size, grid, extraction, features, propagation, host, device)
        if worst is None or (estimate.device or 0, estimate.host) > (worst.device or 0, worst.host):
            worst = estimate
    if worst is None:
        raise ConfigError("the dataset selection has no sequence")
    return worst


def check_run_memory(
    config: RunConfig,
    dataset: Dataset,
    backbone: Backbone,
    layer: LayerKey,
    *,
    available: AvailableMemory | None = None,
) -> RunMemoryEstimate:
    """Raise NotEnoughMemoryError (a ConfigError), saying what to lower, when the estimate exceeds the free
    memory."""
    estimate = estimate_run_memory(config, dataset, backbone, layer)
    free = available if available is not None else available_memory(backbone.device)
    hint = (
        "lower input.short_side, backbone.batch_size or backbone.ensemble_size "
        "(or method.n_last_frames), or free memory"
    )
    if estimate.host > free.host:
        raise NotEnoughMemoryError(
            f"this run needs about {_gib(estimate.host)} of RAM but {_gib(free.host)} is free "
            f"({estimate.describe()}); {hint}"
        )
    if estimate.device is not None and free.device is not None and estimate.device > free.device:
        raise NotEnoughMemoryError(
            f"this run needs about {_gib(estimate.device)} of GPU memory on {backbone.device} but "
            f"{_gib(free.device)} is free ({estimate.describe()}); {hint}"
        )
    return estimate
