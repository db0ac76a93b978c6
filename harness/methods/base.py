"""What a segmentation method receives for one sequence, and what it must provide.

The pipeline owns the dataset, the backbone and the feature cache; a method sees one sequence through a
:class:`SequenceContext` (lazy features, first-frame labels, optional ground truth) and yields masks. This
keeps methods free of I/O plumbing and lets a new method be a single file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from backbones import Backbone

FeatureReader = Callable[[int], torch.Tensor]

#: folder of a run's output directory where methods leave files (one subfolder per sequence, given to the
#: method as SequenceContext.artifact_dir); tracking logs it as artifacts under the same name
METHOD_ARTIFACTS = "method-artifacts"

#: per-sequence metrics with these name prefixes are rates (e.g. the correspondence diagnostics): a run
#: reports their mean over the sequences that have them; every other metric is a count, summed
MEAN_METRIC_PREFIXES = ("corr_",)
#: names ending so are shares too (Training-Free-VOS's ``tfvos_confident_fraction``), averaged likewise
MEAN_METRIC_SUFFIXES = ("_fraction",)


def _is_rate(name: str) -> bool:
    return name.startswith(MEAN_METRIC_PREFIXES) or name.endswith(MEAN_METRIC_SUFFIXES)


def aggregate_sequence_metrics(per_sequence: list[dict[str, float]]) -> dict[str, float]:
    """A run's method metrics from its sequences' ``SequenceContext.metrics``: means of rates (see
    :data:`MEAN_METRIC_PREFIXES`, :data:`MEAN_METRIC_SUFFIXES`) over the sequences that report them,
    sums of counts."""
    totals: dict[str, float] = {}
    reported: dict[str, int] = {}
    for metrics in per_sequence:
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value)
            reported[name] = reported.get(name, 0) + 1
    return {name: total / reported[name] if _is_rate(name) else total for name, total in totals.items()}


@dataclass(frozen=True)
class SequenceContext:
    """One sequence as a method sees it (all frame indices are 0..num_frames-1).

    ``features(t)`` is frame t's (C, h, w) float32 map of the run's backbone, time step and layer, read
    from the cache. ``first_labels`` holds channel indices 0..K (0 = background, void already 0) at the
    original frame size ``output_size``; ``num_classes`` = K+1. ``ground_truth(t)`` gives frame t's labels
    in the same channel indices, or is None when the split has no full ground truth. ``extract_features``
    re-extracts through the same cache with changed backbone settings (keyword arguments ``layer``,
    ``timestep``, ``ensemble_size``, ``condition``) and returns another frame -> features reader.
    ``metrics`` is a per-sequence sink for diagnostics; the pipeline copies it into the SequenceOutcome.
    """

    name: str
    num_frames: int
    features: FeatureReader
    first_labels: np.ndarray
    num_classes: int
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    ground_truth: Callable[[int], np.ndarray] | None
    device: torch.device
    progress: bool
    layout: str
    extract_features: Callable[..., FeatureReader]
    backbone: Backbone | None = None
    load_frames: Callable[[list[int]], torch.Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    #: the feature cache folder (None: caching off); methods may keep derived caches beneath it
    cache_root: Path | None = None
    #: a folder for files the run keeps and tracking logs as artifacts (None: nowhere to keep them)
    artifact_dir: Path | None = None


@runtime_checkable
class Method(Protocol):
    """A registered segmentation method: a name, a frozen settings dataclass with defaults, and the
    per-sequence generator yielding (t, (H0, W0) uint8 channel-index labels) for t = 1..T-1."""

    name: str
    settings_class: type

    def segment_sequence(self, ctx: SequenceContext, settings: Any) -> Iterator[tuple[int, np.ndarray]]: ...
