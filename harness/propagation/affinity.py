"""Label propagation for one frame: windowed top-k affinities between a query frame and a memory of frames.

This reproduces the propagation of the released code (DINO's video segmentation evaluation): L2-normalised
features, affinity exp(similarity / T), a local (2r+1) x (2r+1) window, top-k over all keys of all memory
frames jointly (ties with the k-th kept), weights normalised to sum 1, and a weighted sum of memory masks.

The released code builds the dense (N*h*w) x (h*w) affinity; at DAVIS scale that is several GB and most of
it is zeroed by the window. Here the query grid is cut into small rectangular blocks, and each block is
matched with one matrix product against only the key rectangle its windows can reach (in every memory
frame), so work and memory scale with the window area instead of the grid area. The memory is kept
position-major, (h, w, N, C); the blocks of one block column share a contiguous copy of their key columns
(a strip), in which any run of key rows is one (keys x C) matrix. Everything is computed in logit space
(log of the affinity): top-k on logits is the same as top-k on exp(logits), and subtracting each query's
maximum before exp cancels in the normalisation while avoiding overflow and underflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from harness.errors import ConfigError

SIMILARITIES = ("cosine", "l2", "l1")

#: The working set (a key strip plus one block's logits) that planning keeps under.
DEFAULT_BUDGET_BYTES = 256 * 2**20

#: Query block (rows, columns) for windowed propagation. A block of b_h x b_w queries is matched with
#: (b_h + 2r) x (b_w + 2r) keys per memory frame, so small blocks waste few products on keys outside the
#: windows, while large blocks make bigger (faster) products and fewer calls. 8 x 8 was among the fastest
#: shapes measured on CPU at DAVIS scale (r = 15); on CUDA kernel launches cost more, so blocks are larger.
DEFAULT_TILE = (8, 8)
DEFAULT_CUDA_TILE = (16, 16)

_FLOAT_BYTES = 4
#: Bytes per (query, key) pair of one block: the key-major logits and their query-major copy.
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
    key rectangle is inside every query's window (no window, or one that spans the grid): no mask needed.
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
    """Key rows x columns (all memory frames) copied once and shared by the blocks whose keys lie inside.

    ``whole_grid`` strips need no copy when the memory is contiguous: it is then used in place.
    """

    key_rows: tuple[int, int]
    key_cols: tuple[int, int]
    blocks: tuple[QueryBlock, ...]
    whole_grid: bool

    @property
    def num_key_positions(self) -> int:
        return (self.key_rows[1] - self.key_rows[0]) * (self.key_cols[1] - self.key_cols[0])


def strip_bytes(strip: KeyStrip, n_memory: int, channels: int, n_classes: int) -> int:
    """Bytes of a strip's copy (features and masks)."""
    return strip.num_key_positions * n_memory * (channels + n_classes) * _FLOAT_BYTES


def block_bytes(block: QueryBlock, n_memory: int) -> int:
    """Bytes of the (keys x queries) matrices one block needs at once."""
    return block.num_queries * block.num_key_positions * n_memory * _PAIR_BYTES


def _reach(start: int, stop: int, radius: int, size: int) -> tuple[int, int]:
    """The half-open range of positions within ``radius`` of [start, stop), clipped to the grid."""
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
    """Cut the query grid into blocks, grouped by key strip, so the working set stays within the budget.

    Without a window (radius 0, or one that spans the grid) every query needs every key: one whole-grid
    strip, queries in bands of rows whose logits fit the budget. With a window, queries are tiled ``tile``
    (rows, cols), halved while one tile's logits or keys would take more than half the budget; the blocks
    of one tile column share a column strip of keys, cut into row groups that fit the other half. A single
    row or position is never split, so a tiny budget is exceeded rather than refused.
    """
    if radius == 0 or (radius >= height - 1 and radius >= width - 1):
        row_bytes = width * height * width * n_memory * _PAIR_BYTES
        band = max(1, min(height, budget_bytes // max(row_bytes, 1)))
        blocks = tuple(
            QueryBlock((y0, min(height, y0 + band)), (0, width), (0, height), (0, width), windowed=False)
            for y0 in range(0, height, band)
        )
        return [KeyStrip((0, height), (0, width), blocks, whole_grid=True)]

    tile_rows, tile_cols = max(1, min(tile[0], height)), max(1, min(tile[1], width))
    while tile_rows * tile_cols > 1:
        key_positions = min(height, tile_rows + 2 * radius) * min(width, tile_cols + 2 * radius)
        logits = tile_rows * tile_cols * key_positions * n_memory * _PAIR_BYTES
        keys = key_positions * n_memory * (channels + n_classes) * _FLOAT_BYTES
        if max(logits, keys) <= budget_bytes // 2:
            break
        if tile_rows >= tile_cols:
            tile_rows = (tile_rows + 1) // 2
        else:
            tile_cols = (tile_cols + 1) // 2

    strips: list[KeyStrip] = []
    for x0 in range(0, width, tile_cols):
        x1 = min(width, x0 + tile_cols)
        key_cols = _reach(x0, x1, radius, width)
        bytes_per_key_row = (key_cols[1] - key_cols[0]) * n_memory * (channels + n_classes) * _FLOAT_BYTES
        group: list[QueryBlock] = []
        for y0 in range(0, height, tile_rows):
            y1 = min(height, y0 + tile_rows)
            block = QueryBlock((y0, y1), (x0, x1), _reach(y0, y1, radius, height), key_cols, windowed=True)
            if group and (block.key_rows[1] - group[0].key_rows[0]) * bytes_per_key_row > budget_bytes // 2:
                strips.append(_strip_of(group))
                group = []
            group.append(block)
        strips.append(_strip_of(group))
    return strips


def _strip_of(blocks: list[QueryBlock]) -> KeyStrip:
    rows = (blocks[0].key_rows[0], blocks[-1].key_rows[1])
    return KeyStrip(rows, blocks[0].key_cols, tuple(blocks), whole_grid=False)


# -- computation ----------------------------------------------------------------------------------------


def unit_query(query: torch.Tensor) -> torch.Tensor:
    """(C, h, w) features -> (h, w, C) float32 unit vectors, bit for bit those of F.normalize(dim=0)."""
    channels, height, width = query.shape
    query = query.to(torch.float32)
    result = torch.empty((height, width, channels), dtype=torch.float32, device=query.device)
    # a 2-D transpose copy takes the fast blocked path; a 3-D permuted copy does not
    result.view(-1, channels).copy_(query.reshape(channels, -1).t())
    result.view(-1, channels).div_(_channel_norms(query, dim=0).reshape(-1, 1))
    return result


def unit_memory(memory: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) features -> position-major (h, w, N, C) float32 unit vectors, bit for bit those of
    F.normalize(dim=1)."""
    n_memory, channels, height, width = memory.shape
    memory = memory.to(torch.float32)
    norms = _channel_norms(memory, dim=1).reshape(n_memory, -1, 1)
    result = torch.empty((height, width, n_memory, channels), dtype=torch.float32, device=memory.device)
    frame = torch.empty((height * width, channels), dtype=torch.float32, device=memory.device)
    for index in range(n_memory):  # frame by frame, so each transpose is 2-D (see unit_query)
        frame.copy_(memory[index].reshape(channels, -1).t()).div_(norms[index])
        result[:, :, index] = frame.view(height, width, channels)
    return result


def _channel_norms(features: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norms over ``dim`` exactly as F.normalize computes them (same reduction, same layout).

    Bit-exact unit vectors matter: top-k is discontinuous, and a 1-ulp difference in a norm moves a few
    near-tied k-th affinities per DAVIS frame to the other side of the cut compared with the released code.
    """
    return features.norm(2, dim, keepdim=True).clamp_min_(_NORMALISE_EPS)


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


def _window_bias(
    block: QueryBlock, radius: int, device: torch.device, workspace: PropagationWorkspace
) -> torch.Tensor:
    """0 inside each query's window and -inf outside, as (key rows, key cols, 1, Q).

    The 1 broadcasts over the memory frames of the key order (row, column, frame); the window is
    separable, so it is built from one (key, query) comparison per axis. It depends only on where the
    queries sit relative to the key rectangle, so interior blocks (and frames) share one cached tensor.
    """
    (kr0, kr1), (kc0, kc1) = block.key_rows, block.key_cols
    (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
    key = (radius, str(device), qr0 - kr0, qr1 - kr0, kr1 - kr0, qc0 - kc0, qc1 - kc0, kc1 - kc0)
    if key not in workspace.window_biases:
        far_y = (torch.arange(kr0, kr1)[:, None] - torch.arange(qr0, qr1)[None, :]).abs() > radius
        far_x = (torch.arange(kc0, kc1)[:, None] - torch.arange(qc0, qc1)[None, :]).abs() > radius
        far = far_y[:, None, :, None] | far_x[None, :, None, :]  # (kh, kw, qh, qw)
        far = far.reshape(kr1 - kr0, kc1 - kc0, 1, block.num_queries)
        bias = torch.zeros(far.shape, dtype=torch.float32).masked_fill_(far, float("-inf"))
        workspace.window_biases[key] = bias.to(device)
    return workspace.window_biases[key]


def _fill_logits(
    out: torch.Tensor, keys: torch.Tensor, queries_t: torch.Tensor, similarity: str, temperature: float
) -> None:
    """Write log(affinity) of keys (K, C) against queries (C, q) into ``out`` (K, q).

    Key-major because (many keys) x C times C x (few queries) is the faster product shape on CPU BLAS.
    The dot product is divided by T afterwards, as the released code does (multiplying by 1/T, or scaling
    the queries first, rounds differently and moves near-ties across the top-k cut).
    """
    if similarity == "l1":
        distances = torch.cdist(keys, queries_t.t().contiguous(), p=1)
        torch.div(distances, -temperature, out=out)
        return
    torch.mm(keys, queries_t, out=out)
    if similarity == "l2":  # ||a - b|| = sqrt(2 - 2 <a, b>) for unit vectors
        out.mul_(-2.0).add_(2.0).clamp_min_(0.0).sqrt_().neg_()
    out.div_(temperature)


def _weighted_masks(logits: torch.Tensor, masks: torch.Tensor, topk: int) -> torch.Tensor:
    """Keep each row's keys whose affinity is >= its k-th largest (ties kept), normalise, mix the masks.

    ``logits`` is (Q, K) and ``masks`` (K, K+1); returns (Q, K+1). Keys masked to -inf are invalid: if
    fewer than k are finite, the k-th value is -inf, all finite keys are among the top k, and exp(-inf) = 0
    gives the others no weight. Ties are judged on the float32 affinities exp(logit), as the released code
    compares them: two logits a rounding apart can share one affinity. The (k+1)-th largest tells which
    rows have such a tie at the k-th place; every other row is exactly its top k, mixed from the top-k
    indices alone, and only the tied rows (rare) go through the full row.
    """
    n_keys = logits.shape[1]
    k = min(topk, n_keys)
    top = torch.topk(logits, min(k + 1, n_keys), dim=1, sorted=True)
    values, indices = top.values[:, :k], top.indices[:, :k]
    row_max, kth = values[:, :1], values[:, k - 1 :]
    weights = (values - row_max).exp_()
    mixed = torch.einsum("qk,qkc->qc", weights, masks[indices]).div_(weights.sum(dim=1, keepdim=True))
    if k < n_keys:
        after = top.values[:, k:]
        kth_affinity = kth.exp()
        # affinities compare as the released code's only while they are normal floats; where exp over- or
        # underflows (extreme T, where the released code divides inf or 0 by itself), logits compare
        by_affinity = torch.isfinite(kth_affinity) & (kth_affinity > 0)
        tied = torch.where(by_affinity, after.exp() == kth_affinity, after == kth) & torch.isfinite(kth)
        tied_rows = torch.nonzero(tied.squeeze(1)).squeeze(1)
        if tied_rows.numel() > 0:
            rows, rows_max = logits[tied_rows], row_max[tied_rows]
            below = torch.where(
                by_affinity[tied_rows], rows.exp() < kth_affinity[tied_rows], rows < kth[tied_rows]
            )
            full = (rows - rows_max).masked_fill_(below, float("-inf")).exp_()
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
    rows_per_product: int | None = None,
    workspace: PropagationWorkspace | None = None,
) -> torch.Tensor:
    """The propagation on prepared tensors; returns the soft output as (h, w, K+1).

    ``query`` (h, w, C) and ``memory_feats`` (h, w, N, C) hold unit vectors (see unit_query, unit_memory),
    ``memory_masks`` is (h, w, N, K+1); all float32 on one device. The memory may be a view of the first N
    frames of a larger ring buffer (h, w, slots, C). ``rows_per_product`` splits a block's key rows into
    several matrix products, each with only the query rows those key rows reach (1 = exactly the window's
    rows: fewer multiply-adds but many more, smaller calls); by default each block is one product.
    Arguments are not validated here.
    """
    height, width, n_memory, channels = memory_feats.shape
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
    in_place = memory_feats.is_contiguous() and memory_masks.is_contiguous()
    largest_strip = max(0 if s.whole_grid and in_place else s.num_key_positions for s in strips) * n_memory
    feat_buffer = workspace.buffer("strip_feats", largest_strip * channels, device)
    mask_buffer = workspace.buffer("strip_masks", largest_strip * n_classes, device)
    largest_block = max(b.num_queries * b.num_key_positions for s in strips for b in s.blocks) * n_memory
    key_major_buffer = workspace.buffer("key_major", largest_block, device)
    query_major_buffer = workspace.buffer("query_major", largest_block, device)
    output = torch.empty((height, width, n_classes), dtype=torch.float32, device=device)

    for strip in strips:
        (sr0, sr1), (sc0, sc1) = strip.key_rows, strip.key_cols
        if strip.whole_grid and in_place:
            strip_feats, strip_masks = memory_feats, memory_masks
        else:  # contiguous (rows, cols, N, ...): any run of its rows is one (keys x C) matrix
            shape = (sr1 - sr0, sc1 - sc0, n_memory)
            size = shape[0] * shape[1] * shape[2]
            strip_feats = feat_buffer[: size * channels].view(*shape, channels)
            strip_feats.copy_(memory_feats[sr0:sr1, sc0:sc1])
            strip_masks = mask_buffer[: size * n_classes].view(*shape, n_classes)
            strip_masks.copy_(memory_masks[sr0:sr1, sc0:sc1])
        for block in strip.blocks:
            mixed = _propagate_block(
                block,
                query,
                strip_feats[block.key_rows[0] - sr0 : block.key_rows[1] - sr0],
                strip_masks[block.key_rows[0] - sr0 : block.key_rows[1] - sr0],
                key_major_buffer,
                query_major_buffer,
                similarity=similarity,
                temperature=temperature,
                topk=topk,
                radius=radius,
                rows_per_product=rows_per_product,
                workspace=workspace,
            )
            (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
            output[qr0:qr1, qc0:qc1] = mixed.view(qr1 - qr0, qc1 - qc0, n_classes)
    return output


def _propagate_block(
    block: QueryBlock,
    query: torch.Tensor,
    keys: torch.Tensor,
    key_masks: torch.Tensor,
    key_major_buffer: torch.Tensor,
    query_major_buffer: torch.Tensor,
    *,
    similarity: str,
    temperature: float,
    topk: int,
    radius: int,
    rows_per_product: int | None,
    workspace: PropagationWorkspace,
) -> torch.Tensor:
    """Soft output (Q, K+1) of one block; ``keys`` (kh, kw, N, C) and ``key_masks`` are contiguous."""
    (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
    kr0, kr1 = block.key_rows
    key_rows, key_cols, n_memory, channels = keys.shape
    n_queries, block_width = block.num_queries, qc1 - qc0
    n_keys = key_rows * key_cols * n_memory
    queries_t = query[qr0:qr1, qc0:qc1].reshape(n_queries, channels).t().contiguous()
    key_major = key_major_buffer[: n_keys * n_queries].view(key_rows, -1, n_queries)
    step = key_rows if rows_per_product is None else max(1, rows_per_product)
    for row0 in range(kr0, kr1, step):
        row1 = min(kr1, row0 + step)
        # the query rows whose windows reach key rows [row0, row1): a contiguous range of columns
        first, last = (max(qr0, row0 - radius), min(qr1, row1 + radius)) if block.windowed else (qr0, qr1)
        start, stop = (first - qr0) * block_width, (last - qr0) * block_width
        target = key_major[row0 - kr0 : row1 - kr0].view(-1, n_queries)
        if start > 0:
            target[:, :start].fill_(float("-inf"))
        if stop < n_queries:
            target[:, stop:].fill_(float("-inf"))
        row_keys = keys[row0 - kr0 : row1 - kr0].view(-1, channels)
        _fill_logits(target[:, start:stop], row_keys, queries_t[:, start:stop], similarity, temperature)
    if block.windowed:
        bias = _window_bias(block, radius, keys.device, workspace)
        key_major.view(key_rows, key_cols, n_memory, n_queries).add_(bias)
    # top-k runs along rows: one blocked transpose copy beats top-k across a strided dimension
    query_major = query_major_buffer[: n_keys * n_queries].view(n_queries, n_keys)
    query_major.copy_(key_major.view(n_keys, n_queries).t())
    return _weighted_masks(query_major, key_masks.view(n_keys, -1), topk)


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
        unit_query(query),
        unit_memory(memory_feats),
        memory_masks.to(torch.float32).permute(2, 3, 0, 1).contiguous(),
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
