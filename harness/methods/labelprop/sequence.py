"""Propagating first-frame masks through a whole sequence with a memory of earlier frames.

As in the released code: the memory is the first frame (its features and one-hot mask) plus the last
``n_last_frames`` frames (their features and soft outputs, first in first out). Each frame's soft output is
upsampled to the network input size, min-max normalised per channel, turned into labels by argmax, and
resized to the original frame size with nearest neighbour (PIL's, as the released code does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from harness.errors import ConfigError, DataError
from harness.methods.labelprop.affinity import (
    PropagationWorkspace,
    check_propagation_params,
    propagate_prepared,
    unit_query,
    uses_screening,
)
from harness.methods.labelprop.diagnostics import CorrespondenceStats, truth_channels
from harness.methods.labelprop.filters import CorrespondenceFilter, FilterContext, get_filter

#: Written masks are uint8 channel indices.
MAX_CLASSES = 256

FeatureSource = torch.Tensor | Sequence[torch.Tensor] | Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class PropagationSettings:
    """Label propagation hyper-parameters; the defaults are the paper's."""

    similarity: str = "cosine"
    temperature: float = 0.2
    topk: int = 15
    radius: int = 15
    n_last_frames: int = 28
    #: a registered correspondence filter (harness.methods.labelprop.filters), None = no filter
    filter: str | None = None
    #: propagate each object on its own ([background, object k], its own memory) and aggregate the
    #: foreground probabilities as the released eval_vos_prompts.py does (labelprop/per_object.py)
    per_object: bool = False
    #: correspondence diagnostics (corr_precision, corr_fg_to_bg, corr_bg_to_fg) where ground truth exists
    diagnostics: bool = True
    #: per-sequence caps on n_last_frames, "name=N[,name=N...]" (a string, so a study can choose it):
    #: DIFT caps "shooting" at 10 (github Tsingularity/dift eval_davis.py:300-304)
    memory_caps: str | None = None

    def __post_init__(self) -> None:
        check_propagation_params(self.similarity, self.temperature, self.topk, self.radius)
        frames = self.n_last_frames
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
            raise ConfigError(f"n_last_frames must be an integer >= 0 (0 = first frame only), got {frames!r}")
        if self.filter is not None:
            get_filter(self.filter)  # unknown names fail when the config is read
        for name in ("per_object", "diagnostics"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.caps()  # a malformed memory_caps fails when the config is read

    def caps(self) -> dict[str, int]:
        """``memory_caps`` as {sequence: cap}."""
        if self.memory_caps is None:
            return {}
        caps: dict[str, int] = {}
        for item in str(self.memory_caps).split(","):
            name, _, value = item.strip().partition("=")
            if not name or not value.strip().isdigit():
                raise ConfigError(f"memory_caps must read 'name=N[,name=N]', got {self.memory_caps!r}")
            caps[name.strip()] = int(value)
        return caps

    def n_last_frames_for(self, sequence: str) -> int:
        """The memory length for ``sequence``: n_last_frames, capped where memory_caps names it."""
        cap = self.caps().get(sequence)
        return self.n_last_frames if cap is None else min(self.n_last_frames, cap)


def _check_size(name: str, size: tuple[int, int]) -> tuple[int, int]:
    def positive_int(value: object) -> bool:
        return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1

    if len(size) != 2 or not all(positive_int(value) for value in size):
        raise ValueError(f"{name} must be (height, width) of positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def resize_labels_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (H, W) uint8 label map resized to ``size`` = (height, width) with PIL's nearest neighbour.

    PIL on purpose: the released code resizes masks with it, and its pixel-centre rule (computed in fixed
    point) differs from torch's and OpenCV's "nearest" on many sizes.
    """
    height, width = _check_size("size", size)
    if labels.shape == (height, width):
        return labels.copy()
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST))


def labels_to_onehot(
    labels: np.ndarray, num_classes: int, grid_size: tuple[int, int], *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One-hot (num_classes, h, w) float32 of a (H, W) channel-index map resized (nearest) to the grid."""
    labels = _checked_labels(labels, num_classes)
    small = resize_labels_nearest(labels.astype(np.uint8), grid_size)
    indices = torch.from_numpy(small.astype(np.int64)).to(device)
    return F.one_hot(indices, num_classes).permute(2, 0, 1).to(torch.float32).contiguous()


def soft_to_labels(
    soft: torch.Tensor, input_size: tuple[int, int], output_size: tuple[int, int], layout: str = "davis"
) -> np.ndarray:
    """The written mask of a soft output (K+1, h, w): a (H0, W0) uint8 array of channel indices.

    DAVIS layout: upsample bilinearly (align_corners=False) to the network input size, min-max normalise
    every channel whose maximum is above 0 (others are left alone), argmax over channels (first channel
    wins ties), and resize to the original frame size with nearest neighbour (released
    diff-zvos src/eval_vos.py:98-103). MOSE layout: upsample bilinearly straight to the original frame size,
    then normalise and argmax there (eval_vos.py:96-97). A constant positive channel has no range: the
    released code divides 0 by 0, and torch's argmax lets NaN win, so such a channel takes every pixel
    (the first one if several). It is set to +inf here to keep that outcome without NaNs.
    """
    if layout not in ("davis", "mose"):
        raise ValueError(f"no post-processing rule for dataset layout {layout!r}")
    if soft.dim() != 3 or soft.shape[0] < 1:
        raise ValueError(f"soft output must be (K+1, h, w), got shape {tuple(soft.shape)}")
    if soft.shape[0] > MAX_CLASSES:
        raise ValueError(f"{soft.shape[0]} channels do not fit a uint8 label map (at most {MAX_CLASSES})")
    input_size = _check_size("input_size", input_size)
    output_size = _check_size("output_size", output_size)
    target = output_size if layout == "mose" else input_size
    up = F.interpolate(soft[None].to(torch.float32), size=target, mode="bilinear", align_corners=False)[0]
    flat = up.reshape(up.shape[0], -1)
    low = flat.amin(dim=1, keepdim=True)
    high = flat.amax(dim=1, keepdim=True)
    positive = high > 0
    shifted = torch.where(positive, flat - low, flat)
    span = shifted.amax(dim=1, keepdim=True)
    normalised = torch.where(span > 0, shifted / torch.where(span > 0, span, 1.0), shifted)
    normalised = torch.where(positive & (span == 0), torch.inf, normalised)
    labels = normalised.argmax(dim=0).reshape(target).to(torch.uint8).cpu().numpy()
    return labels if target == output_size else resize_labels_nearest(labels, output_size)


def _checked_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    _check_num_classes(num_classes)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"first-frame labels must be a (height, width) array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"first-frame labels must be integer channel indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"first-frame labels hold values {int(labels.min())}..{int(labels.max())}, outside the channel "
            f"range 0..{num_classes - 1} (num_classes = {num_classes})"
        )
    return labels


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ConfigError(f"num_classes must be an integer, got {num_classes!r}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes must be in 1..{MAX_CLASSES} (background + objects): {num_classes}")


class _FrameReader:
    """Uniform, validated access to the features of frame t, whatever form they were given in."""

    def __init__(self, features: FeatureSource, num_frames: int | None) -> None:
        if isinstance(features, torch.Tensor):
            if features.dim() != 4:
                raise ValueError(f"features tensor must be (T, C, h, w), got shape {tuple(features.shape)}")
            length = features.shape[0]
            self._get: Callable[[int], torch.Tensor] = features.__getitem__
        elif hasattr(features, "__len__") and hasattr(features, "__getitem__"):
            length = len(features)
            self._get = features.__getitem__
        elif callable(features):
            if num_frames is None:
                raise ValueError("features is a callable: pass num_frames so the sequence length is known")
            length = num_frames
            self._get = features
        else:
            kind = type(features).__name__
            raise ValueError(f"features must be a tensor, a sequence or a callable, got {kind}")
        if num_frames is not None and num_frames != length:
            raise ValueError(f"num_frames = {num_frames} but the features hold {length} frames")
        self.num_frames = int(length)
        self._shape: tuple[int, ...] | None = None
        self.device: torch.device | None = None

    def __call__(self, index: int) -> torch.Tensor:
        frame = self._get(index)
        if not isinstance(frame, torch.Tensor):
            frame = torch.as_tensor(np.asarray(frame))
        if frame.dim() != 3:
            raise DataError(f"features of frame {index} must be (C, h, w), got shape {tuple(frame.shape)}")
        if self._shape is None:
            self._shape, self.device = tuple(frame.shape), frame.device
        elif tuple(frame.shape) != self._shape:
            raise DataError(
                f"features of frame {index} have shape {tuple(frame.shape)}, frame 0 had {self._shape}"
            )
        return frame.to(self.device)


def propagate_sequence(
    features: FeatureSource,
    first_labels: np.ndarray,
    num_classes: int,
    settings: PropagationSettings,
    *,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    progress: bool = False,
    num_frames: int | None = None,
    screen: bool | None = None,
    workspace: PropagationWorkspace | None = None,
    ground_truth: Callable[[int], np.ndarray] | None = None,
    diagnostics: CorrespondenceStats | None = None,
    layout: str = "davis",
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (t, labels) for t = 1 .. T-1: the propagated (H0, W0) uint8 channel-index map of frame t.

    ``features`` holds T feature maps (C, h, w): a (T, C, h, w) tensor, a sequence, or a callable
    index -> map (then ``num_frames`` is required) so maps can be loaded lazily, one at a time.
    ``first_labels`` is the (H0, W0) map of channel indices 0..K of frame 0 (0 = background) and
    ``num_classes`` = K+1. ``input_size`` is the (H, W) the network saw, ``output_size`` = (H0, W0).
    Everything runs on the device of frame 0's features; the memory lives in preallocated buffers there.
    ``screen`` is propagate_prepared's (None: bfloat16 screening where it pays); a ``workspace`` passed in
    is the one the frames use, so its screening and filter statistics can be read afterwards.
    ``settings.filter`` names a correspondence filter; ``ground_truth(t)`` ((H0, W0) channel indices of
    frame t) feeds it, and is required by filters that need ground truth. ``diagnostics``, given with
    ``ground_truth``, collects the correspondence diagnostics (harness.methods.labelprop.diagnostics).
    With ``settings.per_object`` each object is propagated on its own and the results are aggregated
    (per_object.py; with these shared features all objects share one pass). ``layout`` (the dataset's)
    picks the released post-processing order of :func:`soft_to_labels` (per-object runs keep their own).
    """
    if isinstance(settings, PropagationSettings) and settings.per_object:
        from harness.methods.labelprop.per_object import propagate_per_object

        return propagate_per_object(
            lambda _: features,
            first_labels,
            num_classes,
            settings,
            input_size=input_size,
            output_size=output_size,
            progress=progress,
            num_frames=num_frames,
            screen=screen,
            workspace=workspace,
            ground_truth=ground_truth,
            diagnostics=diagnostics,
            same_features=True,
        )
    track = prepare_track(
        features,
        first_labels,
        num_classes,
        settings,
        input_size=input_size,
        output_size=output_size,
        num_frames=num_frames,
        ground_truth=ground_truth,
        diagnostics=diagnostics,
    )
    first = track.first_labels

    def first_masks(grid_size: tuple[int, int], device: torch.device) -> torch.Tensor:
        return labels_to_onehot(first, num_classes, grid_size, device=device)

    soft_frames = propagate_soft(
        track,
        first_masks,
        first,
        screen=screen,
        workspace=workspace if workspace is not None else PropagationWorkspace(),
        diagnostic_objects=tuple(range(1, num_classes)),
        progress=progress,
    )
    return (
        (t, soft_to_labels(soft.permute(2, 0, 1), track.input_size, track.output_size, layout))
        for t, soft in soft_frames
    )


@dataclass(frozen=True)
class Track:
    """One propagation's checked inputs (built by prepare_track, run by propagate_soft)."""

    read: _FrameReader
    first_labels: np.ndarray
    settings: PropagationSettings
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    correspondence_filter: CorrespondenceFilter | None
    #: ground truth (H0, W0) -> channel indices, read only when the filter or the diagnostics use it
    ground_truth: Callable[[int], np.ndarray] | None
    diagnostics: CorrespondenceStats | None


def prepare_track(
    features: FeatureSource,
    first_labels: np.ndarray,
    num_classes: int,
    settings: PropagationSettings,
    *,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    num_frames: int | None,
    ground_truth: Callable[[int], np.ndarray] | None,
    diagnostics: CorrespondenceStats | None,
) -> Track:
    """Check the arguments of a propagation (errors raise here, at call time, not at the first frame)."""
    checked = check_inputs(first_labels, num_classes, settings, input_size, output_size, ground_truth)
    read = _FrameReader(features, num_frames)
    if read.num_frames < 1:
        raise DataError("the sequence has no frame")
    diagnostics = diagnostics if ground_truth is not None else None
    truth = ground_truth if checked.needs_truth or diagnostics is not None else None
    return Track(
        read,
        checked.first_labels,
        settings,
        checked.input_size,
        checked.output_size,
        checked.correspondence_filter,
        truth,
        diagnostics,
    )


@dataclass(frozen=True)
class CheckedInputs:
    first_labels: np.ndarray
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    correspondence_filter: CorrespondenceFilter | None
    #: the filter needs ground truth
    needs_truth: bool


def check_inputs(
    first_labels: np.ndarray,
    num_classes: int,
    settings: PropagationSettings,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    ground_truth: Callable[[int], np.ndarray] | None,
) -> CheckedInputs:
    """The checks every propagation makes before its first frame (ConfigError / DataError / ValueError)."""
    if not isinstance(settings, PropagationSettings):
        raise ConfigError(f"settings must be a PropagationSettings, got {type(settings).__name__}")
    input_size = _check_size("input_size", input_size)
    output_size = _check_size("output_size", output_size)
    first_labels = _checked_labels(first_labels, num_classes)
    if first_labels.shape != output_size:
        raise DataError(
            f"first-frame labels have shape {first_labels.shape}, expected output_size {output_size}"
        )
    correspondence_filter = None if settings.filter is None else get_filter(settings.filter)
    needs_truth = correspondence_filter is not None and correspondence_filter.needs_ground_truth
    if needs_truth and ground_truth is None:
        raise DataError(
            f"correspondence filter {settings.filter!r} needs the ground truth of every frame, and this "
            "split has none (test-dev / MOSE-style splits give first-frame masks only)"
        )
    return CheckedInputs(first_labels, input_size, output_size, correspondence_filter, needs_truth)


def propagate_soft(
    track: Track,
    first_masks: Callable[[tuple[int, int], torch.device], torch.Tensor],
    first_truth: np.ndarray,
    *,
    screen: bool | None,
    workspace: PropagationWorkspace,
    diagnostic_objects: tuple[int, ...],
    progress: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (t, soft) for t = 1 .. T-1: the (h, w, M) soft output on the feature grid.

    ``first_masks(grid, device)`` gives frame 0's (M, h, w) memory mask; ``first_truth`` is frame 0's
    (H0, W0) ground truth in the numbering of ``track.ground_truth`` (the filter's and the diagnostics'
    labels). With diagnostics, channel j of the ground truth's one-hot (label j+1) rides along as an extra
    memory channel, so the kernel's mix returns each query's weight share on it; the shares are recorded
    for object ``diagnostic_objects[j]`` and cut off before the soft output is yielded.
    """
    read, settings = track.read, track.settings
    first = unit_query(read(0))
    height, width, channels = first.shape
    device = first.device
    first_mask = first_masks((height, width), device)
    num_classes = first_mask.shape[0]
    diagnostics = track.diagnostics
    n_diag = len(diagnostic_objects) if diagnostics is not None else 0
    # the memory never holds more previous frames than the sequence has before its last frame
    n_previous = min(settings.n_last_frames, max(read.num_frames - 2, 0))
    slots = 1 + n_previous
    # position-major ring buffers (h, w, slot, ...), the layout propagate_prepared multiplies in place
    memory_feats = torch.empty((height, width, slots, channels), dtype=torch.float32, device=device)
    mask_shape = (height, width, slots, num_classes + n_diag)
    memory_masks = torch.empty(mask_shape, dtype=torch.float32, device=device)
    memory_feats[:, :, 0] = first
    memory_masks[:, :, 0, :num_classes] = first_mask.permute(1, 2, 0)
    # a bfloat16 copy of the memory, kept beside it, where propagate_prepared screens keys in bfloat16
    memory_bf16 = None
    if uses_screening(screen, settings.similarity, device, workspace):
        memory_bf16 = torch.empty((height, width, slots, channels), dtype=torch.bfloat16, device=device)
        memory_bf16[:, :, 0] = first
    filled = 1
    del first
    # which frame each slot holds, and (for filters that need it) its ground truth on the feature grid
    slot_frames = [0] * slots
    correspondence_filter = track.correspondence_filter
    memory_truth = None
    if track.ground_truth is not None:
        first_truth_grid = _truth_on_grid(first_truth, (height, width), device)
        if correspondence_filter is not None:
            memory_truth = torch.empty((height, width, slots), dtype=torch.int64, device=device)
            memory_truth[:, :, 0] = first_truth_grid
        if n_diag:
            memory_masks[:, :, 0, num_classes:] = truth_channels(first_truth_grid, n_diag)

    frames = range(1, read.num_frames)
    for t in tqdm(frames, desc="propagating", unit="frame", disable=not progress, leave=False):
        query = unit_query(read(t))
        query_truth = None
        if track.ground_truth is not None:
            truth_t = np.asarray(track.ground_truth(t))
            if truth_t.shape != track.output_size:
                raise DataError(
                    f"ground truth of frame {t} has shape {truth_t.shape}, expected {track.output_size}"
                )
            query_truth = _truth_on_grid(truth_t, (height, width), device)
        filter_context = None
        if correspondence_filter is not None:
            filter_context = FilterContext(
                frame=t,
                memory_frames=tuple(slot_frames[:filled]),
                query_truth=query_truth,
                memory_truth=None if memory_truth is None else memory_truth[:, :, :filled],
            )
        soft = propagate_prepared(
            query,
            memory_feats[:, :, :filled],
            memory_masks[:, :, :filled],
            similarity=settings.similarity,
            temperature=float(settings.temperature),
            topk=settings.topk,
            radius=settings.radius,
            screen=screen,
            memory_bf16=None if memory_bf16 is None else memory_bf16[:, :, :filled],
            workspace=workspace,
            correspondence_filter=correspondence_filter,
            filter_context=filter_context,
        )
        if n_diag and diagnostics is not None and query_truth is not None:
            diagnostics.record(soft[:, :, num_classes:], query_truth, diagnostic_objects)
        if n_previous > 0 and t < read.num_frames - 1:
            # FIFO over slots 1..n_previous: frame t replaces frame t - n_previous (slot order is irrelevant,
            # the propagation treats the memory as a set)
            slot = 1 + (t - 1) % n_previous
            memory_feats[:, :, slot] = query
            if memory_bf16 is not None:
                memory_bf16[:, :, slot] = query
            memory_masks[:, :, slot, :num_classes] = soft[:, :, :num_classes]
            slot_frames[slot] = t
            if memory_truth is not None and query_truth is not None:
                memory_truth[:, :, slot] = query_truth
            if n_diag and query_truth is not None:
                memory_masks[:, :, slot, num_classes:] = truth_channels(query_truth, n_diag)
            filled = min(filled + 1, slots)
        yield t, soft[:, :, :num_classes]


def _truth_on_grid(labels: np.ndarray, grid_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H0, W0) channel indices -> (h, w) int64 on the feature grid (nearest, as the first-frame mask)."""
    small = resize_labels_nearest(np.asarray(labels).astype(np.uint8), grid_size)
    return torch.from_numpy(small.astype(np.int64)).to(device)
