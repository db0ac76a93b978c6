"""``labelprop``: memory-bank label propagation, the released method (registered as a method plug-in)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from harness.methods import register_method
from harness.methods.base import SequenceContext
from harness.methods.labelprop.affinity import PropagationWorkspace
from harness.methods.labelprop.sequence import PropagationSettings, propagate_sequence


@register_method("labelprop")
class LabelPropagation:
    """Windowed top-k label propagation over the first frame and the last ``n_last_frames`` frames."""

    settings_class = PropagationSettings

    def segment_sequence(
        self, ctx: SequenceContext, settings: PropagationSettings
    ) -> Iterator[tuple[int, np.ndarray]]:
        workspace = PropagationWorkspace()
        if settings.memory_caps is not None:
            settings = dataclasses.replace(settings, n_last_frames=settings.n_last_frames_for(ctx.name))
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
            layout=ctx.layout,
        )
        if settings.filter is not None:
            stats = workspace.filtering
            ctx.metrics["filter_unfiltered_queries"] = float(stats.unfiltered_queries)
            ctx.metrics["filter_queries"] = float(stats.queries)
