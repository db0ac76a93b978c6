"""Frames as network input, resized exactly as the released code resizes them, then scaled to [-1, 1].

Two rules, chosen by the dataset layout (not guessed from the frame size):

- ``davis`` (github thanosDelatolas/diff-zvos ``src/utils/read_util.py:17-34``, the same in
  Tsingularity/dift ``eval_davis.py:207-224``): the short side becomes ``short_side`` and only the long
  side is floored to a multiple of 32 (854x480 -> 832x480, for ADM and SD alike); OpenCV bilinear
  (``cv2.resize``'s default, no antialiasing).
- ``mose`` (``read_util.py:105-117``, ``read_frame_mose``): the *height* becomes ``short_side`` whatever
  the orientation (portrait frames too), the width is ``ceil(height * w / h)`` floored to a multiple of 64;
  OpenCV area interpolation.

A backbone that needs larger multiples than the rule gives (``Backbone.size_multiple``) gets the rule's
multiple raised to a common multiple, and a short side that is not a multiple of it is floored; at the
released settings (short side 480, multiples 8 or 32) neither changes anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from harness.data.masks import read_frame
from harness.errors import ConfigError
from harness.features.cache import frame_identity

#: the layouts with a released resize rule
LAYOUTS = ("davis", "mose")

#: bump when the pixels a frame becomes change (it is part of every cached feature's frame key)
PREPROCESSING_VERSION = "cv2-released-v1"


@dataclass(frozen=True)
class ResizeRule:
    """How a dataset layout's frames are resized for the network (see the module docstring)."""

    layout: str
    #: the long side (davis) or the width (mose) is floored to a multiple of this
    floor_multiple: int
    #: OpenCV interpolation flag
    interpolation: int
    #: where the released code does this
    source: str


RESIZE_RULES: dict[str, ResizeRule] = {
    "davis": ResizeRule("davis", 32, cv2.INTER_LINEAR, "diff-zvos src/utils/read_util.py:17-34"),
    "mose": ResizeRule("mose", 64, cv2.INTER_AREA, "diff-zvos src/utils/read_util.py:105-117"),
}


def resize_rule(layout: str) -> ResizeRule:
    if layout not in RESIZE_RULES:
        raise ConfigError(f"no resize rule for dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return RESIZE_RULES[layout]


def network_input_size(
    width: int, height: int, short_side: int = 480, multiple: int = 1, *, layout: str = "davis"
) -> tuple[int, int]:
    """(H, W) of the network input for a frame of ``width`` x ``height`` under ``layout``'s rule.

    ``multiple`` is what the backbone needs both sides to be divisible by (its ``size_multiple``).
    davis: 854x480 -> (480, 832), 480x854 -> (832, 480); mose: 1280x720 -> (480, 832),
    720x1280 -> (480, 256).
    """
    rule = resize_rule(layout)
    if width < 1 or height < 1:
        raise ConfigError(f"frame size {width}x{height} is empty")
    if multiple < 1:
        raise ConfigError(f"size multiple must be >= 1, got {multiple}")
    floor = math.lcm(rule.floor_multiple, multiple)
    short = short_side // multiple * multiple
    if short < multiple or short_side < 1:
        raise ConfigError(f"short side {short_side} is smaller than the backbone's size multiple {multiple}")
    if layout == "mose":
        # the same float arithmetic as read_frame_mose: aspect first, ceil, then floor to the multiple
        new_width = int(math.ceil(short * (width / height)) // floor * floor)
        size = (short, new_width)
    elif height > width:
        size = (int((short * height) / width // floor * floor), short)
    else:
        size = (short, int((short * width) / height // floor * floor))
    if min(size) < 1:
        raise ConfigError(
            f"a {width}x{height} frame at short side {short_side} leaves no pixels after flooring to {floor}"
        )
    return size


def preprocessing_tag(layout: str) -> str:
    """Appended to a frame's content hash in feature-cache keys: other pixels must not reuse features."""
    return f"{PREPROCESSING_VERSION}/{resize_rule(layout).layout}"


def frame_cache_id(path: Path, layout: str = "davis") -> str:
    """The frame part of a feature-cache key: the file's content hash and how it was pre-processed."""
    return f"{frame_identity(path)}/{preprocessing_tag(layout)}"


def resize_frame(rgb: np.ndarray, size: tuple[int, int], layout: str = "davis") -> np.ndarray:
    """``rgb`` (H0, W0, 3) uint8 resized to ``size`` = (H, W) with the layout's OpenCV interpolation."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=resize_rule(layout).interpolation)


def to_network_range(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], as ``(x / 255 - 0.5) / 0.5`` in the released code."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    return (tensor / 255.0 - 0.5) / 0.5


def load_network_input(path: Path, size: tuple[int, int], layout: str = "davis") -> torch.Tensor:
    """Read a frame and return it as a (3, H, W) float tensor in [-1, 1] at ``size`` = (H, W)."""
    return to_network_range(resize_frame(read_frame(path), size, layout))


def load_network_inputs(paths: list[Path], size: tuple[int, int], layout: str = "davis") -> torch.Tensor:
    """A (B, 3, H, W) batch of frames; see :func:`load_network_input`."""
    return torch.stack([load_network_input(path, size, layout) for path in paths])
