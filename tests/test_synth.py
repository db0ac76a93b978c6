"""The synthetic dataset: deterministic, readable, and really containing the hard cases it promises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.data import VOID_ID, open_dataset, read_frame, read_mask
from harness.data.masks import DAVIS_PALETTE, read_palette
from harness.data.synth import (
    TEST_DEV_SEQUENCES,
    VAL_SEQUENCES,
    SynthSpec,
    make_synthetic_dataset,
    render_sequence,
    sequence_scripts,
)
from harness.errors import ConfigError, HarnessError


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mask_stack(root: Path, sequence: str) -> np.ndarray:
    sequence_obj = open_dataset(root, "val").sequence(sequence)
    return np.stack([read_mask(sequence_obj.annotations[name]) for name in sequence_obj.frame_names])


def test_generation_is_byte_identical(tmp_path: Path, synth_root: Path) -> None:
    again = make_synthetic_dataset(tmp_path / "again")
    first, second = _tree_bytes(synth_root), _tree_bytes(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_another_seed_gives_other_pixels(tmp_path: Path, synth_root: Path) -> None:
    other = make_synthetic_dataset(tmp_path / "other", SynthSpec(seed=1))
    frame = "JPEGImages/480p/synth-occlusion/00000.jpg"
    assert (other / frame).read_bytes() != (synth_root / frame).read_bytes()


def test_layout_and_splits(synth_root: Path) -> None:
    val = open_dataset(synth_root, "val")
    test_dev = open_dataset(synth_root, "test-dev")
    assert val.layout == "davis" and test_dev.layout == "davis"
    assert [s.name for s in val.sequences] == list(VAL_SEQUENCES)
    assert [s.name for s in test_dev.sequences] == list(TEST_DEV_SEQUENCES)
    assert len(val) >= 4 and len(test_dev) >= 2
    for sequence in val.sequences:
        assert 8 <= len(sequence.frames) <= 12
        assert [p.name for p in sequence.frames] == [f"{i:05d}.jpg" for i in range(len(sequence.frames))]
    assert val.palette == DAVIS_PALETTE


def test_frame_sizes_differ_and_one_is_not_a_multiple_of_32(synth_root: Path) -> None:
    sizes = set()
    for split in ("val", "test-dev"):
        for sequence in open_dataset(synth_root, split).sequences:
            size = sequence.frame_size()
            assert all(sequence.frame_size(i) == size for i in range(len(sequence.frames)))
            mask = sequence.first_mask()
            assert mask.shape == (size[1], size[0])
            assert read_frame(sequence.frames[0]).shape == (size[1], size[0], 3)
            sizes.add(size)
    assert len(sizes) >= 2
    assert any(width % 32 or height % 32 for width, height in sizes)


def test_val_fully_annotated_test_dev_first_frame_only(synth_root: Path) -> None:
    for sequence in open_dataset(synth_root, "val").sequences:
        assert sequence.fully_annotated
    for sequence in open_dataset(synth_root, "test-dev").sequences:
        assert list(sequence.annotations) == [sequence.frame_names[0]]
        assert not sequence.fully_annotated


def test_object_counts_match_the_scripts(synth_root: Path) -> None:
    scripts = {script.name: script for script in sequence_scripts(SynthSpec())}
    counts = {}
    for split in ("val", "test-dev"):
        for sequence in open_dataset(synth_root, split).sequences:
            ids = sequence.object_ids()
            assert ids == list(range(1, len(scripts[sequence.name].objects) + 1))
            counts[sequence.name] = len(ids)
    assert all(count >= 2 for count in counts.values())
    assert max(counts.values()) >= 4


def test_masks_are_davis_palette_pngs(synth_root: Path) -> None:
    sequence = open_dataset(synth_root, "val").sequence("synth-shapes")
    for path in sequence.annotations.values():
        assert read_palette(path) == DAVIS_PALETTE


def test_an_object_leaves_the_frame_and_comes_back(synth_root: Path) -> None:
    masks = _mask_stack(synth_root, "synth-reenter")
    counts = (masks == 1).sum(axis=(1, 2))
    absent = np.flatnonzero(counts == 0)
    assert counts[0] > 0 and absent.size > 0
    np.testing.assert_array_equal(absent, np.arange(absent[0], absent[-1] + 1))  # one gap
    assert absent[-1] + 1 < len(counts)
    assert (counts[absent[-1] + 1 :] > 0).all()
    # It is absent because it is outside the frame, not hidden: its unoccluded extent is empty too.
    scripts = sequence_scripts(SynthSpec())
    index = [s.name for s in scripts].index("synth-reenter")
    rendered = render_sequence(scripts[index], SynthSpec(), index)
    assert not rendered.amodal[1][absent].any()
    # ... and while leaving it touches the right edge.
    leaving = absent[0] - 1
    assert (masks[leaving, :, -1] == 1).any()


def test_one_object_passes_in_front_of_another(synth_root: Path) -> None:
    spec = SynthSpec()
    scripts = sequence_scripts(spec)
    index = [s.name for s in scripts].index("synth-occlusion")
    rendered = render_sequence(scripts[index], spec, index)
    masks = _mask_stack(synth_root, "synth-occlusion")
    np.testing.assert_array_equal(masks, rendered.labels)  # the files hold what was rendered
    overlap = rendered.amodal[1] & rendered.amodal[2]  # where both objects are, in 'truth space'
    frames_with_overlap = np.flatnonzero(overlap.any(axis=(1, 2)))
    assert frames_with_overlap.size >= 2
    # The frames before and after show object 2 whole, so the overlap really starts and ends.
    assert not overlap[0].any() and not overlap[-1].any()
    for t in frames_with_overlap:
        shown = masks[t][overlap[t]]
        # Object 1 is in front: the shared pixels are labelled 1 (or void on a border), never 2.
        assert np.isin(shown, (1, VOID_ID)).all()
        assert (shown == 1).mean() > 0.5
        # Object 2 is partly hidden: fewer visible pixels than its full extent, but still visible.
        visible = (masks[t] == 2).sum()
        assert 0 < visible < rendered.amodal[2][t].sum()


def test_objects_are_distinguishable_by_colour(synth_root: Path) -> None:
    """Each object has its own look: mean colours of different objects are far apart."""
    sequence = open_dataset(synth_root, "val").sequence("synth-shapes")
    frame = read_frame(sequence.frames[0]).astype(np.float64)
    mask = sequence.first_mask()
    means = [frame[mask == object_id].mean(axis=0) for object_id in sequence.object_ids()]
    background = frame[mask == 0].mean(axis=0)
    for i, mean in enumerate(means):
        assert np.abs(mean - background).max() > 20
        for other in means[i + 1 :]:
            assert np.abs(mean - other).max() > 20


def test_void_pixels_on_object_borders(synth_root: Path) -> None:
    found = 0
    for sequence in open_dataset(synth_root, "val").sequences:
        assert VOID_ID not in sequence.first_mask()
        for name in sequence.frame_names[1:]:
            mask = read_mask(sequence.annotations[name])
            void = mask == VOID_ID
            if not void.any():
                continue
            found += 1
            assert void.sum() < 0.05 * void.size  # a few pixels, not whole regions
            # Every void pixel touches an object pixel: it sits on a border, not in the background.
            assert _touches_object(mask)[void].all()
    assert found >= 3


def _touches_object(mask: np.ndarray) -> np.ndarray:
    """Per pixel: some 8-neighbour is an object id (void pixels can sit next to other void pixels)."""
    is_object = np.pad((mask != 0) & (mask != VOID_ID), 1)
    height, width = mask.shape
    touches = np.zeros(mask.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            touches |= is_object[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
    return touches


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HarnessError, match=str(out)):
        make_synthetic_dataset(out)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp folder left behind
    make_synthetic_dataset(out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert open_dataset(out, "val").sequences
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_cli_names_its_own_overwrite_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    out = tmp_path / "data"
    assert main(["data", "synth", "--out", str(out)]) == 0
    assert main(["data", "synth", "--out", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(out), "--overwrite"]) == 0


def test_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert make_synthetic_dataset(out) == out.absolute()
    assert len(open_dataset(out, "test-dev")) == len(TEST_DEV_SEQUENCES)


@pytest.mark.parametrize(
    "spec",
    [SynthSpec(sizes=()), SynthSpec(sizes=((32, 32),)), SynthSpec(val_frames=3), SynthSpec(jpeg_quality=0)],
)
def test_bad_specs_are_config_errors(tmp_path: Path, spec: SynthSpec) -> None:
    with pytest.raises(ConfigError):
        make_synthetic_dataset(tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()


def test_custom_sizes_and_lengths(tmp_path: Path) -> None:
    spec = SynthSpec(sizes=((100, 60),), val_frames=9, test_dev_frames=3, void_every=0)
    root = make_synthetic_dataset(tmp_path / "custom", spec)
    for sequence in open_dataset(root, "val").sequences:
        assert sequence.frame_size() == (100, 60)
        assert len(sequence.frames) == 9
        assert all(VOID_ID not in read_mask(p) for p in sequence.annotations.values())
    assert all(len(s.frames) == 3 for s in open_dataset(root, "test-dev").sequences)
