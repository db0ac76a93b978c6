"""Frames as network input: resize so the short side is ``short_side`` and both sides are multiples
of the backbone's size multiple, then scale to [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.data.masks import read_frame
from harness.errors import ConfigError


def network_input_size(width: int, height: int, short_side: int = 480, multiple: int = 32) -> tuple[int, int]:
    """(H, W) of the network input for a frame of ``width`` x ``height``.

    The short side becomes ``short_side`` and the long side keeps the aspect ratio; both are floored to a
    multiple of ``multiple`` (854x480 -> 832x480 for ADM).
    """
    if short_side < multiple:
        raise ConfigError(f"short side {short_side} is smaller than the backbone's size multiple {multiple}")
    scale = short_side / min(width, height)
    new_w = int(width * scale + 1e-6) // multiple * multiple
    new_h = int(height * scale + 1e-6) // multiple * multiple
    return new_h, new_w


def load_network_input(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Read a frame and return it as a (3, H, W) float tensor in [-1, 1] at ``size`` = (H, W)."""
    rgb = read_frame(path)
    height, width = size
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
    tensor = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)
    return tensor / 127.5 - 1.0


def load_network_inputs(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """A (B, 3, H, W) batch of frames; see :func:`load_network_input`."""
    return torch.stack([load_network_input(path, size) for path in paths])
