"""``labelprop``: memory-bank label propagation, the released method (registered as a method plug-in)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from harness.methods import register_method
from harness.methods.base import SequenceContext
from harness.methods.labelprop.affinity import PropagationWorkspace
from harness.methods.labelprop.diagnostics import CorrespondenceStats
from harness.methods.labelprop.per_object import propagate_per_object
from harness.methods.labelprop.sequence import FeatureSource, PropagationSettings, propagate_sequence


@register_method("labelprop")
class LabelPropagation:
    """Windowed top-k label propagation over the first frame and the last ``n_last_frames`` frames."""

    settings_class = PropagationSettings

    def segment_sequence(
        self, ctx: SequenceContext, settings: PropagationSettings
    ) -> Iterator[tuple[int, np.ndarray]]:
        if settings.memory_caps is not None:  # per-sequence memory lengths (DIFT's "shooting")
            settings = dataclasses.replace(settings, n_last_frames=settings.n_last_frames_for(ctx.name))
        if settings.per_object:
            yield from segment_per_object(ctx, settings, lambda _: ctx.features, same_features=True)
            return
        workspace = PropagationWorkspace()
        diagnostics = CorrespondenceStats() if settings.diagnostics else None
        yield from propagate_sequence(
            ctx.features,
            ctx.first_labels,
            ctx.num_classes,
            settings,
            input_size=ctx.input_size,
            output_size=ctx.output_size,
            progress=ctx.progress,
            num_frames=ctx.num_frames,
            workspace=workspace,
            ground_truth=ctx.ground_truth,
            diagnostics=diagnostics,
            layout=ctx.layout,
        )
        _report(ctx, settings, workspace, diagnostics)


def segment_per_object(
    ctx: SequenceContext,
    settings: PropagationSettings,
    features_for_object: Callable[[int], FeatureSource],
    *,
    same_features: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Per-object label propagation of one sequence with features chosen per object.

    The hook for methods that extract features per object (SD-2.1 prompt learning): ``features_for_object(k)``
    (k = 1..K, the object's channel) returns a frame -> (C, h, w) reader, e.g. ``ctx.extract_features(...)``
    with the object's learned condition; it is called once per object, when that object starts. Reports
    the filter counts and correspondence diagnostics into ``ctx.metrics`` as labelprop does.
    ``same_features``: every object has the same features (see propagate_per_object).
    """
    workspace = PropagationWorkspace()
    diagnostics = CorrespondenceStats() if settings.diagnostics else None
    yield from propagate_per_object(
        features_for_object,
        ctx.first_labels,
        ctx.num_classes,
        settings,
        input_size=ctx.input_size,
        output_size=ctx.output_size,
        progress=ctx.progress,
        num_frames=ctx.num_frames,
        workspace=workspace,
        ground_truth=ctx.ground_truth,
        diagnostics=diagnostics,
        same_features=same_features,
    )
    _report(ctx, settings, workspace, diagnostics)


def _report(
    ctx: SequenceContext,
    settings: PropagationSettings,
    workspace: PropagationWorkspace,
    diagnostics: CorrespondenceStats | None,
) -> None:
    if settings.filter is not None:
        stats = workspace.filtering
        ctx.metrics["filter_unfiltered_queries"] = float(stats.unfiltered_queries)
        ctx.metrics["filter_queries"] = float(stats.queries)
    if diagnostics is not None:
        ctx.metrics.update(diagnostics.metrics())
