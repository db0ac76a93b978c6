"""The released post-processing orders, by dataset layout (diff-zvos src/eval_vos.py:96-103), on hand-made
portrait and landscape cases, and end to end on a MOSE-layout copy of the synthetic set."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harness.config import RunConfig
from harness.data import open_dataset, read_mask
from harness.frames import network_input_size
from harness.methods.labelprop import soft_to_labels
from harness.pipeline import run


def _norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """diff-zvos src/propagation.py:6-14, written out again: per-channel min-max where the max is > 0."""
    mask = mask.clone()
    for channel in range(mask.shape[0]):
        values = mask[channel]
        if values.max() > 0:
            values = values - values.min()
            mask[channel] = values / values.max()
    return mask


def _released_davis(soft: torch.Tensor, scale: int, original: tuple[int, int]) -> np.ndarray:
    """eval_vos.py:99-103, save_utils.py:16-19: bilinear by the scale, normalise, argmax, PIL nearest."""
    up = F.interpolate(soft[None], scale_factor=scale, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]  # fmt: skip
    labels = torch.max(_norm_mask(up), dim=0)[1].numpy().astype(np.uint8)
    return np.array(Image.fromarray(labels).resize((original[1], original[0]), 0))


def _released_mose(soft: torch.Tensor, original: tuple[int, int]) -> np.ndarray:
    """eval_vos.py:96-97 then 100-101: bilinear straight to the original size, normalise, argmax."""
    up = F.interpolate(
        soft[None], original, mode="bilinear", align_corners=False, recompute_scale_factor=False
    )[0]
    return torch.max(_norm_mask(up), dim=0)[1].numpy().astype(np.uint8)


def _soft(classes: int, grid: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # smooth blobs so that the two orders disagree only near boundaries
    coarse = torch.rand((classes, (grid[0] + 3) // 4, (grid[1] + 3) // 4), generator=generator)
    return F.interpolate(coarse[None], grid, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize(
    ("frame", "expected_input"),
    [((854, 480), (480, 832)), ((480, 854), (832, 480))],  # DAVIS landscape and portrait
)
def test_davis_order_upsamples_to_the_input_then_nearest(
    frame: tuple[int, int], expected_input: tuple[int, int]
) -> None:
    width, height = frame
    input_size = network_input_size(width, height, 480, 32)
    assert input_size == expected_input
    grid = (input_size[0] // 8, input_size[1] // 8)  # a stride-8 layer: 60x104 or 104x60
    soft = _soft(3, grid, seed=width)
    ours = soft_to_labels(soft, input_size, (height, width), "davis")
    assert ours.shape == (height, width)
    np.testing.assert_array_equal(ours, _released_davis(soft, 8, (height, width)))


@pytest.mark.parametrize(
    ("frame", "expected_input"),
    [((1280, 720), (480, 832)), ((720, 1280), (480, 256))],  # MOSE landscape and portrait (height 480)
)
def test_mose_order_upsamples_straight_to_the_frame(
    frame: tuple[int, int], expected_input: tuple[int, int]
) -> None:
    width, height = frame
    input_size = network_input_size(width, height, 480, 32, layout="mose")
    assert input_size == expected_input
    grid = (input_size[0] // 8, input_size[1] // 8)  # 60x104 or 60x32
    soft = _soft(3, grid, seed=height)
    ours = soft_to_labels(soft, input_size, (height, width), "mose")
    np.testing.assert_array_equal(ours, _released_mose(soft, (height, width)))
    # the DAVIS order on the same output differs (so a swapped order would be caught)
    davis_order = soft_to_labels(soft, input_size, (height, width), "davis")
    assert (davis_order != ours).any()


def test_unknown_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="layout"):
        soft_to_labels(torch.rand((2, 4, 4)), (32, 32), (32, 32), "youtube")


def _mose_copy(synth_root: Path, target: Path) -> Path:
    """The synthetic val sequences in the MOSE layout: JPEGImages/<seq>, Annotations/<seq> (first masks)."""
    davis = open_dataset(synth_root, "val")
    for sequence in davis.sequences[:2]:
        frames = target / "JPEGImages" / sequence.name
        masks = target / "Annotations" / sequence.name
        frames.mkdir(parents=True)
        masks.mkdir(parents=True)
        for path in sequence.frames:
            shutil.copy(path, frames / path.name)
        shutil.copy(sequence.first_mask_path, masks / sequence.first_mask_path.name)
    return target


def test_a_mose_layout_run_writes_masks_at_frame_size(synth_root: Path, tmp_path: Path) -> None:
    root = _mose_copy(synth_root, tmp_path / "mose")
    dataset = open_dataset(root, "valid")
    assert dataset.layout == "mose"
    config = RunConfig().with_overrides(
        {
            "dataset.root": str(root),
            "dataset.split": "valid",
            "input.short_side": 128,  # MOSE: height 128; width ceil(128 * w / h) floored to 64
            "method.radius": 4,
            "method.n_last_frames": 3,
            "cache.enabled": False,
            "output_dir": str(tmp_path / "run"),
            "progress": False,
        }
    )
    result = run(config)
    assert result.metrics is None and result.submission_zip is not None
    for sequence in dataset.sequences:
        width, height = sequence.frame_size()
        for name in sequence.frame_names:
            mask = read_mask(result.predictions_dir / sequence.name / f"{name}.png")
            assert mask.shape == (height, width)


@pytest.mark.parametrize(("original", "grid"), [((720, 1280), (60, 104)), ((1280, 720), (60, 32))])
def test_first_mask_goes_straight_to_the_grid_with_pil_nearest(
    original: tuple[int, int], grid: tuple[int, int]
) -> None:
    """read_seg_mose (read_util.py:130-137): the original mask resized to the feature grid, nearest."""
    from harness.methods.labelprop import labels_to_onehot

    height, width = original
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[height // 5 : height // 2, width // 3 : width - 7] = 1
    labels[height // 2 :, : width // 4] = 2
    onehot = labels_to_onehot(labels, 3, grid)
    expected = np.array(Image.fromarray(labels).resize((grid[1], grid[0]), 0))
    np.testing.assert_array_equal(onehot.argmax(dim=0).numpy(), expected)
