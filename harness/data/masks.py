"""Reading and writing frames and id masks, with errors that name the offending file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.errors import DataError
from harness.files import mkstemp_shared

VOID_ID = 255


def davis_palette() -> list[int]:
    """The 256-colour palette of the DAVIS annotations (the PASCAL VOC colour map), flat RGB list."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


DAVIS_PALETTE: list[int] = davis_palette()


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    return image


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image, reading only its header."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error


def read_frame(path: Path) -> np.ndarray:
    """An RGB frame as a (H, W, 3) uint8 array."""
    return np.asarray(_open(Path(path)).convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """An id mask (palette or greyscale PNG) as a (H, W) uint8 array of object ids (255 = void)."""
    path = Path(path)
    image = _open(path)
    if image.mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8)
    if image.mode == "1":
        return np.asarray(image, dtype=np.uint8)
    raise DataError(
        f"{path} is a {image.mode} image; masks must be palette ('P') or greyscale ('L') PNGs of object ids"
    )


def read_palette(path: Path) -> list[int] | None:
    """The palette of a palette PNG, or None for greyscale masks."""
    image = _open(Path(path))
    if image.mode != "P":
        return None
    palette = image.getpalette() or []
    return (palette + [0] * 768)[:768]


def write_mask(path: Path, labels: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a (H, W) id array as a palette PNG, atomically (temp file + rename)."""
    path = Path(path)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.size and int(labels.max()) > 255:
        raise ValueError("object ids must fit in 0..255")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(palette if palette is not None else DAVIS_PALETTE)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = mkstemp_shared(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
