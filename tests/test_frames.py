"""Network-input sizes and pixels follow the released pre-processing (diff-zvos src/utils/read_util.py)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from harness.errors import ConfigError
from harness.frames import load_network_input, load_network_inputs, network_input_size, resize_rule


def _released_davis_size(ori_w: int, ori_h: int, scale: int = 480) -> tuple[int, int]:
    """read_util.py:23-31 written out again (independent of harness.frames), as (th, tw)."""
    if ori_h > ori_w:
        tw = scale
        th = int(((tw * ori_h) / ori_w // 32) * 32)
    else:
        th = scale
        tw = int(((th * ori_w) / ori_h // 32) * 32)
    return th, tw


def _released_mose_size(ori_w: int, ori_h: int, height: int = 480) -> tuple[int, int]:
    """read_util.py:112-114 written out again, as (height, width)."""
    new_width = math.ceil(height * (ori_w / ori_h))
    return height, int((new_width // 64) * 64)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (854, 480, (480, 832)),  # 854 // 32 = 26 -> 832; the short side stays 480 (SD too)
        (480, 854, (832, 480)),  # portrait: the width is the short side
        (910, 480, (480, 896)),  # 28 * 32
        (1920, 1080, (480, 832)),  # 853.33 -> 26 * 32
        (1080, 1920, (832, 480)),
        (640, 480, (480, 640)),  # 20 * 32 exactly
        (480, 480, (480, 480)),
    ],
)
def test_davis_rule_floors_only_the_long_side_to_32(
    width: int, height: int, expected: tuple[int, int]
) -> None:
    for multiple in (1, 8, 32):  # ADM (32), SD (8: the VAE), random-conv (8): the same size
        assert network_input_size(width, height, 480, multiple) == expected
    assert _released_davis_size(width, height) == expected


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1280, 720, (480, 832)),  # ceil(853.33) = 854 -> 13 * 64 = 832
        (1920, 1080, (480, 832)),
        (720, 1280, (480, 256)),  # portrait: the height is still 480; ceil(270) = 270 -> 4 * 64
        (854, 480, (480, 832)),
        (640, 480, (480, 640)),  # 10 * 64
        (1000, 480, (480, 960)),  # 1000 -> 15 * 64
    ],
)
def test_mose_rule_forces_height_480_and_floors_width_to_64(
    width: int, height: int, expected: tuple[int, int]
) -> None:
    for multiple in (1, 8, 32):
        assert network_input_size(width, height, 480, multiple, layout="mose") == expected
    assert _released_mose_size(width, height) == expected


def test_a_larger_backbone_multiple_raises_the_floor_and_floors_the_short_side() -> None:
    # a backbone that needs multiples of 64: short side 480 -> 448, long side 448 * 854 / 480 = 797.07 -> 768
    assert network_input_size(854, 480, 480, 64) == (448, 768)
    # short side 100 for ADM (32): floored to 96; 96 * 854 / 480 = 170.8 -> 160
    assert network_input_size(854, 480, 100, 32) == (96, 160)


def test_bad_sizes_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="smaller than the backbone's size multiple"):
        network_input_size(854, 480, 16, 32)
    with pytest.raises(ConfigError, match="no resize rule"):
        network_input_size(854, 480, 480, 32, layout="youtube")
    with pytest.raises(ConfigError, match="leaves no pixels"):
        network_input_size(10, 1000, 480, 32, layout="mose")  # width ceil(4.8) = 5 -> 0 multiples of 64
    assert resize_rule("davis").floor_multiple == 32 and resize_rule("mose").floor_multiple == 64


def _frame(tmp_path: Path, width: int, height: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = tmp_path / f"frame-{width}x{height}.png"
    Image.fromarray(rgb).save(path)
    return path, rgb


def _released_pixels(rgb: np.ndarray, size: tuple[int, int], interpolation: int | None) -> torch.Tensor:
    """read_util.py:34-40: cv2.resize, /255 in float32, (x - 0.5) / 0.5 (channel order is irrelevant)."""
    height, width = size
    if interpolation is None:
        img = cv2.resize(rgb, (width, height))  # the released call: OpenCV's default, bilinear
    else:
        img = cv2.resize(rgb, (width, height), interpolation=interpolation)
    img = img.astype(np.float32) / 255.0
    tensor = torch.from_numpy(np.transpose(img.copy(), (2, 0, 1))).float()
    return (tensor - 0.5) / 0.5


def test_davis_pixels_equal_opencv_bilinear(tmp_path: Path) -> None:
    path, rgb = _frame(tmp_path, 854, 480)
    size = network_input_size(854, 480, 480, 32)
    ours = load_network_input(path, size)
    assert ours.shape == (3, 480, 832)
    assert torch.equal(ours, _released_pixels(rgb, size, None))
    # PIL's antialiasing bilinear, which the harness used before, gives other values
    pil = np.asarray(Image.fromarray(rgb).resize((832, 480), Image.BILINEAR)).astype(np.float32)
    assert not np.array_equal(pil, cv2.resize(rgb, (832, 480)).astype(np.float32))


def test_mose_pixels_equal_opencv_area_for_portrait_frames(tmp_path: Path) -> None:
    path, rgb = _frame(tmp_path, 360, 640, seed=1)
    size = network_input_size(360, 640, 480, 32, layout="mose")
    assert size == (480, 256)  # ceil(480 * 0.5625) = 270 -> 256
    ours = load_network_inputs([path], size, layout="mose")[0]
    assert torch.equal(ours, _released_pixels(rgb, size, cv2.INTER_AREA))
    assert not torch.equal(ours, _released_pixels(rgb, size, cv2.INTER_LINEAR))


def test_frames_already_at_size_are_not_resampled(tmp_path: Path) -> None:
    path, rgb = _frame(tmp_path, 64, 32, seed=2)
    ours = load_network_input(path, (32, 64))
    expected = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(ours, (expected - 0.5) / 0.5)
    assert ours.min() >= -1 and ours.max() <= 1


def test_cache_ids_name_the_preprocessing(tmp_path: Path) -> None:
    """Features computed from other pixels (PIL before, another layout's rule) must not be reused."""
    from harness.features import frame_identity
    from harness.frames import PREPROCESSING_VERSION, frame_cache_id

    path, _ = _frame(tmp_path, 64, 32, seed=3)
    davis, mose = frame_cache_id(path), frame_cache_id(path, "mose")
    assert davis.startswith(frame_identity(path)) and PREPROCESSING_VERSION in davis
    assert davis != mose and davis != frame_identity(path)
