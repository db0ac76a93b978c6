"""DAVIS-2017 semi-supervised evaluation (J, F, J&F) with the official numbers, fast and memory-light."""

from harness.evaluation.evaluate import (
    GLOBAL_COLUMNS,
    EvaluationResult,
    ObjectScores,
    ScoringPlan,
    evaluate_dataset,
    evaluate_sequence,
    frame_scores,
    scored_frames,
    write_results,
)
from harness.evaluation.metrics import (
    Statistics,
    boundary_f_score,
    boundary_map,
    boundary_tolerance,
    f_measure,
    jaccard,
    sequence_statistics,
)

__all__ = [
    "GLOBAL_COLUMNS",
    "EvaluationResult",
    "ObjectScores",
    "ScoringPlan",
    "Statistics",
    "boundary_f_score",
    "boundary_map",
    "boundary_tolerance",
    "evaluate_dataset",
    "evaluate_sequence",
    "f_measure",
    "frame_scores",
    "jaccard",
    "scored_frames",
    "sequence_statistics",
    "write_results",
]
