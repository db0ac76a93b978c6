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

On CPUs with bfloat16 instructions the blocks are screened (harness.methods.labelprop.screening): one bfloat16
product per block bounds which keys can be in a query's top k, and only those are multiplied again in
float32, so the result is the float32 one. The strips of a screened frame are split between threads.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from harness.errors import ConfigError
from harness.methods.labelprop.filters import CorrespondenceFilter, FilterContext, FilterStats
from harness.methods.labelprop.screening import (
    MAX_CANDIDATE_FRACTION,
    ScreeningStats,
    candidate_keys,
    screening_available,
)

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


def unit_memory(memory: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, h, w) features -> position-major (h, w, N, C) float32 unit vectors, bit for bit those of
    F.normalize(dim=1). ``out`` (a reused (h, w, N, C) float32 buffer) spares the page faults of a fresh
    tensor, which on a CPU cost more than the normalisation itself at DAVIS scale."""
    n_memory, channels, height, width = memory.shape
    memory = memory.to(torch.float32)
    norms = _channel_norms(memory, dim=1).reshape(n_memory, -1, 1)
    shape = (height, width, n_memory, channels)
    result = torch.empty(shape, dtype=torch.float32, device=memory.device) if out is None else out
    if result.shape != shape or result.dtype != torch.float32 or not result.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}")
    for index in range(n_memory):  # frame by frame, so each transpose is 2-D (see unit_query)
        frame = result[:, :, index].view(height * width, channels)  # rows N * C apart
        torch.div(memory[index].reshape(channels, -1).t(), norms[index], out=frame)
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
    screening: ScreeningStats = field(default_factory=ScreeningStats)
    filtering: FilterStats = field(default_factory=FilterStats)

    def buffer(
        self, name: str, numel: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A flat tensor of at least ``numel`` elements (grown, never shrunk)."""
        current = self.buffers.get(name)
        if current is None or current.numel() < numel or current.device != device or current.dtype != dtype:
            current = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[name] = current
        return current[:numel]


def _window_bias(
    block: QueryBlock,
    radius: int,
    device: torch.device,
    workspace: PropagationWorkspace,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """0 inside each query's window and -inf outside, as (key rows, key cols, 1, Q).

    The 1 broadcasts over the memory frames of the key order (row, column, frame); the window is
    separable, so it is built from one (key, query) comparison per axis. It depends only on where the
    queries sit relative to the key rectangle, so interior blocks (and frames) share one cached tensor.
    """
    (kr0, kr1), (kc0, kc1) = block.key_rows, block.key_cols
    (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
    key = (radius, str(device), dtype, qr0 - kr0, qr1 - kr0, kr1 - kr0, qc0 - kc0, qc1 - kc0, kc1 - kc0)
    if key not in workspace.window_biases:
        far_y = (torch.arange(kr0, kr1)[:, None] - torch.arange(qr0, qr1)[None, :]).abs() > radius
        far_x = (torch.arange(kc0, kc1)[:, None] - torch.arange(qc0, qc1)[None, :]).abs() > radius
        far = far_y[:, None, :, None] | far_x[None, :, None, :]  # (kh, kw, qh, qw)
        far = far.reshape(kr1 - kr0, kc1 - kc0, 1, block.num_queries)
        bias = torch.zeros(far.shape, dtype=dtype).masked_fill_(far, float("-inf"))
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
    screen: bool | None = None,
    memory_bf16: torch.Tensor | None = None,
    workspace: PropagationWorkspace | None = None,
    correspondence_filter: CorrespondenceFilter | None = None,
    filter_context: FilterContext | None = None,
) -> torch.Tensor:
    """The propagation on prepared tensors; returns the soft output as (h, w, K+1).

    ``query`` (h, w, C) and ``memory_feats`` (h, w, N, C) hold unit vectors (see unit_query, unit_memory),
    ``memory_masks`` is (h, w, N, K+1); all float32 on one device. The memory may be a view of the first N
    frames of a larger ring buffer (h, w, slots, C). ``rows_per_product`` splits a block's key rows into
    several matrix products, each with only the query rows those key rows reach (1 = exactly the window's
    rows: fewer multiply-adds but many more, smaller calls); by default each block is one product.
    ``screen`` picks keys with a bfloat16 product and recomputes only those in float32 (same result, see
    harness.methods.labelprop.screening); None uses it where it is faster (CPUs with bf16 instructions,
    cosine and l2), False never, True wherever the similarity allows (l1 has no such bound).
    ``memory_bf16`` is the memory rounded to bfloat16, if the caller keeps one (converted here otherwise).
    ``correspondence_filter`` (with its ``filter_context``) drops (key, query) pairs after the window and
    before the top-k on either path (see harness.methods.labelprop.filters). Arguments are not validated.
    """
    height, width, n_memory, channels = memory_feats.shape
    n_classes = memory_masks.shape[-1]
    device = memory_feats.device
    if correspondence_filter is not None and filter_context is None:
        raise ValueError("a correspondence filter needs a filter_context")
    workspace = workspace if workspace is not None else PropagationWorkspace()
    screening = uses_screening(screen, similarity, device, workspace)
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
    if screening and memory_bf16 is None:
        memory_bf16 = workspace.buffer("memory_bf16", memory_feats.numel(), device, torch.bfloat16)
        memory_bf16 = memory_bf16.view(memory_feats.shape).copy_(memory_feats)
    # strips are used in place when they cover a contiguous memory (no window), copied otherwise
    if screening:
        in_place = memory_bf16.is_contiguous()
    else:
        in_place = memory_feats.is_contiguous() and memory_masks.is_contiguous()
    largest_strip = max(0 if s.whole_grid and in_place else s.num_key_positions for s in strips) * n_memory
    largest_block = max(b.num_queries * b.num_key_positions for s in strips for b in s.blocks) * n_memory
    frame = _Frame(
        query=query,
        memory_feats=memory_feats,
        memory_masks=memory_masks,
        similarity=similarity,
        temperature=temperature,
        topk=topk,
        radius=radius,
        rows_per_product=rows_per_product,
        in_place=in_place,
        workspace=workspace,
        correspondence_filter=correspondence_filter,
        filter_context=filter_context,
    )
    if screening:  # the bfloat16 queries and the norms of their rounding errors, for the thresholds
        frame.memory_bf16 = memory_bf16
        frame.query_bf16 = query.to(torch.bfloat16)
        frame.query_rounding = (query - frame.query_bf16.to(torch.float32)).norm(dim=-1)
        # candidates' float32 keys and masks are gathered by storage row (once per frame: a memory view
        # whose rows are not evenly spaced is copied here, not in every block)
        frame.feat_rows, frame.feat_steps = _rows_of(memory_feats)
        frame.mask_rows, frame.mask_steps = _rows_of(memory_masks)
    output = torch.empty((height, width, n_classes), dtype=torch.float32, device=device)

    def buffers(worker: int) -> _Buffers:
        sizes = (largest_strip, largest_block, channels, n_classes, screening)
        return _Buffers(workspace, device, *sizes, suffix="" if worker == 0 else f"/{worker}")

    workers = _cpu_workers(device, len(strips)) if screening else 1
    if workers == 1:
        _propagate_strips(strips, frame, buffers(0), output)
        return output
    # screened strips split between threads of one intra-op thread each, so that the many small steps
    # between the products overlap (about 6 % faster per DAVIS-scale frame on 2 cores; the float32 path
    # was 15 % slower this way, its products being larger, so it keeps the intra-op threads)
    threads_before = torch.get_num_threads()

    def work(worker: int) -> None:
        torch.set_num_threads(1)  # OpenMP and MKL counts are per thread: the caller keeps its own
        _propagate_strips(strips[worker::workers], frame, buffers(worker), output)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="propagate") as pool:
            for finished in [pool.submit(work, worker) for worker in range(workers)]:
                finished.result()
    finally:
        torch.set_num_threads(threads_before)  # the process-wide default a new thread starts from
    return output


def _cpu_workers(device: torch.device, n_strips: int) -> int:
    """Threads for one frame: the intra-op thread count on a CPU (at most one per strip), 1 elsewhere."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), n_strips))


@dataclass
class _Frame:
    """What every block of one frame reads: prepared inputs and settings (never written by the blocks)."""

    query: torch.Tensor
    memory_feats: torch.Tensor
    memory_masks: torch.Tensor
    similarity: str
    temperature: float
    topk: int
    radius: int
    rows_per_product: int | None
    in_place: bool
    workspace: PropagationWorkspace
    correspondence_filter: CorrespondenceFilter | None = None
    filter_context: FilterContext | None = None
    memory_bf16: torch.Tensor | None = None
    query_bf16: torch.Tensor | None = None
    query_rounding: torch.Tensor | None = None
    feat_rows: torch.Tensor | None = None
    feat_steps: tuple[int, int, int] = (0, 0, 0)
    mask_rows: torch.Tensor | None = None
    mask_steps: tuple[int, int, int] = (0, 0, 0)

    @property
    def screening(self) -> bool:
        return self.memory_bf16 is not None


def _propagate_strips(strips: list[KeyStrip], frame: _Frame, buffers: _Buffers, output: torch.Tensor) -> None:
    """Write the soft output of every block of ``strips`` into ``output`` (h, w, K+1)."""
    memory_feats, memory_masks = frame.memory_feats, frame.memory_masks
    n_memory, channels = memory_feats.shape[2:]
    n_classes = memory_masks.shape[-1]
    settings = dict(similarity=frame.similarity, temperature=frame.temperature, topk=frame.topk)
    for strip in strips:
        (sr0, sr1), (sc0, sc1) = strip.key_rows, strip.key_cols
        shape = (sr1 - sr0, sc1 - sc0, n_memory)
        size = shape[0] * shape[1] * shape[2]
        if frame.screening and strip.whole_grid and frame.in_place:
            strip_keys = frame.memory_bf16
        elif frame.screening:  # only the bfloat16 keys are copied; float32 keys are gathered as needed
            strip_keys = buffers.strip_bf16[: size * channels].view(*shape, channels)
            strip_keys.copy_(frame.memory_bf16[sr0:sr1, sc0:sc1])
        elif strip.whole_grid and frame.in_place:
            strip_keys, strip_masks = memory_feats, memory_masks
        else:  # contiguous (rows, cols, N, ...): any run of its rows is one (keys x C) matrix
            strip_keys = buffers.strip_feats[: size * channels].view(*shape, channels)
            strip_keys.copy_(memory_feats[sr0:sr1, sc0:sc1])
            strip_masks = buffers.strip_masks[: size * n_classes].view(*shape, n_classes)
            strip_masks.copy_(memory_masks[sr0:sr1, sc0:sc1])
        for block in strip.blocks:
            block_rows = slice(block.key_rows[0] - sr0, block.key_rows[1] - sr0)
            mixed = None
            if frame.screening:
                mixed = _screened_block(block, frame, strip_keys[block_rows], buffers)
                if mixed is None:  # too many candidates: the block's float32 keys, as the exact path needs
                    (kr0, kr1), (kc0, kc1) = block.key_rows, block.key_cols
                    block_shape = (kr1 - kr0, kc1 - kc0, n_memory)
                    block_size = block_shape[0] * block_shape[1] * n_memory
                    keys = buffers.strip_feats[: block_size * channels].view(*block_shape, channels)
                    keys.copy_(memory_feats[kr0:kr1, kc0:kc1])
                    key_masks = buffers.strip_masks[: block_size * n_classes].view(*block_shape, n_classes)
                    key_masks.copy_(memory_masks[kr0:kr1, kc0:kc1])
            else:
                keys, key_masks = strip_keys[block_rows], strip_masks[block_rows]
            if mixed is None:
                mixed = _propagate_block(
                    block,
                    frame.query,
                    keys,
                    key_masks,
                    buffers.key_major,
                    buffers.query_major,
                    radius=frame.radius,
                    rows_per_product=frame.rows_per_product,
                    workspace=frame.workspace,
                    frame=frame,
                    **settings,
                )
            (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
            output[qr0:qr1, qc0:qc1] = mixed.view(qr1 - qr0, qc1 - qc0, n_classes)


def uses_screening(
    screen: bool | None, similarity: str, device: torch.device, workspace: PropagationWorkspace
) -> bool:
    """Whether a frame is screened in bfloat16: see propagate_prepared's ``screen``."""
    if screen is False or similarity == "l1":
        return False
    if screen is True:
        return True
    return screening_available(device) and workspace.screening.worthwhile


class _Buffers:
    """One worker's scratch tensors for one frame's plan (a strip, a block's logits), kept in the workspace
    under names ending in ``suffix`` so that the worker threads of a frame never share one."""

    def __init__(
        self,
        workspace: PropagationWorkspace,
        device: torch.device,
        largest_strip: int,
        largest_block: int,
        channels: int,
        n_classes: int,
        screening: bool,
        suffix: str = "",
    ) -> None:
        self.workspace, self.device, self.suffix = workspace, device, suffix
        # screening copies strips in bfloat16 only; a block that falls back copies its own float32 keys
        keys = largest_block if screening else largest_strip
        screened = largest_block if screening else 0
        bf16 = torch.bfloat16
        self.strip_feats = self._buffer("strip_feats", keys * channels)
        self.strip_masks = self._buffer("strip_masks", keys * n_classes)
        self.key_major = self._buffer("key_major", largest_block)
        self.query_major = self._buffer("query_major", largest_block)
        self.strip_bf16 = self._buffer("strip_bf16", (largest_strip if screening else 0) * channels, bf16)
        self.key_major_bf16 = self._buffer("key_major_bf16", screened, bf16)
        self.candidates = self._buffer("candidates", screened, torch.bool)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.workspace.buffer(name + self.suffix, numel, self.device, dtype)

    def gathered(self, name: str, rows: int, columns: int) -> torch.Tensor:
        """A (rows, columns) float32 buffer for index_select(out=...): fresh tensors pay page faults."""
        return self._buffer(name, rows * columns).view(rows, columns)


def _rows_of(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(h, w, N, D) -> a (rows, D) view of its storage and the row strides of h, w and N.

    The memory may be a view of the first N slots of a ring buffer, which no reshape can flatten; its rows
    of D values are still evenly spaced in storage, so one index per (position, frame) reaches them.
    """
    row = tensor.shape[-1]
    strides = tensor.stride()
    if strides[-1] != 1 or any(stride % row for stride in strides[:-1]):
        tensor = tensor.contiguous()
        strides = tensor.stride()
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape[:-1], strides[:-1], strict=True))
    rows = torch.as_strided(tensor, (extent // row + 1, row), (row, 1))
    return rows, (strides[0] // row, strides[1] // row, strides[2] // row)


def _screened_block(
    block: QueryBlock, frame: _Frame, keys_bf16: torch.Tensor, buffers: _Buffers
) -> torch.Tensor | None:
    """Soft output (Q, K+1) of one block through bfloat16 screening, or None when too many keys are
    candidates (the caller then runs the float32 block). ``keys_bf16`` is the block's (kh, kw, N, C)."""
    query, query_bf16, query_rounding = frame.query, frame.query_bf16, frame.query_rounding
    similarity, temperature, topk = frame.similarity, frame.temperature, frame.topk
    (qr0, qr1), (qc0, qc1) = block.query_rows, block.query_cols
    key_rows, key_cols, n_memory, channels = keys_bf16.shape
    n_queries = block.num_queries
    n_keys = key_rows * key_cols * n_memory
    approx = buffers.key_major_bf16[: n_keys * n_queries].view(n_keys, n_queries)
    queries_bf16_t = query_bf16[qr0:qr1, qc0:qc1].reshape(n_queries, channels).t()
    torch.mm(keys_bf16.view(n_keys, channels), queries_bf16_t, out=approx)
    if block.windowed:
        bias = _window_bias(block, frame.radius, keys_bf16.device, frame.workspace, torch.bfloat16)
        approx.view(key_rows, key_cols, n_memory, n_queries).add_(bias)
    unfiltered = 0
    if frame.correspondence_filter is not None:  # before the thresholds: the k-th is among kept keys
        unfiltered = _filter_logits(frame, block, approx.view(key_rows, key_cols, n_memory, n_queries))
    candidates, used = candidate_keys(
        approx,
        key_rows,
        query_rounding[qr0:qr1, qc0:qc1].reshape(1, n_queries),
        channels,
        topk,
        temperature,
        buffers.candidates[: n_keys * n_queries].view(n_keys, n_queries),
    )
    n_used = used.numel()
    fall_back = n_used > MAX_CANDIDATE_FRACTION * n_keys
    frame.workspace.screening.record(fell_back=fall_back, candidate_fraction=n_used / n_keys)
    if fall_back:  # the float32 block filters (and counts) again
        return None
    if frame.correspondence_filter is not None:
        frame.workspace.filtering.record(n_queries, unfiltered)
    # block key order is (row, column, frame): back to rows of the memory's storage
    frames = used % n_memory
    cols = (used // n_memory) % key_cols + block.key_cols[0]
    rows = used // (n_memory * key_cols) + block.key_rows[0]

    def gather(storage_rows: torch.Tensor, steps: tuple[int, int, int], name: str) -> torch.Tensor:
        index = rows * steps[0] + cols * steps[1] + frames * steps[2]
        out = buffers.gathered(name, n_used, storage_rows.shape[1])
        return torch.index_select(storage_rows, 0, index, out=out)

    keys = gather(frame.feat_rows, frame.feat_steps, "candidate_feats")
    key_masks = gather(frame.mask_rows, frame.mask_steps, "candidate_masks")
    queries_t = query[qr0:qr1, qc0:qc1].reshape(n_queries, channels).t().contiguous()
    exact = buffers.key_major[: n_used * n_queries].view(n_used, n_queries)
    _fill_logits(exact, keys, queries_t, similarity, temperature)
    exact.masked_fill_(~candidates.index_select(0, used), float("-inf"))
    logits = buffers.gathered("candidate_logits", n_queries, n_used)
    return _weighted_masks(logits.copy_(exact.t()), key_masks, topk)


def _filter_logits(frame: _Frame, block: QueryBlock, logits: torch.Tensor) -> int:
    """Set the logits (kh, kw, N, Q) of pairs the frame's filter drops to -inf, in place; returns how many
    queries had no kept key inside their window and so keep the unfiltered window.

    Inside the window means a logit above -inf (the window bias is -inf, products are finite), the same on
    the float32 and the bfloat16 path, so both make the same decisions.
    """
    assert frame.correspondence_filter is not None and frame.filter_context is not None
    keep = frame.correspondence_filter.keep(frame.filter_context, block).to(logits.device)
    if keep.shape != logits.shape:
        raise ValueError(
            f"filter {frame.correspondence_filter.name!r} returned a keep-mask of shape {tuple(keep.shape)}, "
            f"expected {tuple(logits.shape)}"
        )
    inside = logits > float("-inf")
    empty = ~(keep & inside).flatten(0, 2).any(dim=0)  # (Q,)
    logits.masked_fill_(~(keep | empty), float("-inf"))
    return int(empty.sum())


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
    frame: _Frame | None = None,
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
    if frame is not None and frame.correspondence_filter is not None:
        unfiltered = _filter_logits(frame, block, key_major.view(key_rows, key_cols, n_memory, n_queries))
        frame.workspace.filtering.record(n_queries, unfiltered)
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
    screen: bool | None = None,
    workspace: PropagationWorkspace | None = None,
    correspondence_filter: CorrespondenceFilter | None = None,
    filter_context: FilterContext | None = None,
) -> torch.Tensor:
    """Soft labels (K+1, h, w) of a query frame (C, h, w) from memory features (N, C, h, w) and memory
    masks (N, K+1, h, w).

    Each position's output is the affinity-weighted mean of the memory masks at its kept keys (weights sum
    to 1; no further normalisation). Runs in float32 on the device of the inputs (``screen``: see
    propagate_prepared; it changes the speed, not the result). Pass the same ``workspace`` to successive
    calls to reuse its buffers (the normalised memory included).
    """
    check_propagation_params(similarity, temperature, topk, radius)
    _check_shapes(query, memory_feats, memory_masks)
    workspace = workspace if workspace is not None else PropagationWorkspace()
    n_memory, channels, height, width = memory_feats.shape
    device = memory_feats.device
    prepared = workspace.buffer("prepared_feats", memory_feats.numel(), device)
    prepared = unit_memory(memory_feats, out=prepared.view(height, width, n_memory, channels))
    masks = workspace.buffer("prepared_masks", memory_masks.numel(), device)
    masks = masks.view(height, width, n_memory, memory_masks.shape[1])
    masks.copy_(memory_masks.permute(2, 3, 0, 1))
    soft = propagate_prepared(
        unit_query(query),
        prepared,
        masks,
        similarity=similarity,
        temperature=float(temperature),
        topk=topk,
        radius=radius,
        screen=screen,
        workspace=workspace,
        correspondence_filter=correspondence_filter,
        filter_context=filter_context,
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
