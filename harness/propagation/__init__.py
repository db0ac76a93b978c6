"""Memory-bank label propagation: windowed top-k affinities between UNet features of video frames."""

from harness.propagation.affinity import (
    SIMILARITIES,
    KeyStrip,
    PropagationWorkspace,
    QueryBlock,
    check_propagation_params,
    normalise_channels_last,
    plan_blocks,
    propagate_frame,
    propagate_prepared,
)
from harness.propagation.memory import (
    PropagationSettings,
    labels_to_onehot,
    propagate_sequence,
    resize_labels_nearest,
    soft_to_labels,
)

__all__ = [
    "SIMILARITIES",
    "KeyStrip",
    "PropagationSettings",
    "PropagationWorkspace",
    "QueryBlock",
    "check_propagation_params",
    "labels_to_onehot",
    "normalise_channels_last",
    "plan_blocks",
    "propagate_frame",
    "propagate_prepared",
    "propagate_sequence",
    "resize_labels_nearest",
    "soft_to_labels",
]
