"""``oracle``: keep only correspondences whose ground-truth labels agree (the paper's oracle experiment).

The released code (thanosDelatolas/diff-zvos, src/propagation.py label_propagation_oracle l.202-214,
run per object by src/eval_vos_oracle.py) multiplies the windowed affinity by [key fg == query fg] before
the top-k, with key labels from the ground truth of frame 0 and of the memory frames and the query's from
the current frame; the mixed masks stay the predicted ones. Here the labels are the ground-truth channel
indices of the propagation: in per-object mode (``method.per_object: true``, as the released oracle runs)
object k's propagation is given object k's binary ground truth, so this is exactly its fg vs bg rule; with
several objects propagated jointly a pair is kept when both positions belong to the same object or both to
the background (with one object the two coincide).

Unlike the released code, a query with no agreeing key in its window does not divide 0 by 0 (NaN): it
keeps its unfiltered window, and such queries are counted (see the package docstring).
"""

from __future__ import annotations

import torch

from harness.methods.labelprop.affinity import QueryBlock
from harness.methods.labelprop.filters import FilterContext, register_filter


@register_filter("oracle")
class OracleFilter:
    needs_ground_truth = True

    def keep(self, context: FilterContext, block: QueryBlock) -> torch.Tensor:
        if context.query_truth is None or context.memory_truth is None:
            raise ValueError("the oracle filter needs the ground truth of the query and memory frames")
        (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
        (kr0, kr1), (kc0, kc1) = block.key_rows, block.key_cols
        query = context.query_truth[qr0:qr1, qc0:qc1].reshape(1, 1, 1, -1)
        keys = context.memory_truth[kr0:kr1, kc0:kc1].unsqueeze(-1)  # (kh, kw, N, 1)
        return keys == query
