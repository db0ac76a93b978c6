"""The data layer: DAVIS and MOSE-style layouts, mask I/O, and errors that name the offending file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import DAVIS_PALETTE, VOID_ID, open_dataset, read_frame, read_mask, read_split, write_mask
from harness.data.masks import davis_palette, image_size, read_palette
from harness.errors import DataError

WIDTH, HEIGHT = 40, 24


def _write_frame(path: Path, seed: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def _labels(object_ids: tuple[int, ...], size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
    """Vertical bands, one per object id, on a background of 0."""
    labels = np.zeros((size[1], size[0]), dtype=np.uint8)
    for index, object_id in enumerate(object_ids):
        labels[2:-2, 2 + 6 * index : 6 + 6 * index] = object_id
    return labels


def _make_sequence(
    frame_dir: Path, mask_dir: Path, frames: int = 3, annotated: int = 1, object_ids: tuple[int, ...] = (1, 2)
) -> None:
    for index in range(frames):
        _write_frame(frame_dir / f"{index:05d}.jpg", seed=index)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for index in range(annotated):
        write_mask(mask_dir / f"{index:05d}.png", _labels(object_ids))


def _make_davis(root: Path, names: tuple[str, ...] = ("alpha", "beta", "gamma"), split: str = "val") -> Path:
    for name in names:
        _make_sequence(root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


# ----------------------------------------------------------------------------------------- layouts


def test_davis_layout_loads(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    dataset = open_dataset(root, "val")
    assert dataset.layout == "davis" and dataset.split == "val" and len(dataset) == 3
    assert [s.name for s in dataset.sequences] == ["alpha", "beta", "gamma"]
    sequence = dataset.sequence("beta")
    assert sequence.frame_names == ["00000", "00001", "00002"]
    assert list(sequence.annotations) == ["00000"]
    assert sequence.frame_size() == (WIDTH, HEIGHT)
    assert not sequence.fully_annotated
    np.testing.assert_array_equal(sequence.first_mask(), _labels((1, 2)))
    assert dataset.palette == DAVIS_PALETTE
    assert read_split(root, "val") == ["alpha", "beta", "gamma"]


def test_mose_layout_loads(tmp_path: Path) -> None:
    root = tmp_path / "mose"
    for name in ("zeta", "eta"):
        _make_sequence(root / "JPEGImages" / name, root / "Annotations" / name, frames=4, annotated=4)
    dataset = open_dataset(root)
    assert dataset.layout == "mose"
    assert [s.name for s in dataset.sequences] == ["eta", "zeta"]  # sorted, no split file needed
    assert all(s.fully_annotated and len(s.frames) == 4 for s in dataset.sequences)


def test_sequence_subset_keeps_the_given_order(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    dataset = open_dataset(root, "val", sequences=["gamma", "alpha"])
    assert [s.name for s in dataset.sequences] == ["gamma", "alpha"]
    with pytest.raises(DataError, match="omega"):
        open_dataset(root, "val", sequences=["alpha", "omega"])
    with pytest.raises(DataError, match="delta"):
        dataset.sequence("delta")


def test_hidden_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis", names=("alpha",))
    frame_dir = root / "JPEGImages" / "480p" / "alpha"
    (frame_dir / ".00000.jpg.swp").write_bytes(b"junk")
    (frame_dir / "notes.txt").write_text("not a frame")
    (root / "Annotations" / "480p" / "alpha" / "._00000.png").write_bytes(b"macos junk")
    sequence = open_dataset(root, "val").sequence("alpha")
    assert sequence.frame_names == ["00000", "00001", "00002"]
    assert list(sequence.annotations) == ["00000"]


def test_greyscale_masks_are_accepted(tmp_path: Path) -> None:
    root = tmp_path / "mose"
    _make_sequence(root / "JPEGImages" / "s", root / "Annotations" / "s", annotated=0)
    labels = _labels((3, 7))
    Image.fromarray(labels, mode="L").save(root / "Annotations" / "s" / "00000.png")
    dataset = open_dataset(root)
    np.testing.assert_array_equal(dataset.sequences[0].first_mask(), labels)
    assert dataset.sequences[0].object_ids() == [3, 7]
    assert dataset.palette == DAVIS_PALETTE  # no palette in the file: fall back to DAVIS'


# ----------------------------------------------------------------------------------------- errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        open_dataset(tmp_path / "nowhere")


def test_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match="JPEGImages"):
        open_dataset(tmp_path / "photos")


def test_missing_split_file(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    with pytest.raises(DataError) as caught:
        open_dataset(root, "test-dev")
    assert str(root / "ImageSets" / "2017" / "test-dev.txt") in str(caught.value)
    assert "val" in str(caught.value)  # lists the splits that do exist


def test_empty_split_file(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n\n")
    with pytest.raises(DataError, match="lists no sequences"):
        open_dataset(root, "val")


def test_missing_sequence_folder(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\nghost\n")
    with pytest.raises(DataError) as caught:
        open_dataset(root, "val")
    assert str(root / "JPEGImages" / "480p" / "ghost") in str(caught.value)


def test_sequence_without_frames(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    for frame in (root / "JPEGImages" / "480p" / "beta").iterdir():
        frame.unlink()
    with pytest.raises(DataError, match="no frames"):
        open_dataset(root, "val")


def test_no_first_frame_mask(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    mask_dir = root / "Annotations" / "480p" / "gamma"
    (mask_dir / "00000.png").rename(mask_dir / "00001.png")
    with pytest.raises(DataError) as caught:
        open_dataset(root, "val")
    assert str(mask_dir / "00000.png") in str(caught.value)


def test_rgb_mask_is_rejected(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    path = root / "Annotations" / "480p" / "alpha" / "00000.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
    sequence = open_dataset(root, "val").sequence("alpha")
    with pytest.raises(DataError) as caught:
        sequence.first_mask()
    assert str(path) in str(caught.value) and "RGB" in str(caught.value)


def test_mask_of_the_wrong_size(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    path = root / "Annotations" / "480p" / "beta" / "00000.png"
    write_mask(path, np.zeros((HEIGHT, WIDTH + 1), dtype=np.uint8))
    sequence = open_dataset(root, "val").sequence("beta")
    with pytest.raises(DataError) as caught:
        sequence.first_mask()
    message = str(caught.value)
    assert str(path) in message and str(sequence.frames[0]) in message
    assert f"{WIDTH + 1}x{HEIGHT}" in message and f"{WIDTH}x{HEIGHT}" in message


def test_mask_of_an_unannotated_frame(tmp_path: Path) -> None:
    sequence = open_dataset(_make_davis(tmp_path / "davis"), "val").sequence("alpha")
    with pytest.raises(DataError, match="00002"):
        sequence.load_mask("00002")


def test_truncated_frame(tmp_path: Path) -> None:
    path = tmp_path / "frame.jpg"
    _write_frame(path, seed=1, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=str(path)):
        read_frame(path)


def test_garbage_frame(tmp_path: Path) -> None:
    root = _make_davis(tmp_path / "davis")
    path = root / "JPEGImages" / "480p" / "alpha" / "00001.jpg"
    path.write_bytes(b"this is not a jpeg at all")
    sequence = open_dataset(root, "val").sequence("alpha")
    with pytest.raises(DataError, match=str(path)):
        sequence.frame_size(1)
    with pytest.raises(DataError, match=str(path)):
        read_frame(path)


def test_truncated_and_garbage_masks(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    rng = np.random.default_rng(3)
    write_mask(path, rng.integers(0, 5, size=(64, 64), dtype=np.uint8))  # noisy, so the PNG is long
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=str(path)):
        read_mask(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n but then nonsense")
    with pytest.raises(DataError, match=str(path)):
        read_mask(path)
    with pytest.raises(DataError, match="missing"):
        read_mask(tmp_path / "absent.png")


# ----------------------------------------------------------------------------------------- masks


def test_object_ids_come_from_the_first_frame_without_void(tmp_path: Path) -> None:
    root = tmp_path / "mose"
    _make_sequence(root / "JPEGImages" / "s", root / "Annotations" / "s", annotated=0)
    first = _labels((4, 1))
    first[0, :5] = VOID_ID
    write_mask(root / "Annotations" / "s" / "00000.png", first)
    write_mask(root / "Annotations" / "s" / "00001.png", _labels((4, 1, 9)))  # a later object: not counted
    assert open_dataset(root).sequences[0].object_ids() == [1, 4]


def test_write_read_round_trip_keeps_ids_and_palette(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).choice(np.array([0, 1, 2, 17, 254, VOID_ID], dtype=np.uint8), (13, 21))
    path = tmp_path / "deep" / "mask.png"
    write_mask(path, labels)
    np.testing.assert_array_equal(read_mask(path), labels)
    assert read_mask(path).dtype == np.uint8
    assert read_palette(path) == DAVIS_PALETTE
    assert [p.name for p in path.parent.iterdir()] == ["mask.png"]  # no temp file left

    custom = [value % 256 for value in range(7, 7 + 768)]
    write_mask(path, labels, palette=custom)  # replacing an existing file
    assert read_palette(path) == custom
    np.testing.assert_array_equal(read_mask(path), labels)


def test_write_mask_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", np.zeros((2, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", np.full((2, 3), 256, dtype=np.int32))
    assert not any(tmp_path.iterdir())


def test_davis_palette_is_the_voc_colour_map() -> None:
    def colour(index: int) -> tuple[int, ...]:
        return tuple(DAVIS_PALETTE[3 * index : 3 * index + 3])

    assert len(DAVIS_PALETTE) == 768
    assert colour(0) == (0, 0, 0)
    assert colour(1) == (128, 0, 0)
    assert colour(2) == (0, 128, 0)
    assert colour(3) == (128, 128, 0)
    assert colour(4) == (0, 0, 128)
    assert colour(5) == (128, 0, 128)
    assert colour(7) == (128, 128, 128)
    assert colour(8) == (64, 0, 0)
    assert colour(255) == (224, 224, 192)  # the VOC 'void' colour
    assert davis_palette() == DAVIS_PALETTE


def test_image_size_reads_width_then_height(tmp_path: Path) -> None:
    path = tmp_path / "f.jpg"
    _write_frame(path, seed=0, size=(50, 20))
    assert image_size(path) == (50, 20)
    assert read_frame(path).shape == (20, 50, 3)


def test_real_davis_sample_if_available(shared_dir: Path) -> None:
    root = shared_dir / "data" / "davis2017-real"
    if not root.is_dir():
        pytest.skip(f"{root} is not present")
    dataset = open_dataset(root, "val")
    assert dataset.layout == "davis" and len(dataset) == 5
    assert dataset.palette == DAVIS_PALETTE
    for sequence in dataset.sequences:
        assert sequence.fully_annotated
        assert sequence.object_ids() == [1]
        assert sequence.frame_size() == (854, 480)
