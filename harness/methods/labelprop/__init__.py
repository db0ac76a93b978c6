"""Memory-bank label propagation: windowed top-k affinities between UNet features of video frames."""

from harness.methods.labelprop.affinity import (
    SIMILARITIES,
    PropagationWorkspace,
    QueryBlock,
    check_propagation_params,
    plan_blocks,
    propagate_frame,
    propagate_prepared,
    unit_memory,
    unit_query,
)
from harness.methods.labelprop.diagnostics import CorrespondenceStats
from harness.methods.labelprop.per_object import propagate_per_object
from harness.methods.labelprop.sequence import (
    PropagationSettings,
    labels_to_onehot,
    propagate_sequence,
    resize_labels_nearest,
    soft_to_labels,
)

__all__ = [
    "SIMILARITIES",
    "CorrespondenceStats",
    "PropagationSettings",
    "PropagationWorkspace",
    "QueryBlock",
    "check_propagation_params",
    "labels_to_onehot",
    "plan_blocks",
    "propagate_frame",
    "propagate_per_object",
    "propagate_prepared",
    "propagate_sequence",
    "resize_labels_nearest",
    "soft_to_labels",
    "unit_memory",
    "unit_query",
]
