"""Label propagation for one frame: :func:`harness.methods.labelprop.propagate_frame` against the released
algorithm, on the same inputs, in the same run.

The baseline below is written from the description of the released code (DINO's video segmentation
evaluation, as the paper's code uses it): for every memory frame the dense (h*w) x (h*w) affinity
exp(<q, k> / T) of L2-normalised features, multiplied by a 0/1 local-window mask that four nested Python
loops build, all memory frames stacked into one (N*h*w) x (h*w) matrix, top-k over its key axis,
``aff[aff < kth] = 0``, normalisation, and one matrix product with the memory masks.

Where this baseline differs from the original it is in the original's favour, so the ratios are, if
anything, too small: the window is kept once as (h*w) x (h*w) instead of being repeated for every memory
frame, the query is broadcast instead of repeated, each frame's affinity is written straight into the
stacked matrix (no concatenation copy, no transposed copy) and the normalisation is in place. The window is
built once per benchmark case, as the original builds it once per video; its build time is reported on its
own and is not part of the per-frame time.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.bench.common import (
    SHARED_REAL_DAVIS,
    BenchOptions,
    cuda_peak_bytes,
    format_bytes,
    format_table,
    peak_rss_increase,
    run_in_fresh_process,
    time_calls,
    time_interleaved,
)
from harness.errors import HarnessError
from harness.methods.labelprop import (
    PropagationWorkspace,
    propagate_frame,
    propagate_prepared,
    unit_memory,
    unit_query,
)
from harness.methods.labelprop.diagnostics import CorrespondenceStats, truth_channels
from harness.methods.labelprop.screening import screening_available
from harness.tracking.environment import memory_available_bytes

#: the outputs of the two implementations must agree to this before anything is timed (see check_agreement)
AGREEMENT_TOLERANCE = 1e-5
#: relative gap between the k-th and (k+1)-th affinity below which the top-k set is decided by rounding
TIE_MARGIN = 1e-4
TARGET_SPEEDUP = 20.0
TARGET_MEMORY_FRACTION = 1 / 5
#: the correspondence diagnostics may add at most this fraction to a sequence step
TARGET_DIAGNOSTICS_OVERHEAD = 0.10


@dataclass(frozen=True)
class PropagationCase:
    """One problem size: feature grid, channels, memory frames and the propagation settings."""

    name: str
    height: int
    width: int
    channels: int = 512
    #: the first frame plus the last 28, as in the paper's setting
    n_memory: int = 29
    radius: int = 15
    topk: int = 15
    #: background + objects
    n_classes: int = 3
    temperature: float = 0.2
    seed: int = 0
    run_baseline: bool = True
    #: peak memory costs a fresh process per method on a CPU; --quick measures it for one case only
    measure_memory: bool = True
    #: why the baseline is not run (reported instead of its numbers)
    skip_reason: str | None = None

    @property
    def positions(self) -> int:
        return self.height * self.width


def cases_for(options: BenchOptions) -> tuple[list[PropagationCase], list[str]]:
    """The cases for the requested scale, and notes that say what was reduced and why."""
    if options.quick:
        small = PropagationCase(
            "small", 12, 20, channels=32, n_memory=5, radius=3, topk=5, measure_memory=False
        )
        # large enough that the dense affinity (68 MB) is mapped fresh, so its peak RSS shows
        larger = PropagationCase("davis-like", 30, 56, channels=16, n_memory=6, radius=2, topk=5)
        return [small, larger], ["--quick: toy grids only; the numbers mean nothing"]
    small = PropagationCase("small 30x52", 30, 52)
    davis = PropagationCase("DAVIS 60x104", 60, 104)
    if options.scale == "reduced":
        reason = (
            "CPU default: the dense baseline at DAVIS scale needs ~6 GB and minutes on 2 cores; run with "
            "--full to measure it once (repeats 1). Its memory is given from the formula instead."
        )
        return [small, replace(davis, run_baseline=False, skip_reason=reason)], [
            "reduced sizes on CPU: the baseline runs on the 30x52 grid only; at 60x104 only ours is timed"
        ]
    if options.device == "cpu":
        note = "--full on CPU: the DAVIS-scale baseline is repeated like ours (about 25 s per call, 6 GB)"
        return [small, davis], [note]
    return [small, davis], []


# -- inputs ------------------------------------------------------------------------------------------


def _smooth_field(channels: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Spatially smooth random maps: real features and masks vary slowly across the grid, which keeps the
    k-th and (k+1)-th affinities of a position apart instead of within rounding error of each other."""
    coarse = torch.randn(
        1, channels, max(1, math.ceil(height / 8)), max(1, math.ceil(width / 8)), generator=generator
    )
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]


def make_inputs(case: PropagationCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query (C, h, w), memory features (N, C, h, w), memory masks (N, K+1, h, w)) on the CPU, float32.

    Built frame by frame into preallocated tensors, so that no temporary as large as the memory is ever
    allocated (it would make a later peak-RSS reading too small).
    """
    generator = torch.Generator().manual_seed(case.seed)
    shape = (case.channels, case.height, case.width)
    scene = _smooth_field(*shape, generator)  # what all frames of the "video" share

    def frame() -> torch.Tensor:
        features = scene + 0.5 * _smooth_field(*shape, generator)
        return features.add_(torch.randn(shape, generator=generator), alpha=0.3)

    query = frame()
    memory = torch.empty((case.n_memory, *shape))
    masks = torch.empty((case.n_memory, case.n_classes, case.height, case.width))
    for index in range(case.n_memory):
        memory[index] = frame()
        masks[index] = torch.softmax(
            3.0 * _smooth_field(case.n_classes, case.height, case.width, generator), 0
        )
    return query, memory, masks


# -- the released algorithm --------------------------------------------------------------------------


def released_window_mask(height: int, width: int, radius: int) -> torch.Tensor:
    """The (h*w) x (h*w) 0/1 local-window mask, built as the released code builds it: four nested Python
    loops over query rows, query columns and window offsets, one element assignment each."""
    mask = torch.zeros(height, width, height, width)
    span = 2 * radius + 1
    for row in range(height):
        for col in range(width):
            for dy in range(span):
                for dx in range(span):
                    key_row, key_col = row - radius + dy, col - radius + dx
                    if 0 <= key_row < height and 0 <= key_col < width:
                        mask[row, col, key_row, key_col] = 1
    return mask.reshape(height * width, height * width)


def window_mask_vectorised(height: int, width: int, radius: int) -> torch.Tensor:
    """The same mask as an outer product of the row and column windows, written straight into the result:
    no temporary larger than one row of it, so building it does not raise the process's peak RSS above
    the mask itself (the memory probe relies on that)."""
    rows = torch.arange(height)
    cols = torch.arange(width)
    near_rows = ((rows[:, None] - rows[None, :]).abs() <= radius).to(torch.float32)  # (h, h)
    near_cols = ((cols[:, None] - cols[None, :]).abs() <= radius).to(torch.float32)  # (w, w)
    mask = torch.empty(height * width, height * width)
    torch.mul(
        near_rows[:, None, :, None], near_cols[None, :, None, :], out=mask.view(height, width, height, width)
    )
    return mask


def released_propagate(
    query: torch.Tensor,
    memory_feats: torch.Tensor,
    memory_masks: torch.Tensor,
    *,
    window: torch.Tensor | None,
    temperature: float,
    topk: int,
    margins: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Soft labels (K+1, h, w) through the dense affinity of every memory frame (see the module text).

    ``window`` is the symmetric (h*w) x (h*w) mask of :func:`released_window_mask`, or None for no window.
    If ``margins`` is a list, the relative gap between each query's k-th and (k+1)-th affinity (h*w,) is
    appended to it (inf where there is no (k+1)-th key): where that gap is within rounding, two correct
    fp32 implementations may keep different keys. Only the agreement check asks for it.
    """
    channels, height, width = query.shape
    n_memory, n_classes = memory_feats.shape[0], memory_masks.shape[1]
    positions = height * width
    queries = F.normalize(query.reshape(channels, positions), dim=0, p=2)  # (C, hw)
    keys = F.normalize(memory_feats.reshape(n_memory, channels, positions), dim=1, p=2)  # (N, C, hw)
    # keys of all frames stacked along the first axis, queries along the second
    affinity = torch.empty((n_memory * positions, positions), dtype=torch.float32, device=query.device)
    for frame in range(n_memory):
        block = affinity[frame * positions : (frame + 1) * positions]
        torch.mm(keys[frame].t(), queries, out=block)
        block.div_(temperature).exp_()
        if window is not None:
            block.mul_(window)
    k = min(topk, affinity.shape[0])
    if margins is None:
        kth = torch.topk(affinity, k, dim=0).values.min(dim=0).values
    else:
        top = torch.topk(affinity, min(k + 1, affinity.shape[0]), dim=0).values
        kth = top[k - 1]
        gap = (kth - top[k]) / kth if k < affinity.shape[0] else torch.full_like(kth, float("inf"))
        # 0 / 0 where fewer than k keys are inside the window: every valid key is kept, nothing to decide
        margins.append(torch.where(torch.isnan(gap), float("inf"), gap))
    affinity[affinity < kth] = 0
    affinity /= affinity.sum(dim=0, keepdim=True)
    masks = memory_masks.reshape(n_memory, n_classes, positions).permute(1, 0, 2).reshape(n_classes, -1)
    return torch.mm(masks, affinity).reshape(n_classes, height, width)


def estimated_baseline_bytes(case: PropagationCase) -> dict[str, int]:
    """The baseline's big allocations, from the sizes alone: the stacked affinity, the boolean mask of
    ``aff < kth``, the resident window and the normalised keys (the original holds more, see above)."""
    dense = case.n_memory * case.positions * case.positions
    window = case.positions * case.positions * 4 if case.radius > 0 else 0
    keys = case.n_memory * case.channels * case.positions * 4
    return {
        "dense_affinity_bytes": dense * 4,
        "window_bytes": window,
        "estimated_peak_bytes": dense * 4 + dense + window + keys,
    }


# -- measurements ------------------------------------------------------------------------------------


def _ours(
    case: PropagationCase,
    inputs: tuple[torch.Tensor, ...],
    workspace: PropagationWorkspace | None = None,
    screen: bool | None = None,
) -> torch.Tensor:
    """One propagate_frame call; with a ``workspace`` its buffers are reused from call to call, as the
    sequence loop reuses them from frame to frame (without, every call maps its buffers afresh)."""
    query, memory, masks = inputs
    return propagate_frame(
        query,
        memory,
        masks,
        similarity="cosine",
        temperature=case.temperature,
        topk=case.topk,
        radius=case.radius,
        screen=screen,
        workspace=workspace,
    )


class SequenceStep:
    """One frame of harness's sequence loop: the memory stays normalised (and, where screening runs, kept
    in bfloat16 too) from frame to frame, so a frame normalises its query, propagates and writes one slot.
    The released code's loop normalises the whole memory again every frame, which its timing includes."""

    def __init__(
        self, case: PropagationCase, inputs: tuple[torch.Tensor, ...], diagnostics: bool = False
    ) -> None:
        query, memory, masks = inputs
        self.case, self.query = case, query
        self.memory = unit_memory(memory)
        self.masks = masks.permute(2, 3, 0, 1).contiguous()
        self.n_classes = masks.shape[1]
        # with diagnostics the sequence loop's memory also carries the one-hot ground truth of its frames
        # (objects 1..K) and each frame records the weight shares; the masks' argmax stands in for it here
        self.stats: CorrespondenceStats | None = None
        if diagnostics:
            n_objects = self.n_classes - 1
            truth = self.masks.argmax(dim=-1)  # (h, w, N)
            self.masks = torch.cat([self.masks, truth_channels(truth, n_objects)], dim=-1).contiguous()
            self.query_truth = truth[:, :, 0]
            self.objects = tuple(range(1, self.n_classes))
            self.stats = CorrespondenceStats()
        self.memory_bf16 = self.memory.to(torch.bfloat16) if screening_available(memory.device) else None
        self.workspace = PropagationWorkspace()
        height, width, _, channels = self.memory.shape
        self.spare = torch.empty((height, width, 1, channels), device=memory.device)
        self.spare_bf16 = torch.empty_like(self.spare, dtype=torch.bfloat16)

    def __call__(self) -> torch.Tensor:
        query = unit_query(self.query)
        soft = propagate_prepared(
            query,
            self.memory,
            self.masks,
            similarity="cosine",
            temperature=self.case.temperature,
            topk=self.case.topk,
            radius=self.case.radius,
            memory_bf16=self.memory_bf16,
            workspace=self.workspace,
        )
        if self.stats is not None:
            self.stats.record(soft[:, :, self.n_classes :], self.query_truth, self.objects)
        # the loop then writes the frame into a slot of its rings (here a spare one, so that every call
        # propagates the same memory)
        self.spare[:, :, 0] = query
        if self.memory_bf16 is not None:
            self.spare_bf16[:, :, 0] = query
        return soft[:, :, : self.n_classes].permute(2, 0, 1)


def _baseline(
    case: PropagationCase,
    inputs: tuple[torch.Tensor, ...],
    window: torch.Tensor | None,
    margins: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    query, memory, masks = inputs
    return released_propagate(
        query, memory, masks, window=window, temperature=case.temperature, topk=case.topk, margins=margins
    )


def check_agreement(
    ours: torch.Tensor, released: torch.Tensor, margins: torch.Tensor, name: str
) -> dict[str, Any]:
    """Raise unless the outputs agree to :data:`AGREEMENT_TOLERANCE` at every position whose top-k set is
    decided by more than rounding (k-th vs (k+1)-th affinity gap >= :data:`TIE_MARGIN`, relative).

    At a near-tie the two implementations round the affinities differently (other summation orders, exp
    before or after the comparison) and may keep different keys; both are correct, so such positions are
    counted and reported, not compared.
    """
    difference = (ours.float() - released.float()).abs().amax(dim=0).reshape(-1).cpu()
    decided = margins.reshape(-1).cpu() >= TIE_MARGIN
    decided_difference = float(difference[decided].max()) if bool(decided.any()) else 0.0
    if not decided_difference <= AGREEMENT_TOLERANCE:
        raise RuntimeError(
            f"case {name}: propagate_frame and the released algorithm disagree by {decided_difference:.3g} "
            f"(> {AGREEMENT_TOLERANCE}) where the top-k set is clear; nothing was timed"
        )
    return {
        "max_abs_diff_decided": decided_difference,
        "max_abs_diff_all": float(difference.max()),
        "near_tie_positions": int((~decided).sum()),
        "positions": int(decided.numel()),
        "tie_margin": TIE_MARGIN,
    }


def peak_rss_worker(case: PropagationCase, method: str) -> dict[str, Any]:
    """In a fresh process: the peak resident memory one call adds above the inputs (and, for the
    baseline, above the resident window). A warm-up call on a toy grid loads the libraries first, and the
    process holds nothing a previous measurement left behind for the call to reuse."""
    inputs = make_inputs(case)
    toy = tuple(tensor[..., :6, :6].contiguous() for tensor in inputs)
    toy_case = replace(case, height=6, width=6, radius=min(case.radius, 2))
    if method == "ours":
        _ours(toy_case, toy)
        increase, how = peak_rss_increase(lambda: _ours(case, inputs))
    else:
        _baseline(toy_case, toy, window_mask_vectorised(6, 6, toy_case.radius))
        window = window_mask_vectorised(case.height, case.width, case.radius) if case.radius > 0 else None
        increase, how = peak_rss_increase(lambda: _baseline(case, inputs, window))
    return {"call_peak_bytes": increase, "method": how}


def _peak_memory(
    case: PropagationCase,
    method: str,
    device: str,
    inputs: tuple[torch.Tensor, ...],
    window: torch.Tensor | None,
    methods_used: set[str],
) -> int | None:
    """Peak memory one call adds (None when the case skips it); ``methods_used`` collects how it was read."""
    if not case.measure_memory:
        return None
    if device == "cuda":
        function = (
            (lambda: _ours(case, inputs)) if method == "ours" else (lambda: _baseline(case, inputs, window))
        )
        _, peak = cuda_peak_bytes(function, device)
        methods_used.add("torch.cuda.max_memory_allocated minus memory_allocated before the call")
        return int(peak)
    measured = run_in_fresh_process(peak_rss_worker, case, method)
    methods_used.add(measured["method"])
    return int(measured["call_peak_bytes"])


def _timed_once(function: Any, device: str) -> tuple[torch.Tensor, float]:
    result: list[torch.Tensor] = []
    timing = time_calls(lambda: result.append(function()), repeats=1, device=device)
    return result[0], timing.seconds[0]


def run_case(case: PropagationCase, options: BenchOptions) -> dict[str, Any]:
    device = options.device
    default_repeats = 2 if options.quick else (10 if device == "cuda" else 3)
    repeats = options.repeats_or(default_repeats)
    cpu_inputs = make_inputs(case)
    inputs = tuple(tensor.to(device) for tensor in cpu_inputs)
    estimate = estimated_baseline_bytes(case)
    entry: dict[str, Any] = {"case": asdict(case), "baseline_estimate": estimate}
    methods: set[str] = set()

    # one workspace per case, as one per sequence: its buffers are mapped by the first call and reused
    workspace = PropagationWorkspace()
    ours_output, ours_first = _timed_once(lambda: _ours(case, inputs, workspace), device)
    fresh = time_calls(lambda: _ours(case, inputs), repeats=repeats, device=device)
    entry["ours_fresh_workspace"] = fresh.to_dict()
    # screening's gain depends on the data (how many keys sit near each k-th); the float32 path's does not
    exact_workspace = PropagationWorkspace()
    float32 = time_calls(lambda: _ours(case, inputs, exact_workspace, False), repeats=repeats, device=device)
    entry["ours_float32"] = float32.to_dict()
    step = SequenceStep(case, inputs)
    if not torch.allclose(step(), ours_output, atol=1e-6):
        raise RuntimeError(f"case {case.name}: the sequence step and propagate_frame disagree")
    entry["ours_sequence_step"] = time_calls(step, repeats=repeats, device=device).to_dict()
    entry["diagnostics"] = _diagnostics_overhead(case, inputs, step, repeats, device)
    del step
    if not case.run_baseline:
        ours_timing = time_calls(lambda: _ours(case, inputs, workspace), repeats=repeats, device=device)
        entry["ours"] = ours_timing.to_dict() | {"first_call_seconds": ours_first}
        entry["ours"]["peak_call_bytes"] = _peak_memory(case, "ours", device, inputs, None, methods)
        entry["baseline"] = {"skipped": case.skip_reason}
        entry["memory_fraction_vs_estimate"] = _fraction(
            entry["ours"]["peak_call_bytes"], estimate["estimated_peak_bytes"]
        )
        entry["memory_methods"] = sorted(methods)
        return entry

    available = memory_available_bytes()
    if device == "cpu" and available is not None and available < 1.2 * estimate["estimated_peak_bytes"]:
        raise HarnessError(
            f"case {case.name}: the dense baseline needs about "
            f"{format_bytes(estimate['estimated_peak_bytes'])} but only {format_bytes(available)} is "
            "available; free memory or leave out --full"
        )
    start = time.perf_counter()
    window = (
        released_window_mask(case.height, case.width, case.radius).to(device) if case.radius > 0 else None
    )
    window_seconds = time.perf_counter() - start
    margins: list[torch.Tensor] = []
    baseline_output, baseline_first = _timed_once(lambda: _baseline(case, inputs, window, margins), device)
    agreement = check_agreement(ours_output, baseline_output, margins[0], case.name)
    entry["agreement_max_abs_diff"] = agreement["max_abs_diff_decided"]
    entry["agreement"] = agreement
    del ours_output, baseline_output
    margins.clear()
    timings = time_interleaved(
        {"ours": lambda: _ours(case, inputs, workspace), "baseline": lambda: _baseline(case, inputs, window)},
        repeats=repeats,
        device=device,
    )
    ours_timing, baseline_timing = timings["ours"], timings["baseline"]
    ours_peak = _peak_memory(case, "ours", device, inputs, window, methods)
    baseline_call_peak = _peak_memory(case, "baseline", device, inputs, window, methods)
    window_bytes = window.numel() * window.element_size() if window is not None else 0
    entry["ours"] = ours_timing.to_dict() | {"first_call_seconds": ours_first, "peak_call_bytes": ours_peak}
    entry["baseline"] = baseline_timing.to_dict() | {
        "first_call_seconds": baseline_first,
        "window_build_seconds": window_seconds,
        "window_bytes": window_bytes,
        "peak_call_bytes": baseline_call_peak,
        "peak_total_bytes": None if baseline_call_peak is None else baseline_call_peak + window_bytes,
    }
    entry["speedup"] = baseline_timing.median / ours_timing.median
    entry["speedup_fresh_workspace"] = baseline_timing.median / fresh.median
    entry["speedup_float32"] = baseline_timing.median / float32.median
    entry["speedup_sequence_step"] = baseline_timing.median / entry["ours_sequence_step"]["median_seconds"]
    entry["memory_fraction"] = _fraction(ours_peak, entry["baseline"]["peak_total_bytes"])
    entry["memory_methods"] = sorted(methods)
    return entry


def _diagnostics_overhead(
    case: PropagationCase, inputs: tuple[torch.Tensor, ...], plain: SequenceStep, repeats: int, device: str
) -> dict[str, Any]:
    """A sequence step with the correspondence diagnostics against one without, timed in turns; the
    diagnostics must leave the masks as they were."""
    with_diagnostics = SequenceStep(case, inputs, diagnostics=True)
    if not torch.allclose(with_diagnostics(), plain(), atol=1e-6):
        raise RuntimeError(f"case {case.name}: the diagnostics changed the propagated masks")
    timings = time_interleaved({"off": plain, "on": with_diagnostics}, repeats=repeats, device=device)
    off, on = timings["off"].median, timings["on"].median
    return {
        "off": timings["off"].to_dict(),
        "on": timings["on"].to_dict(),
        "overhead_fraction": on / off - 1,
        "target_overhead_at_most": TARGET_DIAGNOSTICS_OVERHEAD,
    }


def _fraction(part: int | None, whole: int | None) -> float | None:
    return None if part is None or not whole else part / whole


def real_footage_check(options: BenchOptions) -> dict[str, Any]:
    """Screening on features of real video, through harness's sequence loop, with and without it.

    The generated inputs above are smooth random fields; real video puts many memory keys close to each
    query's k-th (the same place in nearly identical frames, and its neighbours), which is where screening
    has to recompute most keys and falls back. Features: the weight-free random-conv backbone, layer 2
    (stride 8: a 60x106 grid for 480x848 frames), on the first frames of one sequence, propagated as
    harness runs it (screening where available) and with the float32 path only. Reported: the time per
    frame of both, whose labels must be the same, and the screening statistics of the first (blocks,
    fallbacks, fraction of a block's keys that were candidates).
    """
    from backbones import load_backbone
    from harness.data.dataset import open_dataset
    from harness.frames import load_network_inputs, network_input_size
    from harness.methods.labelprop import PropagationSettings, propagate_sequence

    root = Path(options.real_data or SHARED_REAL_DAVIS)
    if not root.is_dir():
        return {"skipped": f"no real footage at {root} (pass --real-data DIR, a DAVIS-layout folder)"}
    dataset = open_dataset(root, split="val")
    sequence = dataset.sequences[0]
    n_frames = min(len(sequence.frames), 4 if options.quick else 12)
    backbone = load_backbone("random-conv", device="cpu")
    short_side = 64 if options.quick else 480
    size = network_input_size(*sequence.frame_size(0), short_side, backbone.size_multiple)
    frames = load_network_inputs(list(sequence.frames[:n_frames]), size)
    extracted = backbone.extract(
        frames,
        timestep=0,
        layers=[2],
        ensemble_size=1,
        seed=0,
        sequence=sequence.name,
        frame_indices=list(range(n_frames)),
    )
    features = next(iter(extracted.values()))
    first = sequence.first_mask()
    settings = PropagationSettings()  # the paper's: cosine, T 0.2, top-k 15, r 15, first + last 28

    runs: dict[str, Any] = {}
    labels: dict[str, list[np.ndarray]] = {}
    # None: screening as harness runs it (on where the CPU has bf16 instructions, off once it keeps
    # falling back); False: the float32 path
    for name, screen in (("default", None), ("float32", False)):
        workspace = PropagationWorkspace()
        start = time.perf_counter()
        run = propagate_sequence(
            features,
            first,
            int(first.max()) + 1,
            settings,
            input_size=size,
            output_size=first.shape,
            screen=screen,
            workspace=workspace,
        )
        labels[name] = [mask for _, mask in run]
        seconds = time.perf_counter() - start
        runs[name] = {"seconds_per_frame": seconds / max(1, n_frames - 1), **workspace.screening.summary()}
    same = all(np.array_equal(a, b) for a, b in zip(labels["default"], labels["float32"], strict=True))
    if not same:
        raise RuntimeError(f"real footage ({sequence.name}): screened and float32 labels differ")
    return {
        "root": str(root),
        "sequence": sequence.name,
        "frames": n_frames,
        "grid": list(features.shape[-2:]),
        "channels": int(features.shape[1]),
        "screening_available": screening_available(torch.device("cpu")),
        "runs": runs,
        "same_labels": same,
    }


def run(options: BenchOptions) -> dict[str, Any]:
    """Every case of the requested scale; the DAVIS-scale case carries the targets."""
    cases, notes = cases_for(options)
    torch.manual_seed(0)
    results = [run_case(case, options) for case in cases]
    footage = real_footage_check(options) if options.device == "cpu" else {"skipped": "screening is CPU-only"}
    memory_method = (
        "torch.cuda.max_memory_allocated during one call, minus what was allocated before it"
        if options.device == "cuda"
        else "peak RSS gained during one call (VmHWM reset through /proc/self/clear_refs, then read), in a "
        "fresh process per method after a toy warm-up call; tracemalloc cannot see torch's allocations"
    )
    notes = [
        *notes,
        f"memory: {memory_method}; the baseline's resident window mask is added to its figure",
        "per-frame time excludes the window build (the released code builds it once per video)",
        f"max |diff| is over positions whose k-th and (k+1)-th affinities differ by >= {TIE_MARGIN:g} "
        "(relative); 'near ties' counts the others, where either choice of keys is correct",
        "baseline = the released algorithm minus its extra copies (in its favour); see its module docstring",
    ]
    davis = results[-1]
    targets: dict[str, Any] = {
        "speedup_at_least": TARGET_SPEEDUP,
        "memory_fraction_at_most": TARGET_MEMORY_FRACTION,
    }
    if options.quick:
        targets["status"] = "not judged (--quick)"
    elif "speedup" in davis:
        targets["speedup_met"] = davis["speedup"] >= TARGET_SPEEDUP
        targets["memory_met"] = davis["memory_fraction"] <= TARGET_MEMORY_FRACTION
    else:
        fraction = davis["memory_fraction_vs_estimate"]
        targets["memory_met_vs_estimate"] = fraction is not None and fraction <= TARGET_MEMORY_FRACTION
        targets["status"] = (
            "speed not measured at DAVIS scale (baseline skipped, see notes); ours uses "
            f"{fraction:.3f} of the baseline's estimated peak memory"
        )
    return {
        "settings": {"scale": options.scale, "device": options.device, "tolerance": AGREEMENT_TOLERANCE},
        "notes": notes,
        "cases": results,
        "real_footage_screening": footage,
        "targets": targets,
    }


def format_report(report: dict[str, Any]) -> str:
    rows = []
    for entry in report["cases"]:
        case = entry["case"]
        size = f"{case['height']}x{case['width']} C{case['channels']} N{case['n_memory']} r{case['radius']}"
        ours = entry["ours"]
        baseline = entry["baseline"]
        timings = [
            ours["median_seconds"],
            entry["ours_fresh_workspace"]["median_seconds"],
            entry["ours_float32"]["median_seconds"],
            entry["ours_sequence_step"]["median_seconds"],
        ]
        if "skipped" in baseline:
            estimate = entry["baseline_estimate"]["estimated_peak_bytes"]
            released = [
                None,
                None,
                format_bytes(ours["peak_call_bytes"]),
                f"~{format_bytes(estimate)} (formula)",
            ]
            checks = [None, None, None]
        else:
            released = [
                baseline["median_seconds"],
                entry["speedup"],
                format_bytes(ours["peak_call_bytes"]),
                format_bytes(baseline["peak_total_bytes"]),
            ]
            checks = [
                baseline["window_build_seconds"],
                entry["agreement_max_abs_diff"],
                entry["agreement"]["near_tie_positions"],
            ]
        rows.append([case["name"], size, *timings, *released, *checks])
    headers = [
        "case",
        "size",
        "ours s",
        "ours fresh s",
        "ours fp32 s",
        "ours step s",
        "released s",
        "speed-up",
        "ours peak",
        "released peak",
        "window s",
        "max |diff|",
        "near ties",
    ]
    lines = [format_table(headers, rows)]
    for entry in report["cases"]:
        diagnostics = entry.get("diagnostics")
        if diagnostics:
            overhead = diagnostics["overhead_fraction"]
            limit = diagnostics["target_overhead_at_most"]
            off, on = diagnostics["off"]["median_seconds"], diagnostics["on"]["median_seconds"]
            verdict = "met" if overhead <= limit else "MISSED"
            lines.append(
                f"correspondence diagnostics, {entry['case']['name']}: sequence step {off:.3g} s off, "
                f"{on:.3g} s on ({overhead:+.1%}; target <= {limit:.0%} {verdict})"
            )
    targets = report["targets"]
    if "speedup_met" in targets:
        lines.append(
            f"targets at DAVIS scale: speed-up >= {TARGET_SPEEDUP:g}x "
            f"{'met' if targets['speedup_met'] else 'MISSED'}, "
            f"peak memory <= 1/5 {'met' if targets['memory_met'] else 'MISSED'}"
        )
    elif "status" in targets:
        lines.append(f"targets: {targets['status']}")
    footage = report.get("real_footage_screening", {})
    if "skipped" in footage:
        lines.append(f"real footage: skipped ({footage['skipped']})")
    elif footage:
        default, exact = footage["runs"]["default"], footage["runs"]["float32"]
        fraction = default["candidate_fraction_mean"]
        lines.append(
            f"real footage ({footage['sequence']}, {footage['frames']} frames, random-conv "
            f"{footage['grid'][0]}x{footage['grid'][1]}x{footage['channels']}): "
            f"{default['seconds_per_frame']:.3g} s/frame as run (screened blocks {default['blocks']}, "
            f"fallbacks {default['fallbacks']}, mean candidate fraction "
            f"{'-' if fraction is None else f'{fraction:.2f}'}), float32 path "
            f"{exact['seconds_per_frame']:.3g} s/frame, same labels"
        )
    return "\n".join(lines)
