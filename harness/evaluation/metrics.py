"""Per-frame region (J) and boundary (F) measures and per-object statistics of DAVIS-2017.

These follow the official davis2017-evaluation exactly (same boundary rule, same disk, same bins), so
that numbers can be compared with published ones. They are pure numpy/OpenCV functions on (H, W)
boolean or 0/1 arrays; ``evaluate.py`` uses the cropped variants below for speed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

# Boundary tolerance of the F measure, as a fraction of the image diagonal.
BOUNDARY_TOLERANCE_FRACTION = 0.008
# A frame counts towards the recall when its score is strictly above this.
RECALL_THRESHOLD = 0.5
DECAY_BINS = 4


class Statistics(NamedTuple):
    """Mean, recall (fraction of frames above 0.5) and decay (first bin minus last bin) of one object."""

    mean: float
    recall: float
    decay: float


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two binary masks; 1 when both are empty (nothing to find, nothing found)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Pixels that differ from their right, lower or lower-right neighbour (the official ``seg2bmap``).

    The last row only compares with the right neighbour, the last column only with the lower one, and
    the bottom-right pixel is never a boundary; this asymmetry is part of the official definition.
    """
    seg = np.asarray(mask, dtype=bool)
    if seg.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {seg.shape}")
    differs_right = seg[:, :-1] != seg[:, 1:]
    differs_down = seg[:-1, :] != seg[1:, :]
    differs_diagonal = seg[:-1, :-1] != seg[1:, 1:]
    boundary = np.zeros(seg.shape, dtype=bool)
    boundary[:-1, :-1] = differs_right[:-1] | differs_down[:, :-1] | differs_diagonal
    boundary[-1, :-1] = differs_right[-1]
    boundary[:-1, -1] = differs_down[:, -1]
    return boundary


def boundary_tolerance(height: int, width: int) -> int:
    """Match radius in pixels: ceil(0.008 * image diagonal), e.g. 8 at 854x480 and 10 at 1152x480."""
    # sqrt of the exact integer sum is what numpy's norm computes for a 2-vector, so ceil agrees bit for bit.
    return math.ceil(BOUNDARY_TOLERANCE_FRACTION * math.sqrt(height * height + width * width))


def disk_kernel(radius: int) -> np.ndarray:
    """uint8 (2r+1, 2r+1) structuring element of the offsets with dx^2 + dy^2 <= r^2."""
    offsets = np.arange(-radius, radius + 1)
    return ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius * radius).astype(np.uint8)


def f_from_counts(pred_boundary: int, gt_boundary: int, pred_matched: int, gt_matched: int) -> float:
    """F from boundary pixel counts, with the official conventions for empty boundaries."""
    if pred_boundary == 0 and gt_boundary == 0:
        return 1.0
    if pred_boundary == 0 or gt_boundary == 0:
        return 0.0
    precision = pred_matched / pred_boundary
    recall = gt_matched / gt_boundary
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def boundary_f_score(pred_boundary: np.ndarray, gt_boundary: np.ndarray, radius: int) -> float:
    """F of two boundary maps; a boundary pixel matches when the other map has one within ``radius``.

    Dilating each map with the disk and intersecting with the other map counts the matched pixels. The
    dilation may run on a crop as long as the crop holds every boundary pixel of both maps: OpenCV's
    default border never adds pixels, so the values read back at boundary pixels are exact.
    """
    pred_b = np.ascontiguousarray(pred_boundary, dtype=bool)
    gt_b = np.ascontiguousarray(gt_boundary, dtype=bool)
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"boundary shapes differ: {pred_b.shape} vs {gt_b.shape}")
    n_pred = int(np.count_nonzero(pred_b))
    n_gt = int(np.count_nonzero(gt_b))
    if n_pred == 0 or n_gt == 0:
        return f_from_counts(n_pred, n_gt, 0, 0)
    kernel = disk_kernel(radius)
    pred_dilated = cv2.dilate(pred_b.view(np.uint8), kernel).view(bool)
    gt_dilated = cv2.dilate(gt_b.view(np.uint8), kernel).view(bool)
    pred_matched = int(np.count_nonzero(pred_b & gt_dilated))
    gt_matched = int(np.count_nonzero(gt_b & pred_dilated))
    return f_from_counts(n_pred, n_gt, pred_matched, gt_matched)


def f_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """Boundary F measure of two binary masks, with the tolerance taken from their size."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    radius = boundary_tolerance(*pred.shape)
    return boundary_f_score(boundary_map(pred), boundary_map(gt), radius)


def decay_bin_edges(n: int) -> list[int]:
    """The 5 bin edges of the decay: round-half-up(1 + i(n-1)/4) - 1 for i = 0..4 (integer arithmetic).

    The official code stores these edges as uint8, so it wraps around for sequences of more than 256
    scored frames; no DAVIS sequence is that long, and here the edges stay correct for any length.
    """
    if n < 1:
        raise ValueError("decay needs at least one value")
    # round-half-up(1 + a/4) - 1 == floor((a + 2) / 4) for a = i(n-1) >= 0.
    return [(i * (n - 1) + 2) // DECAY_BINS for i in range(DECAY_BINS + 1)]


def sequence_statistics(values: np.ndarray) -> Statistics:
    """Mean, recall and decay of one object's per-frame scores (official ``db_statistics``).

    Bin k holds values[edge_k : edge_{k+1} + 1], so neighbouring bins share an endpoint.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty 1-D array of per-frame values, got shape {values.shape}")
    edges = decay_bin_edges(values.size)
    bins = [values[edges[k] : edges[k + 1] + 1] for k in range(DECAY_BINS)]
    return Statistics(
        mean=float(np.mean(values)),
        recall=float(np.mean(values > RECALL_THRESHOLD)),
        decay=float(np.mean(bins[0]) - np.mean(bins[-1])),
    )
