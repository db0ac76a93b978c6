"""DAVIS-2017 semi-supervised evaluation that reproduces the official davis2017-evaluation numbers.

Differences from the official script are on purpose and do not change any number: frames are scored
one at a time on uint8 label maps (the official code expands every sequence to a K x T x H x W float64
array, ~3.5 GB on DAVIS-17 val), the boundary measure runs on a crop around each object, sequences are
spread over a thread pool, and bad predictions raise a DataError that names the file instead of
printing a line and exiting with status 0.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from harness.data.dataset import Dataset, Sequence
from harness.data.masks import VOID_ID, read_mask
from harness.errors import DataError
from harness.evaluation.metrics import (
    Statistics,
    boundary_map,
    boundary_tolerance,
    disk_kernel,
    f_from_counts,
    sequence_statistics,
)
from harness.files import mkstemp_shared

GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
PER_OBJECT_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
PER_FRAME_COLUMNS = ("Sequence", "Object", "Frame", "J", "F")
#: the J-Mean / F-Mean cell of a sequence that was not scored (its first-frame mask has no object)
SKIPPED = "skipped"


@dataclass(frozen=True, eq=False)
class ObjectScores:
    """Per-frame J and F of one object over the scored frames of its sequence."""

    sequence: str
    object_id: int
    frames: tuple[str, ...]
    j: np.ndarray
    f: np.ndarray

    @property
    def name(self) -> str:
        """The official per-object row name, ``<sequence>_<id>``."""
        return f"{self.sequence}_{self.object_id}"

    @property
    def j_statistics(self) -> Statistics:
        return sequence_statistics(self.j)

    @property
    def f_statistics(self) -> Statistics:
        return sequence_statistics(self.f)


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """Global metrics (a plain mean over all objects of all sequences) and the rows they come from."""

    objects: tuple[ObjectScores, ...]
    global_metrics: dict[str, float] = field(default_factory=dict)
    #: sequences left out of the metrics because their first-frame mask has no object
    skipped: tuple[str, ...] = ()

    @classmethod
    def from_objects(cls, objects: Iterable[ObjectScores], skipped: Iterable[str] = ()) -> EvaluationResult:
        objects = tuple(objects)
        skipped = tuple(skipped)
        if not objects:
            raise DataError("nothing to evaluate: no sequence has an object in its first-frame mask")
        j_stats = np.array([obj.j_statistics for obj in objects], dtype=np.float64)
        f_stats = np.array([obj.f_statistics for obj in objects], dtype=np.float64)
        j_mean, j_recall, j_decay = (float(np.mean(j_stats[:, k])) for k in range(3))
        f_mean, f_recall, f_decay = (float(np.mean(f_stats[:, k])) for k in range(3))
        values = ((j_mean + f_mean) / 2.0, j_mean, j_recall, j_decay, f_mean, f_recall, f_decay)
        metrics = dict(zip(GLOBAL_COLUMNS, values, strict=True))
        return cls(objects=objects, global_metrics=metrics, skipped=skipped)

    def per_object_rows(self) -> list[tuple[str, float | str, float | str]]:
        """(``<seq>_<id>``, J-Mean, F-Mean) per object in dataset order, then (``<seq>``, "skipped",
        "skipped") for each sequence left out because its first-frame mask has no object."""
        rows: list[tuple[str, float | str, float | str]] = [
            (obj.name, obj.j_statistics.mean, obj.f_statistics.mean) for obj in self.objects
        ]
        rows += [(name, SKIPPED, SKIPPED) for name in self.skipped]
        return rows

    def per_frame_rows(self) -> list[tuple[str, int, str, float, float]]:
        """(sequence, object id, frame name, J, F) for every scored frame of every object."""
        return [
            (obj.sequence, obj.object_id, frame, float(j), float(f))
            for obj in self.objects
            for frame, j, f in zip(obj.frames, obj.j, obj.f, strict=True)
        ]


def frame_scores(
    gt_labels: np.ndarray, pred_labels: np.ndarray, num_objects: int
) -> tuple[np.ndarray, np.ndarray]:
    """J and F of objects 1..num_objects in one frame, from (H, W) uint8 label maps (void already 0).

    Work is confined to each object's bounding box (of ground truth and prediction together) grown by one
    pixel and clipped to the frame: the official boundary map is zero outside that window and exact inside
    it, so J, the boundary maps and the disk matching need no pixel outside it.
    """
    if gt_labels.shape != pred_labels.shape or gt_labels.ndim != 2:
        raise ValueError(
            f"label maps must be (H, W) of one shape, got {gt_labels.shape} and {pred_labels.shape}"
        )
    gt_labels = np.ascontiguousarray(gt_labels, dtype=np.uint8)
    pred_labels = np.ascontiguousarray(pred_labels, dtype=np.uint8)
    j = np.ones(num_objects, dtype=np.float64)
    f = np.ones(num_objects, dtype=np.float64)
    if num_objects == 0:
        return j, f
    height, width = gt_labels.shape
    fx, fy, fw, fh = cv2.boundingRect(cv2.bitwise_or(gt_labels, pred_labels))
    if fw == 0 or fh == 0:  # no object anywhere: every object is empty in both, J = F = 1
        return j, f
    gt_crop = gt_labels[fy : fy + fh, fx : fx + fw]
    pred_crop = pred_labels[fy : fy + fh, fx : fx + fw]
    kernel = disk_kernel(boundary_tolerance(height, width))
    for index in range(num_objects):
        object_id = index + 1
        present = (gt_crop == object_id) | (pred_crop == object_id)
        ox, oy, ow, oh = cv2.boundingRect(present.view(np.uint8))
        if ow == 0 or oh == 0:
            continue  # absent from both: J = F = 1
        top, left = max(fy + oy - 1, 0), max(fx + ox - 1, 0)
        bottom, right = min(fy + oy + oh + 1, height), min(fx + ox + ow + 1, width)
        gt_obj = gt_labels[top:bottom, left:right] == object_id
        pred_obj = pred_labels[top:bottom, left:right] == object_id
        union = np.count_nonzero(gt_obj | pred_obj)
        j[index] = np.count_nonzero(gt_obj & pred_obj) / union
        f[index] = _window_f(pred_obj, gt_obj, kernel)
    return j, f


def _window_f(pred_obj: np.ndarray, gt_obj: np.ndarray, kernel: np.ndarray) -> float:
    pred_b = boundary_map(pred_obj)
    gt_b = boundary_map(gt_obj)
    n_pred = int(np.count_nonzero(pred_b))
    n_gt = int(np.count_nonzero(gt_b))
    if n_pred == 0 or n_gt == 0:
        return f_from_counts(n_pred, n_gt, 0, 0)
    pred_dilated = cv2.dilate(pred_b.view(np.uint8), kernel).view(bool)
    gt_dilated = cv2.dilate(gt_b.view(np.uint8), kernel).view(bool)
    pred_matched = int(np.count_nonzero(pred_b & gt_dilated))
    gt_matched = int(np.count_nonzero(gt_b & pred_dilated))
    return f_from_counts(n_pred, n_gt, pred_matched, gt_matched)


def _annotated_frames(sequence: Sequence) -> list[str]:
    """Annotated frame names in the official order (sorted mask file names), each with a frame."""
    names = sorted(sequence.annotations, key=lambda name: sequence.annotations[name].name)
    known = set(sequence.frame_names)
    for name in names:
        if name not in known:
            raise DataError(
                f"ground-truth mask {sequence.annotations[name]} has no frame in sequence {sequence.name!r}"
            )
    return names


def _ground_truth(sequence: Sequence, frame_name: str) -> np.ndarray:
    """Ground-truth ids with void turned into background, as the official semi-supervised task does."""
    labels = np.ascontiguousarray(sequence.load_mask(frame_name), dtype=np.uint8)
    if labels.size and labels.max() == VOID_ID:  # the max is cheap; most masks have no void
        labels = np.where(labels == VOID_ID, np.uint8(0), labels)
    return labels


def _prediction(path: Path, shape: tuple[int, int], num_objects: int) -> np.ndarray:
    labels = read_mask(path)
    if labels.shape != shape:
        raise DataError(
            f"prediction {path} is {labels.shape[1]}x{labels.shape[0]} "
            f"but the ground truth is {shape[1]}x{shape[0]}"
        )
    top = int(labels.max()) if labels.size else 0
    if top > num_objects:
        allowed = f"only has ids 1..{num_objects}" if num_objects else "has no objects"
        raise DataError(f"prediction {path} uses object id {top}, but the first-frame mask {allowed}")
    return np.ascontiguousarray(labels, dtype=np.uint8)


def scored_frames(sequence: Sequence) -> list[str]:
    """The frames that scoring uses: the annotated frames but the first and the last (official rule).

    A DataError when that leaves none (a test-dev-like sequence cannot be evaluated).
    """
    frames = _annotated_frames(sequence)
    if len(frames) < 3:
        raise DataError(
            f"sequence {sequence.name!r} has no ground truth to evaluate against: {len(frames)} annotated "
            "frame(s), but scoring skips the first and the last (a test-dev-like split cannot be evaluated)"
        )
    return frames[1:-1]


@dataclass(frozen=True)
class ScoringPlan:
    """Which frames of a dataset are scored, and which frames have no ground truth (so are not)."""

    #: sequence -> scored frame names
    scored: dict[str, tuple[str, ...]]
    #: sequence -> frame names without a ground-truth mask (between the first and the last mask)
    unannotated: dict[str, tuple[str, ...]]
    total_frames: int

    @classmethod
    def of(cls, dataset: Dataset) -> ScoringPlan:
        scored = {seq.name: tuple(scored_frames(seq)) for seq in dataset.sequences}
        unannotated = {
            seq.name: tuple(seq.missing_annotations())
            for seq in dataset.sequences
            if seq.missing_annotations()
        }
        return cls(scored, unannotated, sum(len(seq.frames) for seq in dataset.sequences))

    @property
    def num_scored(self) -> int:
        return sum(len(frames) for frames in self.scored.values())

    def summary(self) -> str:
        """One line for the console: how many frames were scored and which frames had no ground truth."""
        line = (
            f"scored {self.num_scored} of {self.total_frames} frames "
            "(every annotated frame but the first and last of each sequence; listed in per-frame_results)"
        )
        if self.unannotated:
            missing = sum(len(frames) for frames in self.unannotated.values())
            examples = ", ".join(f"{seq}/{frames[0]}" for seq, frames in self.unannotated.items())
            line += (
                f"; {missing} frame(s) have no ground-truth mask and are not scored "
                f"(first per sequence: {examples})"
            )
        return line


def evaluate_sequence(sequence: Sequence, prediction_dir: Path) -> list[ObjectScores]:
    """Scores of objects 1..K of one sequence, K being the largest id in the first ground-truth mask.

    Scored frames are the annotated frames but the first and the last (:func:`scored_frames`);
    predictions are read from ``prediction_dir/<sequence>/<frame>.png``.
    """
    scored = scored_frames(sequence)
    num_objects = int(_ground_truth(sequence, _annotated_frames(sequence)[0]).max())
    sequence_dir = Path(prediction_dir) / sequence.name
    if not sequence_dir.is_dir():
        raise DataError(f"no predictions for sequence {sequence.name!r}: {sequence_dir} is not a folder")
    j = np.empty((num_objects, len(scored)), dtype=np.float64)
    f = np.empty((num_objects, len(scored)), dtype=np.float64)
    for t, frame_name in enumerate(scored):
        gt = _ground_truth(sequence, frame_name)
        pred = _prediction(sequence_dir / f"{frame_name}.png", gt.shape, num_objects)
        j[:, t], f[:, t] = frame_scores(gt, pred, num_objects)
    return [
        ObjectScores(sequence=sequence.name, object_id=k + 1, frames=tuple(scored), j=j[k], f=f[k])
        for k in range(num_objects)
    ]


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def evaluate_dataset(
    dataset: Dataset, prediction_dir: Path, progress: bool = True, workers: int | None = None
) -> EvaluationResult:
    """Evaluate every sequence of ``dataset`` against ``prediction_dir/<seq>/<frame>.png``.

    Sequences run on a thread pool (``workers``, default: the usable cores); PNG decoding, numpy and
    OpenCV release the GIL, so threads scale without copying frames between processes.
    """
    prediction_dir = Path(prediction_dir)
    if not prediction_dir.is_dir():
        raise DataError(f"prediction folder {prediction_dir} does not exist")
    sequences = list(dataset.sequences)
    workers = max(1, min(workers or _default_workers(), len(sequences)))
    per_sequence: list[list[ObjectScores] | None] = [None] * len(sequences)
    bar = tqdm(total=len(sequences), desc="evaluate", unit="seq", disable=not progress)
    try:
        if workers == 1:
            for index, sequence in enumerate(sequences):
                per_sequence[index] = evaluate_sequence(sequence, prediction_dir)
                bar.update()
        else:
            # Longest sequences first, so that one long sequence does not run alone at the end.
            order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].annotations))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(evaluate_sequence, sequences[i], prediction_dir): i for i in order}
                try:
                    for future in as_completed(futures):
                        per_sequence[futures[future]] = future.result()
                        bar.update()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    skipped = [seq.name for seq, scores in zip(sequences, per_sequence, strict=True) if not scores]
    return EvaluationResult.from_objects(
        (obj for scores in per_sequence if scores for obj in scores), skipped=skipped
    )


def _csv_text(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        # repr() of a float is the shortest text that reads back to the same float: full precision.
        writer.writerow([repr(float(v)) if isinstance(v, float | np.floating) else v for v in row])
    return buffer.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers never see a half-written CSV."""
    handle, tmp = mkstemp_shared(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(result: EvaluationResult, out_dir: Path, split: str) -> dict[str, Path]:
    """Write the official-style CSVs (global, per-object) and a per-frame CSV, in full precision.

    Returns the written paths under the keys ``global``, ``per_sequence`` and ``per_frame``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "global": (
            out_dir / f"global_results-{split}.csv",
            _csv_text(GLOBAL_COLUMNS, [[result.global_metrics[name] for name in GLOBAL_COLUMNS]]),
        ),
        "per_sequence": (
            out_dir / f"per-sequence_results-{split}.csv",
            _csv_text(PER_OBJECT_COLUMNS, result.per_object_rows()),
        ),
        "per_frame": (
            out_dir / f"per-frame_results-{split}.csv",
            _csv_text(PER_FRAME_COLUMNS, result.per_frame_rows()),
        ),
    }
    for path, text in tables.values():
        _write_atomic(path, text)
    return {key: path for key, (path, _) in tables.items()}
