"""Correspondence diagnostics: where the final (top-k, normalised) weight of each query goes.

The paper ties J&F to the quality of the point correspondences. For every propagated frame with ground
truth, and for each object k seen as "k vs not-k" (the released oracle's view, the same in joint and in
per-object propagation), a query q on the feature grid has the share s_q of its final weight that lands
on keys labelled k. Then, with y_q the query's own ground truth:

- ``corr_precision``: the weight on keys whose label (k or not-k) equals the query's: s_q if y_q = k,
  1 - s_q otherwise; averaged over all queries;
- ``corr_fg_to_bg``: 1 - s_q over the queries of object k (foreground weight lost to not-k keys);
- ``corr_bg_to_fg``: s_q over the queries not of object k (background weight pulled from object k).

Each is pooled over the queries of all frames of one object, then averaged over the objects of the
sequence (an object never in the foreground of a propagated frame has no ``corr_fg_to_bg``).

The shares cost almost nothing extra: the memory carries the one-hot ground truth of its frames as extra
mask channels, so the kernel's own final mix of masks (the top-k weights times the memory masks) returns
s_q for every query, on the float32 and the bfloat16-screened path alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: the per-sequence metric names (SequenceContext.metrics), means over objects
METRIC_NAMES = ("corr_precision", "corr_fg_to_bg", "corr_bg_to_fg")


def truth_channels(truth: torch.Tensor, n_objects: int) -> torch.Tensor:
    """(h, w) int64 labels -> (h, w, n_objects) float32 one-hot of labels 1..n_objects (0 = background)."""
    labels = torch.arange(1, n_objects + 1, device=truth.device)
    return (truth.unsqueeze(-1) == labels).to(torch.float32)


class CorrespondenceStats:
    """Sums and counts per object over the frames of one sequence (on the device of the shares)."""

    def __init__(self) -> None:
        # object id -> [precision sum, queries, fg->bg sum, fg queries, bg->fg sum, bg queries]
        self._sums: dict[int, torch.Tensor] = {}
        self.frames = 0

    def record(self, shares: torch.Tensor, truth: torch.Tensor, object_ids: Sequence[int]) -> None:
        """Add one frame: ``shares`` (h, w, n) is the weight share of each query on keys labelled j+1,
        ``truth`` (h, w) the query frame's labels in the same numbering, ``object_ids[j]`` the object that
        channel j stands for (its id in the sequence, so per-object runs add up per object)."""
        if shares.shape[-1] != len(object_ids) or shares.shape[:2] != truth.shape:
            raise ValueError(
                f"shares {tuple(shares.shape)} do not match truth {tuple(truth.shape)} and "
                f"{len(object_ids)} objects"
            )
        # in [0, 1] up to the rounding of the mix (weights summing to 1 + 1 ulp)
        shares = shares.to(torch.float64).clamp(0.0, 1.0).reshape(-1, len(object_ids))
        foreground = truth.reshape(-1, 1) == torch.arange(1, len(object_ids) + 1, device=truth.device)
        on_fg = torch.where(foreground, shares, 0.0).sum(dim=0)
        on_bg = torch.where(foreground, 0.0, shares).sum(dim=0)
        n_fg = foreground.sum(dim=0).to(torch.float64)
        n_bg = foreground.shape[0] - n_fg
        n_all = torch.full_like(n_fg, foreground.shape[0])
        # (n, 6): the (sum, count) pairs of precision, fg -> bg and bg -> fg
        stacked = torch.stack([on_fg + (n_bg - on_bg), n_all, n_fg - on_fg, n_fg, on_bg, n_bg], dim=1)
        for channel, object_id in enumerate(object_ids):
            current = self._sums.get(object_id)
            self._sums[object_id] = stacked[channel] if current is None else current + stacked[channel]
        self.frames += 1

    def per_object(self) -> dict[int, dict[str, float]]:
        """Object id -> its metrics (a metric without any query is left out)."""
        result: dict[int, dict[str, float]] = {}
        for object_id, sums in sorted(self._sums.items()):
            values = sums.tolist()
            metrics: dict[str, float] = {}
            pairs = zip(values[::2], values[1::2], strict=True)
            for name, (total, count) in zip(METRIC_NAMES, pairs, strict=True):
                if count > 0:
                    metrics[name] = total / count
            result[object_id] = metrics
        return result

    def metrics(self) -> dict[str, float]:
        """The per-sequence metrics: each the mean over the objects that have it."""
        per_object = self.per_object().values()
        result = {}
        for name in METRIC_NAMES:
            values = [metrics[name] for metrics in per_object if name in metrics]
            if values:
                result[name] = sum(values) / len(values)
        return result
