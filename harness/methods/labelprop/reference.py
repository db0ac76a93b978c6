"""The released label propagation, dense and readable: what the fast kernel (affinity.py) must equal.

Written from the released code (thanosDelatolas/diff-zvos, src/propagation.py: restrict_neighborhood
l.16-32, label_propagation_feat_cosine_similarity l.35-76 and its l2/l1 siblings l.80-): L2-normalised
features, affinity exp(similarity / T) of every key of every memory frame against every query, a 0/1
local window of radius r, top-k over the keys of all memory frames jointly with ties kept
(``aff[aff < kth] = 0``), normalisation to sum 1 and one product with the memory masks. It builds the
whole (N*h*w) x (h*w) affinity, so it is for tests and small inputs only.

``keep`` adds a correspondence filter the way the kernel applies it: pairs not kept are dropped after the
window, except that a query with no kept key in its window keeps its unfiltered window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(height: int, width: int, radius: int) -> torch.Tensor:
    """(h*w keys, h*w queries) bool: key within ``radius`` of the query in rows and columns (0 = all)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    if radius == 0:
        return torch.ones(height * width, height * width, dtype=torch.bool)
    return ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)


def dense_weights(
    query: torch.Tensor,
    memory_feats: torch.Tensor,
    *,
    similarity: str = "cosine",
    temperature: float = 0.2,
    topk: int = 15,
    radius: int = 15,
    keep: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The final weights (N*h*w keys, h*w queries), keys frame-major: each column sums to 1 over the
    query's kept top-k keys. ``keep`` is an optional (N*h*w, h*w) bool filter."""
    channels, height, width = query.shape
    n_memory = memory_feats.shape[0]
    queries = F.normalize(query.to(dtype).reshape(channels, -1), dim=0).t()  # (hw, C)
    keys = F.normalize(memory_feats.to(dtype).reshape(n_memory, channels, -1), dim=1)
    keys = keys.permute(0, 2, 1).reshape(-1, channels)  # (N*hw, C), frame-major
    if similarity == "cosine":
        affinity = torch.exp(keys @ queries.t() / temperature)
    elif similarity in ("l2", "l1"):
        p = 2.0 if similarity == "l2" else 1.0
        distance = torch.cdist(keys, queries, p=p, compute_mode="donot_use_mm_for_euclid_dist")
        affinity = torch.exp(-distance / temperature)
    else:
        raise ValueError(f"unknown similarity {similarity!r}")
    allowed = window_mask(height, width, radius).repeat(n_memory, 1)
    if keep is not None:
        unfiltered = ~(keep & allowed).any(dim=0, keepdim=True)  # queries with no kept key in the window
        allowed = allowed & (keep | unfiltered)
    affinity = affinity * allowed
    k = min(topk, affinity.shape[0])
    kth = torch.topk(affinity, k, dim=0).values[-1]
    affinity[affinity < kth] = 0  # ties with the k-th stay
    return affinity / affinity.sum(dim=0, keepdim=True)


def propagate_dense(
    query: torch.Tensor,
    memory_feats: torch.Tensor,
    memory_masks: torch.Tensor,
    *,
    similarity: str = "cosine",
    temperature: float = 0.2,
    topk: int = 15,
    radius: int = 15,
    keep: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Soft labels (K+1, h, w) of ``query`` (C, h, w) from ``memory_feats`` (N, C, h, w) and
    ``memory_masks`` (N, K+1, h, w). ``keep`` is an optional (N*h*w keys, h*w queries) bool filter, keys
    frame-major. Computed in ``dtype`` (float64 by default, so it is the definition without rounding)."""
    _, height, width = query.shape
    n_classes = memory_masks.shape[1]
    weights = dense_weights(
        query,
        memory_feats,
        similarity=similarity,
        temperature=temperature,
        topk=topk,
        radius=radius,
        keep=keep,
        dtype=dtype,
    )
    masks = memory_masks.to(dtype).permute(1, 0, 2, 3).reshape(n_classes, -1)  # (K+1, N*hw)
    return (masks @ weights).reshape(n_classes, height, width).float()
