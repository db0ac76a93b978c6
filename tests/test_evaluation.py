"""DAVIS-2017 semi-supervised evaluation: every rule of the official script, checked by hand-computed
cases, against an in-test dense re-implementation of the official algorithm, and against the independent
``vos-benchmark`` package."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from harness.data import open_dataset, write_mask
from harness.errors import DataError
from harness.evaluation import (
    GLOBAL_COLUMNS,
    boundary_f_score,
    boundary_map,
    boundary_tolerance,
    evaluate_dataset,
    evaluate_sequence,
    f_measure,
    jaccard,
    sequence_statistics,
    write_results,
)
from harness.evaluation.metrics import decay_bin_edges

# ----------------------------------------------------------------------------------------------------
# Helpers: a DAVIS-2017-layout dataset on disk from label arrays.


def _write_dataset(
    root: Path,
    sequences: dict[str, tuple[list[np.ndarray | None], list[np.ndarray | None]]],
) -> tuple[Path, Path]:
    """Write frames, ground truth (None = frame not annotated) and predictions (None = no PNG).

    Returns (dataset root, prediction folder).
    """
    dataset_root = root / "davis"
    prediction_dir = root / "predictions"
    for name, (gts, preds) in sequences.items():
        height, width = next(g for g in gts if g is not None).shape
        frame_dir = dataset_root / "JPEGImages" / "480p" / name
        frame_dir.mkdir(parents=True)
        jpeg = frame_dir / "00000.jpg"
        Image.new("RGB", (width, height), (90, 120, 30)).save(jpeg, quality=50)
        for t in range(1, len(gts)):
            (frame_dir / f"{t:05d}.jpg").write_bytes(jpeg.read_bytes())
        for t, gt in enumerate(gts):
            if gt is not None:
                write_mask(dataset_root / "Annotations" / "480p" / name / f"{t:05d}.png", gt)
        (prediction_dir / name).mkdir(parents=True)
        for t, pred in enumerate(preds):
            if pred is not None:
                write_mask(prediction_dir / name / f"{t:05d}.png", pred)
    split = dataset_root / "ImageSets" / "2017"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("".join(f"{name}\n" for name in sequences))
    return dataset_root, prediction_dir


def _block(shape: tuple[int, int], blocks: dict[int, tuple[slice, slice]]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    for value, (rows, cols) in blocks.items():
        labels[rows, cols] = value
    return labels


# ----------------------------------------------------------------------------------------------------
# J


def test_jaccard_of_two_empty_masks_is_one() -> None:
    empty = np.zeros((4, 5), dtype=bool)
    assert jaccard(empty, empty) == 1.0


def test_jaccard_simple_overlap() -> None:
    pred = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    gt = np.array([[0, 1, 1], [0, 0, 0]], dtype=bool)
    assert jaccard(pred, gt) == 1 / 3  # intersection 1, union 3
    assert jaccard(pred, np.zeros_like(gt)) == 0.0


# ----------------------------------------------------------------------------------------------------
# Boundary map and tolerance


def test_boundary_map_cell_by_cell_including_last_row_column_and_corner() -> None:
    seg = np.array(
        [
            [0, 0, 0, 0],
            [0, 1, 1, 1],
            [0, 1, 1, 1],
        ],
        dtype=bool,
    )
    # Interior: differs from right, lower or lower-right. Last column: lower only, so (1, 3) is not a
    # boundary. Last row: right only, so (2, 1) and (2, 2) are not. Bottom-right: never.
    expected = np.array(
        [
            [1, 1, 1, 1],
            [1, 0, 0, 0],
            [1, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(boundary_map(seg), expected)


def test_boundary_map_of_a_single_pixel_is_the_2x2_block_up_and_left() -> None:
    seg = np.zeros((4, 4), dtype=bool)
    seg[1, 1] = True
    expected = np.zeros((4, 4), dtype=bool)
    expected[0:2, 0:2] = True
    np.testing.assert_array_equal(boundary_map(seg), expected)


def test_boundary_map_of_a_full_mask_is_empty() -> None:
    assert not boundary_map(np.ones((3, 5), dtype=bool)).any()


def test_boundary_tolerance_for_davis_frame_sizes() -> None:
    assert boundary_tolerance(480, 854) == 8  # ceil(0.008 * 979.6) = ceil(7.84)
    assert boundary_tolerance(480, 1152) == 10  # ceil(0.008 * 1248.0) = ceil(9.98)
    assert boundary_tolerance(480, 910) == 9  # ceil(0.008 * 1028.8) = ceil(8.23)


# ----------------------------------------------------------------------------------------------------
# F


def test_f_with_one_boundary_empty_is_zero_and_both_empty_is_one() -> None:
    empty = np.zeros((30, 40), dtype=bool)
    blob = empty.copy()
    blob[10:20, 10:20] = True
    assert f_measure(empty, blob) == 0.0
    assert f_measure(blob, empty) == 0.0
    assert f_measure(empty, empty) == 1.0
    assert f_measure(blob, blob) == 1.0


@pytest.mark.parametrize(
    ("offset", "matches"),
    [
        ((0, 8), True),  # exactly r
        ((8, 0), True),
        ((0, 9), False),  # r + 1
        ((5, 6), True),  # 25 + 36 = 61 <= 64
        ((4, 7), False),  # 16 + 49 = 65 > 64: just outside the disk
        ((6, 6), False),  # 72 > 64: inside the square, outside the disk
        ((-6, -5), True),
    ],
)
def test_boundary_match_uses_the_disk_of_radius_r(offset: tuple[int, int], matches: bool) -> None:
    pred = np.zeros((40, 40), dtype=bool)
    gt = np.zeros((40, 40), dtype=bool)
    pred[20, 20] = True
    gt[20 + offset[0], 20 + offset[1]] = True
    assert boundary_f_score(pred, gt, radius=8) == (1.0 if matches else 0.0)


@pytest.mark.parametrize(("width", "radius"), [(854, 8), (1152, 10)])
def test_f_measure_tolerance_follows_the_frame_size(width: int, radius: int) -> None:
    # One-pixel masks have a 2x2 boundary block up and left of the pixel. With the gt pixel r + 1 columns
    # to the right, one column of each block is exactly r away from the other block (matches) and the
    # other column is r + 1 away (does not): P = R = 1/2, F = 1/2. One column further, nothing matches.
    def pixel(col: int) -> np.ndarray:
        mask = np.zeros((480, width), dtype=bool)
        mask[200, col] = True
        return mask

    assert f_measure(pixel(300), pixel(300 + radius + 1)) == 0.5
    assert f_measure(pixel(300), pixel(300 + radius + 2)) == 0.0


# ----------------------------------------------------------------------------------------------------
# Per-object statistics


def test_decay_bin_edges_round_half_up() -> None:
    assert decay_bin_edges(5) == [0, 1, 2, 3, 4]  # linspace(1, 5, 5) - 1
    assert decay_bin_edges(10) == [0, 2, 5, 7, 9]  # 1, 3.25, 5.5, 7.75, 10 -> 1, 3, 6, 8, 10
    assert decay_bin_edges(7) == [0, 2, 3, 5, 6]  # 1, 2.5, 4, 5.5, 7 -> 1, 3, 4, 6, 7 (half up)
    assert decay_bin_edges(1) == [0, 0, 0, 0, 0]


def test_statistics_with_five_frames() -> None:
    stats = sequence_statistics(np.array([1.0, 0.5, 0.0, 0.25, 0.75]))
    assert stats.mean == 0.5
    assert stats.recall == 2 / 5  # 1.0 and 0.75; 0.5 is not > 0.5
    assert stats.decay == 0.75 - 0.5  # mean([1, .5]) - mean([.25, .75])


def test_statistics_with_ten_frames_bins_share_endpoints() -> None:
    values = np.array([0.9, 0.6, 0.3, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.6])
    stats = sequence_statistics(values)
    assert stats.mean == pytest.approx(0.27, abs=1e-15)
    assert stats.recall == 0.3
    # bin 0 = values[0:3] (mean 0.6), bin 3 = values[7:10] (mean 0.3)
    assert stats.decay == pytest.approx(0.3, abs=1e-15)


def test_statistics_decay_rounds_half_up_not_to_even() -> None:
    # n = 7: bin 0 is values[0:3]; round-half-to-even would give values[0:2] and a decay of -0.3.
    stats = sequence_statistics(np.array([0.0, 0.0, 0.9, 0.0, 0.0, 0.3, 0.3]))
    assert stats.decay == pytest.approx(0.0, abs=1e-15)


def test_recall_threshold_is_strict() -> None:
    assert sequence_statistics(np.array([0.5, 0.5, 0.51, 0.0])).recall == 0.25


# ----------------------------------------------------------------------------------------------------
# Sequence rules, on small datasets written to disk

SHAPE = (12, 16)


def test_objects_are_ids_up_to_the_largest_in_the_first_frame_void_excluded(tmp_path: Path) -> None:
    first = _block(SHAPE, {2: (slice(2, 6), slice(2, 6)), 255: (slice(8, 10), slice(0, 16))})
    later = _block(SHAPE, {2: (slice(3, 7), slice(2, 6))})
    root, preds = _write_dataset(
        tmp_path, {"seq": ([first, later, later, later], [None, later, later, None])}
    )
    scores = evaluate_sequence(open_dataset(root).sequence("seq"), preds)
    assert [s.object_id for s in scores] == [1, 2]
    assert [s.name for s in scores] == ["seq_1", "seq_2"]
    # Object 1 is in neither ground truth nor prediction: J = F = 1 in every scored frame.
    np.testing.assert_array_equal(scores[0].j, [1.0, 1.0])
    np.testing.assert_array_equal(scores[0].f, [1.0, 1.0])
    np.testing.assert_array_equal(scores[1].j, [1.0, 1.0])


def test_an_id_never_predicted_scores_as_an_empty_mask(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(1, 4), slice(1, 4)), 2: (slice(6, 10), slice(8, 12))})
    pred = _block(SHAPE, {1: (slice(1, 4), slice(1, 4))})
    root, preds = _write_dataset(tmp_path, {"seq": ([gt, gt, gt, gt, gt], [None, pred, pred, pred, None])})
    one, two = evaluate_sequence(open_dataset(root).sequence("seq"), preds)
    np.testing.assert_array_equal(one.j, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(two.j, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(two.f, [0.0, 0.0, 0.0])


def test_void_pixels_count_as_background(tmp_path: Path) -> None:
    first = _block(SHAPE, {1: (slice(2, 4), slice(2, 4))})
    gt = _block(SHAPE, {1: (slice(2, 4), slice(2, 4)), 255: (slice(4, 6), slice(2, 4))})  # 4 object, 4 void
    pred = _block(SHAPE, {1: (slice(2, 6), slice(2, 4))})  # covers object and void: 8 pixels
    root, preds = _write_dataset(tmp_path, {"seq": ([first, gt, first], [None, pred, None])})
    (scores,) = evaluate_sequence(open_dataset(root).sequence("seq"), preds)
    assert scores.j[0] == 0.5  # 4 / 8: void predicted as object is a false positive, not ignored


def test_first_and_last_frames_are_not_scored(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    # No prediction PNG for the first and last frames: they must not even be read.
    root, preds = _write_dataset(tmp_path, {"seq": ([gt] * 5, [None, gt, gt, gt, None])})
    (scores,) = evaluate_sequence(open_dataset(root).sequence("seq"), preds)
    assert scores.frames == ("00001", "00002", "00003")
    np.testing.assert_array_equal(scores.j, [1.0, 1.0, 1.0])


def test_unannotated_frames_are_skipped_and_the_last_annotated_one_is_not_scored(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    gts = [gt, None, gt, None, gt, gt]  # annotated: 0, 2, 4, 5 -> scored: 2, 4
    root, preds = _write_dataset(tmp_path, {"seq": (gts, [None, None, gt, None, gt, None])})
    (scores,) = evaluate_sequence(open_dataset(root).sequence("seq"), preds)
    assert scores.frames == ("00002", "00004")


def _two_sequence_dataset(tmp_path: Path) -> tuple[Path, Path]:
    a = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    b = _block(SHAPE, {1: (slice(0, 4), slice(0, 4)), 2: (slice(6, 10), slice(6, 14))})
    b_pred = _block(SHAPE, {1: (slice(0, 4), slice(0, 4))})  # object 2 is lost
    return _write_dataset(
        tmp_path,
        {"a": ([a] * 4, [None, a, a, None]), "b": ([b] * 3, [None, b_pred, None])},
    )


def test_global_metrics_are_plain_means_over_objects(tmp_path: Path) -> None:
    root, preds = _two_sequence_dataset(tmp_path)
    result = evaluate_dataset(open_dataset(root), preds, progress=False)
    # Objects a_1 (perfect), b_1 (perfect), b_2 (lost): 2/3, not the mean of sequence means (3/4).
    assert result.global_metrics["J-Mean"] == 2 / 3
    assert result.global_metrics["F-Mean"] == 2 / 3
    assert result.global_metrics["J&F-Mean"] == 2 / 3
    assert result.global_metrics["J-Recall"] == 2 / 3
    assert result.global_metrics["J-Decay"] == 0.0
    assert list(result.global_metrics) == list(GLOBAL_COLUMNS)


def test_csv_files_have_the_official_columns_and_full_precision(tmp_path: Path) -> None:
    root, preds = _two_sequence_dataset(tmp_path)
    result = evaluate_dataset(open_dataset(root), preds, progress=False, workers=1)
    paths = write_results(result, tmp_path / "out", "val")
    with paths["global"].open() as stream:
        rows = list(csv.reader(stream))
    assert paths["global"].name == "global_results-val.csv"
    assert rows[0] == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert len(rows) == 2
    assert float(rows[1][1]) == 2 / 3  # reads back to the exact float: no rounding
    with paths["per_sequence"].open() as stream:
        rows = list(csv.reader(stream))
    assert paths["per_sequence"].name == "per-sequence_results-val.csv"
    assert rows[0] == ["Sequence", "J-Mean", "F-Mean"]
    assert [(r[0], float(r[1]), float(r[2])) for r in rows[1:]] == [
        ("a_1", 1.0, 1.0),
        ("b_1", 1.0, 1.0),
        ("b_2", 0.0, 0.0),
    ]
    with paths["per_frame"].open() as stream:
        rows = list(csv.reader(stream))
    assert paths["per_frame"].name == "per-frame_results-val.csv"
    assert rows[0] == ["Sequence", "Object", "Frame", "J", "F"]
    assert rows[1:] == [
        ["a", "1", "00001", "1.0", "1.0"],
        ["a", "1", "00002", "1.0", "1.0"],
        ["b", "1", "00001", "1.0", "1.0"],
        ["b", "2", "00001", "0.0", "0.0"],
    ]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_per_object_csv_keeps_values_that_need_seventeen_digits(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(0, 3), slice(0, 1))})  # 3 pixels
    pred = _block(SHAPE, {1: (slice(0, 1), slice(0, 1))})  # 1 of them: J = 1/3
    root, preds = _write_dataset(tmp_path, {"s": ([gt] * 3, [None, pred, None])})
    result = evaluate_dataset(open_dataset(root), preds, progress=False)
    paths = write_results(result, tmp_path, "val")
    with paths["per_sequence"].open() as stream:
        rows = list(csv.reader(stream))
    assert float(rows[1][1]) == 1 / 3
    assert len(rows[1][1]) > 10


# ----------------------------------------------------------------------------------------------------
# Errors


def test_missing_prediction_png_names_the_file(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    root, preds = _write_dataset(tmp_path, {"seq": ([gt] * 4, [None, gt, None, None])})
    with pytest.raises(DataError, match=r"00002\.png"):
        evaluate_dataset(open_dataset(root), preds, progress=False)


def test_prediction_id_above_the_object_count_names_the_file(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    bad = _block(SHAPE, {1: (slice(2, 8), slice(3, 9)), 2: (slice(0, 1), slice(0, 1))})
    root, preds = _write_dataset(tmp_path, {"seq": ([gt] * 3, [None, bad, None])})
    with pytest.raises(DataError, match=r"00001\.png.*id 2.*1\.\.1"):
        evaluate_sequence(open_dataset(root).sequence("seq"), preds)


def test_void_id_in_a_prediction_is_out_of_range(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    bad = _block(SHAPE, {255: (slice(0, 1), slice(0, 1))})
    root, preds = _write_dataset(tmp_path, {"seq": ([gt] * 3, [None, bad, None])})
    with pytest.raises(DataError, match="id 255"):
        evaluate_sequence(open_dataset(root).sequence("seq"), preds)


def test_prediction_of_the_wrong_size_names_the_file(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    root, preds = _write_dataset(tmp_path, {"seq": ([gt] * 3, [None, gt, None])})
    write_mask(preds / "seq" / "00001.png", np.zeros((SHAPE[0], SHAPE[1] + 1), dtype=np.uint8))
    with pytest.raises(DataError, match=r"00001\.png is 17x12 but the ground truth is 16x12"):
        evaluate_sequence(open_dataset(root).sequence("seq"), preds)


def test_sequence_with_only_the_first_frame_annotated_cannot_be_evaluated(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    root, preds = _write_dataset(tmp_path, {"seq": ([gt, None, None, None], [None, gt, gt, None])})
    with pytest.raises(DataError, match="no ground truth"):
        evaluate_dataset(open_dataset(root), preds, progress=False)


def test_missing_prediction_folder_is_reported(tmp_path: Path) -> None:
    gt = _block(SHAPE, {1: (slice(2, 8), slice(3, 9))})
    root, preds = _write_dataset(tmp_path, {"seq": ([gt] * 3, [None, gt, None])})
    (preds / "seq" / "00001.png").unlink()
    (preds / "seq").rmdir()
    with pytest.raises(DataError, match="no predictions for sequence 'seq'"):
        evaluate_dataset(open_dataset(root), preds, progress=False)


# ----------------------------------------------------------------------------------------------------
# Cross-check 1: a straightforward dense re-implementation of the official algorithm


def _official_bmap(seg: np.ndarray) -> np.ndarray:
    """The official seg2bmap written the way the paper describes it: shifted copies, then fix-ups."""
    seg = seg.astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def _official_f(fg: np.ndarray, gt: np.ndarray) -> float:
    radius = np.ceil(0.008 * np.linalg.norm(fg.shape))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (xx**2 + yy**2 <= radius**2).astype(np.uint8)
    fg_b, gt_b = _official_bmap(fg), _official_bmap(gt)
    fg_dil = cv2.dilate(fg_b.astype(np.uint8), disk)
    gt_dil = cv2.dilate(gt_b.astype(np.uint8), disk)
    n_fg, n_gt = fg_b.sum(), gt_b.sum()
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.sum(fg_b * gt_dil) / float(n_fg)
        recall = np.sum(gt_b * fg_dil) / float(n_gt)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _official_statistics(values: np.ndarray) -> tuple[float, float, float]:
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    bins = [values[ids[i] : ids[i + 1] + 1] for i in range(4)]
    return float(np.mean(values)), float(np.mean(values > 0.5)), float(np.mean(bins[0]) - np.mean(bins[3]))


def _official_sequence(gts: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense K x T x H x W evaluation of one sequence (gts: all annotated frames, preds: same frames)."""
    gts = np.where(gts == 255, 0, gts).astype(np.float64)
    num_objects = int(gts[0].max())
    ids = np.arange(1, num_objects + 1)[:, None, None, None]
    gt_objects = (ids == gts[None, 1:-1]) > 0
    pred_objects = (ids == preds[None, 1:-1].astype(np.float64)) > 0
    j = np.zeros(gt_objects.shape[:2])
    f = np.zeros(gt_objects.shape[:2])
    for k in range(num_objects):
        for t in range(gt_objects.shape[1]):
            inter = np.sum(gt_objects[k, t] & pred_objects[k, t])
            union = np.sum(gt_objects[k, t] | pred_objects[k, t])
            j[k, t] = 1.0 if np.isclose(union, 0) else inter / union
            f[k, t] = _official_f(pred_objects[k, t], gt_objects[k, t])
    return j, f


def _random_labels(rng: np.random.Generator, shape: tuple[int, int], num_objects: int) -> np.ndarray:
    """Overlapping ellipses plus salt noise, so boundaries are ragged and touch the frame edges."""
    labels = np.zeros(shape, dtype=np.uint8)
    height, width = shape
    for object_id in range(1, num_objects + 1):
        if rng.random() < 0.15:
            continue  # absent in this frame
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(1, width // 2)), int(rng.integers(1, height // 2)))
        cv2.ellipse(labels, centre, axes, float(rng.uniform(0, 180)), 0, 360, object_id, thickness=-1)
    salt = rng.random(shape) < 0.01
    labels[salt] = rng.integers(0, num_objects + 1, size=int(salt.sum()))
    return labels


def test_matches_a_dense_reimplementation_of_the_official_code(tmp_path: Path) -> None:
    rng = np.random.default_rng(1234)
    spec = {
        "tiny": ((60, 90), 6, 2),
        "odd": ((97, 130), 7, 3),
        "mid": ((200, 333), 5, 2),
        "hd": ((480, 854), 4, 2),
    }
    arrays = {}
    for name, (shape, frames, objects) in spec.items():
        gts = [_random_labels(rng, shape, objects) for _ in range(frames)]
        gts[0][0, 0] = objects  # K must be `objects`
        gts[2][rng.random(shape) < 0.05] = 255  # void
        gts[1][:] = 1  # an object covering the whole frame: empty boundary
        preds = [_random_labels(rng, shape, objects) for _ in range(frames)]
        preds[3][:] = 0  # nothing predicted
        arrays[name] = (gts, preds)
    root, pred_dir = _write_dataset(tmp_path, arrays)
    result = evaluate_dataset(open_dataset(root), pred_dir, progress=False, workers=2)

    expected_f, stats = [], []
    for name, (gts, preds) in arrays.items():
        j, f = _official_sequence(np.stack(gts), np.stack(preds))
        ours = [o for o in result.objects if o.sequence == name]
        assert len(ours) == j.shape[0]
        for k, obj in enumerate(ours):
            np.testing.assert_allclose(obj.j, j[k], rtol=0, atol=1e-15)
            np.testing.assert_allclose(obj.f, f[k], rtol=0, atol=1e-15)
            stats.append((_official_statistics(j[k]), _official_statistics(f[k])))
            for mine, theirs in zip(obj.j_statistics, stats[-1][0], strict=True):
                assert mine == pytest.approx(theirs, abs=1e-15)
            for mine, theirs in zip(obj.f_statistics, stats[-1][1], strict=True):
                assert mine == pytest.approx(theirs, abs=1e-15)
        expected_f.append(f)
    j_m = np.mean([s[0][0] for s in stats])
    f_m = np.mean([s[1][0] for s in stats])
    assert result.global_metrics["J-Mean"] == pytest.approx(j_m, abs=1e-15)
    assert result.global_metrics["F-Mean"] == pytest.approx(f_m, abs=1e-15)
    assert result.global_metrics["J&F-Mean"] == pytest.approx((j_m + f_m) / 2, abs=1e-15)
    assert result.global_metrics["F-Decay"] == pytest.approx(np.mean([s[1][2] for s in stats]), abs=1e-15)
    # The random data must actually exercise partial matches, not only 0s and 1s.
    all_f = np.concatenate([f.ravel() for f in expected_f])
    assert ((all_f > 0) & (all_f < 1)).sum() > 10


def test_thread_pool_gives_the_same_result_as_one_worker(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    arrays = {}
    for name in ("s1", "s2", "s3"):
        gts = [_random_labels(rng, (40, 50), 2) for _ in range(5)]
        gts[0][0, 0] = 2
        arrays[name] = (gts, [_random_labels(rng, (40, 50), 2) for _ in range(5)])
    root, pred_dir = _write_dataset(tmp_path, arrays)
    one = evaluate_dataset(open_dataset(root), pred_dir, progress=False, workers=1)
    two = evaluate_dataset(open_dataset(root), pred_dir, progress=False, workers=2)
    assert one.global_metrics == two.global_metrics
    assert one.per_frame_rows() == two.per_frame_rows()


# ----------------------------------------------------------------------------------------------------
# Cross-check 2: the independent vos-benchmark package


def _cross_check_dataset(rng: np.random.Generator) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Blob sequences that vos-benchmark evaluates the official way.

    vos-benchmark takes its objects from the ground truth of the scored frames (and counts 255 as an
    object), so here every object is visible in the first two frames and there is no void; predictions
    use ids 1..K only. Objects may leave the ground truth later and predictions drop objects.
    """
    spec = {"alpha": ((480, 854), 6, 2), "beta": ((180, 320), 9, 3), "gamma": ((150, 200), 12, 1)}
    sequences = {}
    for name, (shape, frames, objects) in spec.items():
        height, width = shape
        gts, preds = [], []
        centres = rng.uniform(0.2, 0.8, size=(objects, 2)) * [width, height]
        velocity = rng.uniform(-0.04, 0.04, size=(objects, 2)) * [width, height]
        for t in range(frames):
            gt = np.zeros(shape, dtype=np.uint8)
            pred = np.zeros(shape, dtype=np.uint8)
            for k in range(objects):
                cx, cy = centres[k] + t * velocity[k]
                axes = (int(width * rng.uniform(0.05, 0.15)), int(height * rng.uniform(0.05, 0.2)))
                if t < 2 or rng.random() > 0.1:
                    cv2.ellipse(gt, (int(cx), int(cy)), axes, 10.0 * t, 0, 360, k + 1, thickness=-1)
                if rng.random() > 0.15:
                    shift = rng.integers(-8, 9, size=2)
                    scale = rng.uniform(0.8, 1.2)
                    pred_axes = (max(1, int(axes[0] * scale)), max(1, int(axes[1] * scale)))
                    centre = (int(cx + shift[0]), int(cy + shift[1]))
                    cv2.ellipse(pred, centre, pred_axes, 10.0 * t + 5, 0, 360, k + 1, thickness=-1)
            if name == "beta":  # an object cut by the bottom-right corner of the frame
                gt[height - 10 :, width - 14 :] = 1
                pred[height - 12 :, width - 10 :] = 1
            gts.append(gt)
            preds.append(pred)
        for k in range(1, objects + 1):
            assert (gts[0] == k).any() and (gts[1] == k).any()
        sequences[name] = (gts, preds)
    return sequences


def test_agrees_with_the_vos_benchmark_package(tmp_path: Path) -> None:
    vos_benchmark = pytest.importorskip("vos_benchmark.benchmark")
    sequences = _cross_check_dataset(np.random.default_rng(2024))
    root, pred_dir = _write_dataset(tmp_path, sequences)
    result = evaluate_dataset(open_dataset(root), pred_dir, progress=False)

    gt_root = str(root / "Annotations" / "480p")
    for name in sequences:
        _, their_j, their_f = vos_benchmark.VideoEvaluator(gt_root, str(pred_dir))(name)
        ours = {obj.object_id: obj for obj in result.objects if obj.sequence == name}
        assert sorted(their_j) == sorted(ours)
        for object_id, obj in ours.items():
            assert obj.j_statistics.mean == pytest.approx(their_j[object_id] / 100, abs=1e-9)
            assert obj.f_statistics.mean == pytest.approx(their_f[object_id] / 100, abs=1e-9)

    jf, j, f, _ = vos_benchmark.benchmark([gt_root], [str(pred_dir)], num_processes=1, verbose=False)
    assert result.global_metrics["J-Mean"] == pytest.approx(j[0] / 100, abs=1e-9)
    assert result.global_metrics["F-Mean"] == pytest.approx(f[0] / 100, abs=1e-9)
    assert result.global_metrics["J&F-Mean"] == pytest.approx(jf[0] / 100, abs=1e-9)
    # The data must not be trivial: some frames score strictly between 0 and 1.
    assert 0.2 < result.global_metrics["J-Mean"] < 0.95
    assert math.isfinite(result.global_metrics["F-Decay"])
