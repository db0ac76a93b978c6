"""Per-object label propagation with logit aggregation (``method.per_object: true``).

As the released per-object evaluation (thanosDelatolas/diff-zvos, src/eval_vos_prompts.py; the oracle's
src/eval_vos_oracle.py runs the same loop): each object k is propagated on its own, with its own memory,
on two channels [background, object k] cut from frame 0's one-hot mask (eval_vos_prompts.py l.108:
channels 0 and k of the one-hot, so pixels of the other objects belong to neither). Each frame's
two-channel soft output is upsampled bilinearly (align_corners=False) to the network input size
(l.138), min-max normalised per channel with propagation.norm_mask (l.139) and only its foreground
channel p_k is kept (l.140). Per frame the labels are the argmax of
logit([prod_k (1 - p_k), p_1, ..., p_K]) clamped to [1e-7, 1 - 1e-7] (propagation.aggregate l.168-174,
applied at l.151-153), resized to the frame size with PIL's nearest neighbour (utils/save_utils.py
save_seg l.16-19).

Features are given per object (``features_for_object(k)``), so a method that extracts its own features
for each object (SD-2.1 prompt learning) runs the same loop; plain runs pass the same features for all.
With a filter that needs ground truth (the oracle) object k's filter sees object k's binary ground truth
(k vs not-k), exactly the released oracle's rule (eval_vos_oracle.py l.113-118, propagation.py l.202-214).

The objects run one after the other (the released order); only each frame's foreground channel on the
feature grid is kept until the last object is done, then every frame is aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from harness.methods.labelprop.affinity import PropagationWorkspace
from harness.methods.labelprop.diagnostics import CorrespondenceStats
from harness.methods.labelprop.filters import get_filter
from harness.methods.labelprop.sequence import (
    FeatureSource,
    PropagationSettings,
    check_inputs,
    labels_to_onehot,
    prepare_track,
    propagate_soft,
    resize_labels_nearest,
)

#: the released aggregate's clamp (propagation.py l.172)
PROBABILITY_CLAMP = 1e-7


def object_probability(foreground: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """p_k at the network input size from one object's (h, w) foreground soft output.

    Upsampled bilinearly and min-max normalised when its maximum is above 0 (norm_mask). A constant
    positive channel has no range: the released code divides 0 by 0 and gets NaN, kept here (the
    aggregation turns it into background, as the released argmax does).
    """
    up = F.interpolate(
        foreground[None, None].to(torch.float32), size=input_size, mode="bilinear", align_corners=False
    )[0, 0]
    high = up.max()
    if high <= 0:
        return up
    shifted = up - up.min()
    return shifted / shifted.max()


def aggregate_logits(probabilities: torch.Tensor) -> torch.Tensor:
    """(K, H, W) foreground probabilities -> (K+1, H, W) logits of [prod_k (1 - p_k), p_1 .. p_K], each
    clamped to [1e-7, 1 - 1e-7] before log(p / (1 - p)) (the released aggregate, in float32)."""
    probabilities = probabilities.to(torch.float32)
    background = torch.prod(1 - probabilities, dim=0, keepdim=True)
    stacked = torch.cat([background, probabilities], dim=0).clamp(PROBABILITY_CLAMP, 1 - PROBABILITY_CLAMP)
    return torch.log(stacked / (1 - stacked))


def aggregate_labels(probabilities: torch.Tensor) -> torch.Tensor:
    """(K, H, W) foreground probabilities -> (H, W) uint8 labels 0..K: the argmax of aggregate_logits,
    the first channel winning ties. A pixel with a NaN probability is background: its background logit is
    NaN too, and torch.max lets the first NaN win (what the released code writes)."""
    logits = aggregate_logits(probabilities)
    undefined = torch.isnan(logits).any(dim=0)
    labels = torch.nan_to_num(logits, nan=-torch.inf).argmax(dim=0)
    return labels.masked_fill_(undefined, 0).to(torch.uint8)


def propagate_per_object(
    features_for_object: Callable[[int], FeatureSource],
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
    same_features: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (t, labels) for t = 1 .. T-1 as propagate_sequence does, propagating object by object.

    ``features_for_object(k)`` (k = 1 .. K, the channel of the object) gives the features object k is
    propagated with (anything propagate_sequence takes); it is called once, when object k starts. Other
    arguments are propagate_sequence's; ``ground_truth`` is in channel indices, and each object's filter
    and diagnostics see its binary view. ``settings.per_object`` itself is not read.

    ``same_features=True`` says every object has the same features (``features_for_object(1)`` is then the
    only call). Without a filter that reads the ground truth (the only thing that differs per object) every
    object's top-k weights are then the same, and the objects run in one pass: the memory holds the
    [background, object k] channels of all objects side by side, each mixed with the shared weights, which
    is each object's own propagation (its own memory of soft masks) at the cost of one.
    """
    checked = check_inputs(first_labels, num_classes, settings, input_size, output_size, ground_truth)
    return _per_object(
        features_for_object,
        checked.first_labels,
        int(num_classes),
        settings,
        checked.input_size,
        checked.output_size,
        progress=progress,
        num_frames=num_frames,
        screen=screen,
        workspace=workspace if workspace is not None else PropagationWorkspace(),
        ground_truth=ground_truth,
        diagnostics=diagnostics,
        same_features=same_features,
    )


def _per_object(
    features_for_object: Callable[[int], FeatureSource],
    first_labels: np.ndarray,
    num_classes: int,
    settings: PropagationSettings,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    *,
    progress: bool,
    num_frames: int | None,
    screen: bool | None,
    workspace: PropagationWorkspace,
    ground_truth: Callable[[int], np.ndarray] | None,
    diagnostics: CorrespondenceStats | None,
    same_features: bool,
) -> Iterator[tuple[int, np.ndarray]]:
    if num_classes == 1:  # no object: every frame is background (the released loop would crash)
        if num_frames is None:
            raise ValueError("a sequence without objects needs num_frames")
        for t in range(1, num_frames):
            yield t, np.zeros(output_size, dtype=np.uint8)
        return
    filter_reads_truth = settings.filter is not None and get_filter(settings.filter).needs_ground_truth
    if same_features and not filter_reads_truth:
        foregrounds = _objects_in_one_pass(
            features_for_object(1),
            first_labels,
            num_classes,
            settings,
            input_size,
            output_size,
            progress=progress,
            num_frames=num_frames,
            screen=screen,
            workspace=workspace,
            ground_truth=ground_truth,
            diagnostics=diagnostics,
        )
    else:
        foregrounds = []
        truth = _CachedTruth(ground_truth) if ground_truth is not None else None
        for k in range(1, num_classes):
            object_truth = None if truth is None else truth.binary(k)
            track = prepare_track(
                features_for_object(1 if same_features else k),
                first_labels,
                num_classes,
                settings,
                input_size=input_size,
                output_size=output_size,
                num_frames=num_frames,
                ground_truth=object_truth,
                diagnostics=diagnostics,
            )

            def first_masks(grid: tuple[int, int], device: torch.device, k: int = k) -> torch.Tensor:
                onehot = labels_to_onehot(first_labels, num_classes, grid, device=device)
                return torch.stack([onehot[0], onehot[k]])

            soft_frames = propagate_soft(
                track,
                first_masks,
                (first_labels == k).astype(np.uint8),
                screen=screen,
                workspace=workspace,
                diagnostic_objects=(k,),
                progress=progress,
            )
            foregrounds.append([soft[:, :, 1].clone() for _, soft in soft_frames])
    for t in range(1, len(foregrounds[0]) + 1):
        probabilities = torch.stack([object_probability(frames[t - 1], input_size) for frames in foregrounds])
        labels = aggregate_labels(probabilities).cpu().numpy()
        yield t, resize_labels_nearest(labels, output_size)


def _objects_in_one_pass(
    features: FeatureSource,
    first_labels: np.ndarray,
    num_classes: int,
    settings: PropagationSettings,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    *,
    progress: bool,
    num_frames: int | None,
    screen: bool | None,
    workspace: PropagationWorkspace,
    ground_truth: Callable[[int], np.ndarray] | None,
    diagnostics: CorrespondenceStats | None,
) -> list[list[torch.Tensor]]:
    """Every object's foreground per frame, all objects mixed with the same weights in one propagation:
    channels (2k - 2, 2k - 1) are object k's [background, object k]. The diagnostics' binary views of
    objects 1..K are the one-hot channels of the multi-class ground truth, as in a joint run."""
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
    objects = range(1, num_classes)

    def first_masks(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        onehot = labels_to_onehot(first_labels, num_classes, grid, device=device)
        return torch.stack([channel for k in objects for channel in (onehot[0], onehot[k])])

    soft_frames = propagate_soft(
        track,
        first_masks,
        first_labels,
        screen=screen,
        workspace=workspace,
        diagnostic_objects=tuple(objects),
        progress=progress,
    )
    per_frame = [soft[:, :, 1::2].clone() for _, soft in soft_frames]  # (h, w, K) foregrounds
    return [[frame[:, :, k - 1] for frame in per_frame] for k in objects]


class _CachedTruth:
    """Each frame's ground truth read once (as uint8) and shared by the objects' binary views."""

    def __init__(self, ground_truth: Callable[[int], np.ndarray]) -> None:
        self._read = ground_truth
        self._frames: dict[int, np.ndarray] = {}

    def __call__(self, t: int) -> np.ndarray:
        if t not in self._frames:
            self._frames[t] = np.asarray(self._read(t)).astype(np.uint8)
        return self._frames[t]

    def binary(self, k: int) -> Callable[[int], np.ndarray]:
        return lambda t: (self(t) == k).astype(np.uint8)
