"""``first-frame``: keep only correspondences to the annotated first frame (an ablation of the memory of
previous frames; it needs no ground truth)."""

from __future__ import annotations

import torch

from harness.methods.labelprop.affinity import QueryBlock
from harness.methods.labelprop.filters import FilterContext, register_filter


@register_filter("first-frame")
class FirstFrameFilter:
    needs_ground_truth = False

    def keep(self, context: FilterContext, block: QueryBlock) -> torch.Tensor:
        (kr0, kr1), (kc0, kc1) = block.key_rows, block.key_cols
        first = torch.tensor([frame == 0 for frame in context.memory_frames])
        return first.view(1, 1, -1, 1).expand(kr1 - kr0, kc1 - kc0, -1, block.num_queries)
