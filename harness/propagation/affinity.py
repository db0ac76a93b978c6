"""Label propagation for one frame: windowed top-k affinities between a query frame and a memory of frames.

This reproduces the propagation of the released code (DINO's video segmentation evaluation): L2-normalised
features, affinity exp(similarity / T), a local (2r+1) x (2r+1) window, top-k over all keys of all memory
frames jointly (ties with the k-th kept), weights normalised to sum 1, and a weighted sum of memory masks.

The released code builds the dense (N*h*w) x (h*w) affinity; at DAVIS scale that is several GB and most of
it is zeroed by the window. Here the query grid is cut into small rectangular tiles; each tile is matched
with one matrix product against only the key rectangle its windows can reach (in every memory frame), so
work and memory scale with the window area instead of the grid area. Everything is computed in logit space
(log of the affinity): top-k on logits is the same as top-k on exp(logits), and subtracting the per-query
maximum before exp cancels in the normalisation while avoiding overflow and underflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from harness.errors import ConfigError

SIMILARITIES = ("cosine", "l2", "l1")

#: The working set (key strip + per-tile logits) that one call aims to stay under.
DEFAULT_BUDGET_BYTES = 256 * 2**20

#: Query tile (rows, columns) for windowed propagation. A tile of q_h x q_w queries is matched with
#: (q_h + 2r) x (q_w + 2r) keys per memory frame, so small tiles waste few products on keys outside the
#: windows, while large tiles make bigger (faster) matrix products and fewer kernel launches. 8 x 8 was
#: the fastest of the shapes measured on CPU at DAVIS scale (r = 15); larger tiles suit a GPU better.
DEFAULT_TILE = (8, 8)
DEFAULT_CUDA_TILE = (16, 16)

_FLOAT_BYTES = 4
#: Bytes per (query, key) pair during one tile: the key-major logits and their query-major copy.
_PAIR_BYTES = 2 * _FLOAT_BYTES

_NORMALISE_EPS = 1e-12  # the eps of torch.nn.functional.normalize


def check_propagation_params(similarity: str, temperature: float, topk: int, radius: int) -> None:
    """Raise ConfigError naming the bad value; shared by propagate_frame and PropagationSettings."""
    if similarity not in SIMILARITIES:
        raise ConfigError(f"unknown similarity {similarity!r}; expected one of {', '.join(SIMILARITIES)}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ConfigError(f"temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ConfigError(f"topk must be an integer >= 1, got {topk!r}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ConfigError(f"radius must be an integer >= 0 (0 = no window), got {radius!r}")


# -- planning -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryBlock:
    """A rectangle of query positions and the rectangle of key positions their windows reach.

    Ranges are half-open (start, stop) in grid coordinates. ``windowed`` is False when every key of the
    key rectangle is inside every query's window, so no mask is needed.
    """

    query_rows: tuple[int, int]
    query_cols: tuple[int, int]
    key_rows: tuple[int, int]
    key_cols: tuple[int, int]
    windowed: bool

    @property
    def num_queries(self) -> int:
        return (self.query_rows[1] - self.query_rows[0]) * (self.query_cols[1] - self.query_cols[0])

    @property
    def num_key_positions(self) -> int:
        """Key positions per memory frame."""
        return (self.key_rows[1] - self.key_rows[0]) * (self.key_cols[1] - self.key_cols[0])


@dataclass(frozen=True)
class KeyStrip:
    """Key rows x columns copied once (all memory frames) and shared by the blocks that lie inside it.

    ``copied`` is False when the strip is the whole grid: the memory is then used in place.
    """

    key_rows: tuple[int, int]
    key_cols: tuple[int, int]
    blocks: tuple[QueryBlock, ...]
    copied: bool

    @property
    def num_key_positions(self) -> int:
        return (self.key_rows[1] - self.key_rows[0]) * (self.key_cols[1] - self.key_cols[0])


def strip_bytes(strip: KeyStrip, n_memory: int, channels: int, n_classes: int) -> int:
    """Bytes of the copy of a strip's features and masks (0 when the memory is used in place)."""
    if not strip.copied:
        return 0
    return strip.num_key_positions * n_memory * (channels + n_classes) * _FLOAT_BYTES


def block_bytes(block: QueryBlock, n_memory: int) -> int:
    """Bytes of the (queries x keys) matrices one block needs at once."""
    return block.num_queries * block.num_key_positions * n_memory * _PAIR_BYTES


def _window_range(start: int, stop: int, radius: int, size: int) -> tuple[int, int]:
    return max(0, start - radius), min(size, stop + radius)


def plan_blocks(
    height: int,
    width: int,
    radius: int,
    *,
    n_memory: int,
    channels: int,
    n_classes: int,
    tile: tuple[int, int] = DEFAULT_TILE,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> list[KeyStrip]:
    """Cut the query grid into blocks grouped by key strip so the working set stays within the budget.

    With a window that does not cover the whole grid, queries are tiled ``tile`` (rows, cols); the tiles of
    one tile column share a column strip of keys, copied in row groups that fit half the budget. Without a
    window (radius 0, or a radius that reaches across the grid) every key is needed by every query, so the
    memory is used in place and queries are processed in bands of rows that fit the budget. A single tile or
    row is never split, so a tiny budget is exceeded rather than refused.
    """
    if radius == 0 or (radius >= height - 1 and radius >= width - 1):
        row_bytes = width * height * width * n_memory * _PAIR_BYTES
        band = max(1, min(height, budget_bytes // max(row_bytes, 1)))
        blocks = tuple(
            QueryBlock((y0, min(height, y0 + band)), (0, width), (0, height), (0, width), windowed=False)
            for y0 in range(0, height, band)
        )
        return [KeyStrip((0, height), (0, width), blocks, copied=False)]

    tile_rows, tile_cols = max(1, tile[0]), max(1, tile[1])
    strips: list[KeyStrip] = []
    for x0 in range(0, width, tile_cols):
        x1 = min(width, x0 + tile_cols)
        key_cols = _window_range(x0, x1, radius, width)
        column_blocks = [
            QueryBlock(
                (y0, min(height, y0 + tile_rows)),
                (x0, x1),
                _window_range(y0, min(height, y0 + tile_rows), radius, height),
                key_cols,
                windowed=True,
            )
            for y0 in range(0, height, tile_rows)
        ]
        strip_budget = budget_bytes // 2
        bytes_per_key_row = (key_cols[1] - key_cols[0]) * n_memory * (channels + n_classes) * _FLOAT_BYTES
        group: list[QueryBlock] = []
        for block in column_blocks:
            if group:
                rows_if_added = block.key_rows[1] - group[0].key_rows[0]
                if rows_if_added * bytes_per_key_row > strip_budget:
                    strips.append(_strip_of(group))
                    group = []
            group.append(block)
        strips.append(_strip_of(group))
    return strips


def _strip_of(blocks: list[QueryBlock]) -> KeyStrip:
    rows = (blocks[0].key_rows[0], blocks[-1].key_rows[1])
    return KeyStrip(rows, blocks[0].key_cols, tuple(blocks), copied=True)


# -- computation ----------------------------------------------------------------------------------------


def normalise_channels_last(features: torch.Tensor) -> torch.Tensor:
    """Unit-length float32 feature vectors along C, laid out (..., h, w, C) so each position is a matrix row.

    ``features`` is (..., C, h, w). The division writes straight into the channels-last result (one pass);
    zero vectors stay zero, as with torch.nn.functional.normalize.
    """
    features = features.to(torch.float32)
    norms = torch.linalg.vector_norm(features, dim=-3, keepdim=True).clamp_min_(_NORMALISE_EPS)
    dims = features.dim()
    order = (*range(dims - 3), dims - 2, dims - 1, dims - 3)
    result = torch.empty([features.shape[d] for d in order], dtype=torch.float32, device=features.device)
    torch.div(features, norms, out=result.permute(*[order.index(d) for d in range(dims)]))
    return result


@dataclass
class PropagationWorkspace:
    """Scratch memory and window masks reused from block to block and from frame to frame.

    Reuse matters on CPU: a fresh multi-MB tensor per block pays its page faults again every time. One
    workspace serves one caller at a time (the sequence loop makes its own); it is not thread safe.
    """

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    window_biases: dict[tuple[object, ...], torch.Tensor] = field(default_factory=dict)

    def buffer(self, name: str, numel: int, device: torch.device) -> torch.Tensor:
        """A flat float32 tensor of at least ``numel`` elements (grown, never shrunk)."""
        current = self.buffers.get(name)
        if current is None or current.numel() < numel or current.device != device:
            current = torch.empty(numel, dtype=torch.float32, device=device)
            self.buffers[name] = current
        return current[:numel]


def _key_major_logits(
    queries: torch.Tensor, keys: torch.Tensor, similarity: str, temperature: float, out: torch.Tensor
) -> torch.Tensor:
    """log(affinity) of unit vectors as a (K, Q) matrix, from queries (Q, C) and keys (K, C).

    Key-major because (many keys) x C times C x (few queries) is the faster product shape on CPU BLAS.
    For cosine the 1/T is folded into the (small) query matrix, saving a pass over the product.
    """
    if similarity == "l1":
        return torch.cdist(keys, queries, p=1).mul_(-1.0 / temperature)
    if similarity == "cosine":
        return torch.mm(keys, queries.t().mul(1.0 / temperature), out=out)
    # l2: ||a - b|| = sqrt(2 - 2 <a, b>) for unit vectors
    dots = torch.mm(keys, queries.t(), out=out)
    return dots.mul_(-2.0).add_(2.0).clamp_min_(0.0).sqrt_().mul_(-1.0 / temperature)


def _window_bias(
    block: QueryBlock, radius: int, device: torch.device, workspace: PropagationWorkspace
) -> torch.Tensor:
    """0 inside each query's window and -inf outside, as (key rows, 1, key cols, Q).

    The 1 broadcasts over the memory frames of the strip layout (key rows, N, key cols); the window is
    separable, so it is built from one (query, key) comparison per axis. It depends only on where the
    queries sit relative to the key rectangle, so interior blocks (and frames) share one cached tensor.
    """
    (kr0, kr1), (kc0, kc1) = block.key_rows, block.key_cols
    (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
    key = (radius, str(device), qr0 - kr0, qr1 - kr0, kr1 - kr0, qc0 - kc0, qc1 - kc0, kc1 - kc0)
    if key not in workspace.window_biases:
        far_y = (torch.arange(kr0, kr1)[:, None] - torch.arange(qr0, qr1)[None, :]).abs() > radius
        far_x = (torch.arange(kc0, kc1)[:, None] - torch.arange(qc0, qc1)[None, :]).abs() > radius
        far = far_y[:, None, :, None] | far_x[None, :, None, :]  # (kh, kw, qh, qw)
        far = far.reshape(kr1 - kr0, 1, kc1 - kc0, block.num_queries)
        bias = torch.zeros(far.shape, dtype=torch.float32).masked_fill_(far, float("-inf"))
        workspace.window_biases[key] = bias.to(device)
    return workspace.window_biases[key]


def _weighted_masks(logits: torch.Tensor, masks: torch.Tensor, topk: int) -> torch.Tensor:
    """Keep each row's logits >= its k-th largest (ties kept), normalise exp over them, mix the masks.

    ``logits`` is (Q, K) and ``masks`` (K, K+1); returns (Q, K+1). Keys masked to -inf are invalid: if
    fewer than k are finite, the k-th value is -inf, all finite keys are among the top k, and exp(-inf) = 0
    gives the others no weight. The (k+1)-th largest tells which rows have a tie at the k-th place (it then
    equals the k-th); every other row is exactly its top k and is mixed from the top-k indices alone, and
    only the tied rows (rare) go through the full row.
    """
    n_keys = logits.shape[1]
    k = min(topk, n_keys)
    top = torch.topk(logits, min(k + 1, n_keys), dim=1, sorted=True)
    values, indices = top.values[:, :k], top.indices[:, :k]
    row_max, kth = values[:, :1], values[:, k - 1 :]
    weights = (values - row_max).exp_()
    mixed = torch.einsum("qk,qkc->qc", weights, masks[indices]).div_(weights.sum(dim=1, keepdim=True))
    if k < n_keys:
        tied = ((top.values[:, k:] == kth) & torch.isfinite(kth)).squeeze(1)
        tied_rows = torch.nonzero(tied).squeeze(1)
        if tied_rows.numel() > 0:
            rows, rows_kth, rows_max = logits[tied_rows], kth[tied_rows], row_max[tied_rows]
            full = (rows - rows_max).masked_fill_(rows < rows_kth, float("-inf")).exp_()
            mixed[tied_rows] = torch.mm(full, masks).div_(full.sum(dim=1, keepdim=True))
    return mixed


def default_tile(device: torch.device) -> tuple[int, int]:
    return DEFAULT_CUDA_TILE if device.type == "cuda" else DEFAULT_TILE


def propagate_prepared(
    query: torch.Tensor,
    memory_feats: torch.Tensor,
    memory_masks: torch.Tensor,
    *,
    similarity: str,
    temperature: float,
    topk: int,
    radius: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    tile: tuple[int, int] | None = None,
    workspace: PropagationWorkspace | None = None,
) -> torch.Tensor:
    """The propagation on prepared tensors; returns the soft output as (h, w, K+1).

    ``query`` (h, w, C) and ``memory_feats`` (N, h, w, C) hold unit vectors (see normalise_channels_last)
    and ``memory_masks`` is (N, h, w, K+1), all float32 on one device. The sequence loop keeps its memory
    in this layout so nothing is normalised or re-laid-out twice. Arguments are not validated here.
    """
    n_memory, height, width, channels = memory_feats.shape
    n_classes = memory_masks.shape[-1]
    device = memory_feats.device
    workspace = workspace if workspace is not None else PropagationWorkspace()
    strips = plan_blocks(
        height,
        width,
        radius,
        n_memory=n_memory,
        channels=channels,
        n_classes=n_classes,
        tile=tile or default_tile(device),
        budget_bytes=budget_bytes,
    )
    largest_strip = max(strip.num_key_positions * n_memory if strip.copied else 0 for strip in strips)
    feat_buffer = workspace.buffer("strip_feats", largest_strip * channels, device)
    mask_buffer = workspace.buffer("strip_masks", largest_strip * n_classes, device)
    largest_block = max(b.num_queries * b.num_key_positions * n_memory for s in strips for b in s.blocks)
    key_major_buffer = workspace.buffer("key_major", largest_block, device)
    query_major_buffer = workspace.buffer("query_major", largest_block, device)
    output = torch.empty((height, width, n_classes), dtype=torch.float32, device=device)

    for strip in strips:
        if strip.copied:
            # (rows, N, cols, C): any run of consecutive rows is then one contiguous (keys x C) matrix
            (r0, r1), (c0, c1) = strip.key_rows, strip.key_cols
            shape = (r1 - r0, n_memory, c1 - c0)
            size = shape[0] * shape[1] * shape[2]
            strip_feats = feat_buffer[: size * channels].view(*shape, channels)
            strip_feats.copy_(memory_feats[:, r0:r1, c0:c1].permute(1, 0, 2, 3))
            strip_masks = mask_buffer[: size * n_classes].view(*shape, n_classes)
            strip_masks.copy_(memory_masks[:, r0:r1, c0:c1].permute(1, 0, 2, 3))
        else:  # the whole grid, in the memory's own (N, h, w) order
            keys = memory_feats.reshape(-1, channels)
            key_masks = memory_masks.reshape(-1, n_classes)
        for block in strip.blocks:
            if strip.copied:
                rows = slice(block.key_rows[0] - strip.key_rows[0], block.key_rows[1] - strip.key_rows[0])
                keys = strip_feats[rows].reshape(-1, channels)
                key_masks = strip_masks[rows].reshape(-1, n_classes)
            (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
            n_queries, n_keys = block.num_queries, keys.shape[0]
            queries = query[qr0:qr1, qc0:qc1].reshape(n_queries, channels)
            key_major = key_major_buffer[: n_keys * n_queries].view(n_keys, n_queries)
            logits = _key_major_logits(queries, keys, similarity, temperature, out=key_major)
            if block.windowed:
                n_rows = block.key_rows[1] - block.key_rows[0]
                bias = _window_bias(block, radius, device, workspace)
                logits.view(n_rows, n_memory, -1, n_queries).add_(bias)
            # top-k runs along rows; a blocked transpose copy is cheaper than top-k across a strided dim
            query_major = query_major_buffer[: n_keys * n_queries].view(n_queries, n_keys)
            query_major.copy_(logits.t())
            mixed = _weighted_masks(query_major, key_masks, topk)
            output[qr0:qr1, qc0:qc1] = mixed.view(qr1 - qr0, qc1 - qc0, n_classes)
    return output


def propagate_frame(
    query: torch.Tensor,
    memory_feats: torch.Tensor,
    memory_masks: torch.Tensor,
    *,
    similarity: str = "cosine",
    temperature: float = 0.2,
    topk: int = 15,
    radius: int = 15,
) -> torch.Tensor:
    """Soft labels (K+1, h, w) of a query frame (C, h, w) from memory features (N, C, h, w) and memory
    masks (N, K+1, h, w).

    Each position's output is the affinity-weighted mean of the memory masks at its kept keys (weights sum
    to 1; no further normalisation). Runs in float32 on the device of the inputs.
    """
    check_propagation_params(similarity, temperature, topk, radius)
    _check_shapes(query, memory_feats, memory_masks)
    soft = propagate_prepared(
        normalise_channels_last(query),
        normalise_channels_last(memory_feats),
        memory_masks.to(torch.float32).permute(0, 2, 3, 1).contiguous(),
        similarity=similarity,
        temperature=float(temperature),
        topk=topk,
        radius=radius,
    )
    return soft.permute(2, 0, 1).contiguous()


def _check_shapes(query: torch.Tensor, memory_feats: torch.Tensor, memory_masks: torch.Tensor) -> None:
    for name, tensor in (("query", query), ("memory_feats", memory_feats), ("memory_masks", memory_masks)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must be a real tensor, got dtype {tensor.dtype}")
    if query.dim() != 3:
        raise ValueError(f"query must be (C, h, w), got shape {tuple(query.shape)}")
    if memory_feats.dim() != 4:
        raise ValueError(f"memory_feats must be (N, C, h, w), got shape {tuple(memory_feats.shape)}")
    if memory_masks.dim() != 4:
        raise ValueError(f"memory_masks must be (N, K+1, h, w), got shape {tuple(memory_masks.shape)}")
    if memory_feats.shape[0] < 1:
        raise ValueError("memory_feats holds no frame (N = 0)")
    if memory_feats.shape[1:] != query.shape:
        raise ValueError(
            f"memory_feats frames {tuple(memory_feats.shape[1:])} do not match query {tuple(query.shape)}"
        )
    if memory_masks.shape[0] != memory_feats.shape[0] or memory_masks.shape[2:] != query.shape[1:]:
        raise ValueError(
            f"memory_masks {tuple(memory_masks.shape)} must be (N={memory_feats.shape[0]}, K+1, "
            f"{query.shape[1]}, {query.shape[2]})"
        )
    if memory_masks.shape[1] < 1 or query.shape[0] < 1 or query.shape[1] < 1 or query.shape[2] < 1:
        raise ValueError(
            f"empty dimension in query {tuple(query.shape)} or memory_masks {tuple(memory_masks.shape)}"
        )
    devices = {query.device, memory_feats.device, memory_masks.device}
    if len(devices) > 1:
        names = ", ".join(sorted(str(device) for device in devices))
        raise ValueError(f"query, memory_feats and memory_masks are on different devices: {names}")
