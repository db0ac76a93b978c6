"""Files that describe a finished run: per-sequence and per-object tables, the predictions as one archive,
overlay stills of every sequence and overlay GIFs of the worst sequences.

Nothing here talks to MLflow: the run logger writes these files into a scratch folder and uploads it,
and ``harness run --overlays`` writes the GIFs into the run's own output folder.
"""

from __future__ import annotations

import csv
import dataclasses
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from harness.tracking.names import finite

if TYPE_CHECKING:
    from harness.data import Sequence
    from harness.evaluation import ObjectScores
    from harness.pipeline import RunResult, SequenceOutcome

OVERLAY_MAX_WIDTH = 480
OVERLAY_ALPHA = 0.5
#: GIFs: at most this many frames (evenly spaced), this wide, shown this long each
GIF_MAX_FRAMES = 40
GIF_MAX_WIDTH = 320
GIF_FRAME_MS = 120
#: how many of a run's lowest-J&F sequences get a GIF
WORST_SEQUENCES = 3
#: error colours of the GIFs: object pixels the prediction missed, and pixels it labelled wrongly
MISSED_COLOUR = (255, 215, 0)  # yellow
FALSE_COLOUR = (255, 0, 255)  # magenta
ERROR_ALPHA = 0.75
VOID_ID = 255

OBJECT_COLUMNS = [
    "sequence",
    "object",
    "scored_frames",
    "J-Mean",
    "J-Recall",
    "J-Decay",
    "F-Mean",
    "F-Recall",
    "F-Decay",
    "J&F",
]
SEQUENCE_COLUMNS = ["index", "sequence", "frames", "objects", "J&F", "J-Mean", "F-Mean", "seconds"]


# -- tables --------------------------------------------------------------------------------------------


def numeric_fields(record: object) -> dict[str, float]:
    """The finite numeric fields of a dataclass (e.g. the feature cache's counters)."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        return {}
    values = {f.name: finite(getattr(record, f.name)) for f in dataclasses.fields(record)}
    return {name: value for name, value in values.items() if value is not None}


def sequence_metrics(outcome: object) -> dict[str, float]:
    """The finite numeric entries of a sequence's extra metrics (``SequenceOutcome.metrics``, e.g. the
    correspondence diagnostics); empty when the outcome has none."""
    extra = getattr(outcome, "metrics", None)
    if not isinstance(extra, Mapping):
        return {}
    values = {str(name): finite(value) for name, value in extra.items() if not isinstance(value, bool)}
    return {name: value for name, value in values.items() if value is not None}


def mean_sequence_metrics(sequences: list[SequenceOutcome]) -> dict[str, float]:
    """Each extra per-sequence metric averaged over the sequences that report it."""
    collected: dict[str, list[float]] = {}
    for outcome in sequences:
        for name, value in sequence_metrics(outcome).items():
            collected.setdefault(name, []).append(value)
    return {name: float(np.mean(values)) for name, values in collected.items()}


def object_row(score: ObjectScores) -> list[object]:
    """One object's DAVIS statistics (mean, recall, decay of J and F over its scored frames)."""
    j, f = score.j_statistics, score.f_statistics
    return [
        score.sequence,
        score.object_id,
        len(score.frames),
        j.mean,
        j.recall,
        j.decay,
        f.mean,
        f.recall,
        f.decay,
        (j.mean + f.mean) / 2,
    ]


def sequence_table(sequences: list[SequenceOutcome]) -> dict[str, list[object]]:
    """One row per sequence as columns: :data:`SEQUENCE_COLUMNS`, then the extra metrics any sequence
    reports (sorted by name; None where a sequence lacks one). Missing scores are None."""
    extras = sorted({name for outcome in sequences for name in sequence_metrics(outcome)})
    table: dict[str, list[object]] = {column: [] for column in [*SEQUENCE_COLUMNS, *extras]}
    for outcome in sequences:
        scores = outcome.scores or []
        metrics = sequence_metrics(outcome)
        row: dict[str, object] = {
            "index": outcome.index,
            "sequence": outcome.name,
            "frames": outcome.num_frames,
            "objects": len(outcome.object_ids),
            "J&F": outcome.jf,
            "J-Mean": float(np.mean([s.j_statistics.mean for s in scores])) if scores else None,
            "F-Mean": float(np.mean([s.f_statistics.mean for s in scores])) if scores else None,
            "seconds": float(sum(outcome.seconds.values())),
        }
        for column in table:
            table[column].append(row[column] if column in row else metrics.get(column))
    return table


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(["" if value is None else value for value in row] for row in rows)


def write_sequence_tables(sequences: list[SequenceOutcome], folder: Path) -> list[Path]:
    """``per_sequence.csv`` (one row per sequence, with any extra per-sequence metrics) and, with ground
    truth, ``per_object.csv`` (one row per object: the rows of the run's evaluation)."""
    table = sequence_table(sequences)
    header = list(table)
    rows = [list(values) for values in zip(*table.values(), strict=True)]
    written = [folder / "per_sequence.csv"]
    _write_csv(written[0], header, rows)
    object_rows = [object_row(score) for outcome in sequences for score in outcome.scores or []]
    if object_rows:
        written.append(folder / "per_object.csv")
        _write_csv(written[1], OBJECT_COLUMNS, object_rows)
    return written


def zip_predictions(predictions_dir: Path, target: Path) -> Path | None:
    """All prediction PNGs as ``<sequence>/<frame>.png`` in one archive; None when there are none."""
    pngs = sorted(predictions_dir.rglob("*.png")) if predictions_dir.is_dir() else []
    if not pngs:
        return None
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for png in pngs:
            archive.write(png, png.relative_to(predictions_dir).as_posix())
    return target


# -- overlays ------------------------------------------------------------------------------------------


def _palette_colours(palette: list[int]) -> np.ndarray:
    colours = np.zeros((256, 3), dtype=np.float32)
    flat = np.asarray(palette[: 256 * 3], dtype=np.float32)
    colours.reshape(-1)[: flat.size] = flat
    return colours


def _fit_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if labels.shape == shape[:2]:
        return labels
    resized = Image.fromarray(labels).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(resized)


def _downscale(image: Image.Image, max_width: int) -> Image.Image:
    if image.width <= max_width:
        return image
    height = max(1, round(image.height * max_width / image.width))
    return image.resize((max_width, height), Image.Resampling.BILINEAR)


def _blend(pixels: np.ndarray, where: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    pixels[where] = (1 - alpha) * pixels[where] + alpha * colour


def overlay_image(
    frame: np.ndarray,
    labels: np.ndarray,
    palette: list[int],
    max_width: int = OVERLAY_MAX_WIDTH,
    alpha: float = OVERLAY_ALPHA,
) -> Image.Image:
    """The frame with each object's pixels blended with its palette colour, at most ``max_width`` wide."""
    labels = _fit_labels(labels, frame.shape)
    blended = frame.astype(np.float32)
    objects = (labels > 0) & (labels != VOID_ID)
    _blend(blended, objects, _palette_colours(palette)[labels[objects]], alpha)
    return _downscale(Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)), max_width)


def error_overlay_image(
    frame: np.ndarray,
    predicted: np.ndarray,
    truth: np.ndarray | None,
    palette: list[int],
    max_width: int = GIF_MAX_WIDTH,
    alpha: float = OVERLAY_ALPHA,
) -> Image.Image:
    """The predicted masks over the frame and, with ground truth, its errors in two colours: object pixels
    predicted as background (missed, :data:`MISSED_COLOUR`) and pixels given an object label they do not
    have (false, :data:`FALSE_COLOUR`; a wrong object counts as false). Void pixels are no error."""
    predicted = _fit_labels(predicted, frame.shape)
    blended = frame.astype(np.float32)
    objects = (predicted > 0) & (predicted != VOID_ID)
    _blend(blended, objects, _palette_colours(palette)[predicted[objects]], alpha)
    if truth is not None:
        truth = _fit_labels(truth, frame.shape)
        scored = truth != VOID_ID
        missed = scored & (truth > 0) & (predicted == 0)
        false = scored & objects & (predicted != truth)
        _blend(blended, missed, np.asarray(MISSED_COLOUR, dtype=np.float32), ERROR_ALPHA)
        _blend(blended, false, np.asarray(FALSE_COLOUR, dtype=np.float32), ERROR_ALPHA)
    return _downscale(Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)), max_width)


def _overlay_indices(num_frames: int) -> list[int]:
    return sorted({0, num_frames // 2, num_frames - 1}) if num_frames > 0 else []


def gif_frame_indices(num_frames: int, max_frames: int = GIF_MAX_FRAMES) -> list[int]:
    """Evenly spaced frame indices, first and last included, at most ``max_frames`` of them."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (max_frames - 1)) for i in range(max_frames)})


def write_overlays(result: RunResult, folder: Path) -> list[Path]:
    """First, middle and last frame of every sequence blended with its predicted mask (PNG)."""
    from harness.data import read_frame, read_mask
    from harness.data.masks import DAVIS_PALETTE, read_palette

    written = []
    for sequence in _open_sequences(result, [outcome.name for outcome in result.sequences]):
        frame_names = sequence.frame_names
        for index in _overlay_indices(len(frame_names)):
            prediction = result.predictions_dir / sequence.name / f"{frame_names[index]}.png"
            if not prediction.is_file():
                continue
            palette = read_palette(prediction) or DAVIS_PALETTE
            image = overlay_image(read_frame(sequence.frames[index]), read_mask(prediction), palette)
            target = folder / sequence.name / f"{frame_names[index]}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            written.append(target)
    return written


def _open_sequences(result: RunResult, names: list[str]) -> list[Sequence]:
    from harness.data import open_dataset

    if not names:
        return []
    spec = result.config.dataset
    dataset = open_dataset(spec.root, spec.split, names, spec.resolution)
    by_name = {sequence.name: sequence for sequence in dataset.sequences}
    return [by_name[name] for name in names if name in by_name]


def worst_sequences(sequences: list[SequenceOutcome], count: int = WORST_SEQUENCES) -> list[str]:
    """The ``count`` sequences with the lowest J&F (ties in run order); without scores, the first ones."""
    scored = [outcome for outcome in sequences if outcome.jf is not None]
    if not scored:
        return [outcome.name for outcome in sequences[:count]]
    ranked = sorted(scored, key=lambda outcome: (outcome.jf, outcome.index))
    return [outcome.name for outcome in ranked[:count]]


def write_sequence_gif(
    sequence: Sequence,
    predictions_dir: Path,
    target: Path,
    *,
    max_frames: int = GIF_MAX_FRAMES,
    max_width: int = GIF_MAX_WIDTH,
    frame_ms: int = GIF_FRAME_MS,
) -> Path | None:
    """An animated GIF of the sequence's predicted masks and their errors (:func:`error_overlay_image`),
    on the frames that have a prediction; None when none has."""
    from harness.data import read_frame, read_mask
    from harness.data.masks import DAVIS_PALETTE, read_palette

    images = []
    names = sequence.frame_names
    for index in gif_frame_indices(len(names), max_frames):
        prediction = predictions_dir / sequence.name / f"{names[index]}.png"
        if not prediction.is_file():
            continue
        truth = sequence.load_mask(names[index]) if names[index] in sequence.annotations else None
        palette = read_palette(prediction) or DAVIS_PALETTE
        frame = read_frame(sequence.frames[index])
        images.append(error_overlay_image(frame, read_mask(prediction), truth, palette, max_width))
    if not images:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(target, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return target


def write_worst_sequence_gifs(result: RunResult, folder: Path, count: int = WORST_SEQUENCES) -> list[Path]:
    """``<folder>/<rank>-<sequence>.gif`` for the run's ``count`` lowest-J&F sequences (rank 01 = worst)."""
    names = worst_sequences(result.sequences, count)
    written = []
    for rank, sequence in enumerate(_open_sequences(result, names), start=1):
        gif = write_sequence_gif(
            sequence, Path(result.predictions_dir), folder / f"{rank:02d}-{sequence.name}.gif"
        )
        if gif is not None:
            written.append(gif)
    return written
