"""A small, deterministic synthetic dataset in DAVIS-2017 layout.

Tests and smoke runs need a dataset that exists everywhere (no downloads), is generated in well under
a second, and still contains the situations that break mask propagation: several objects, one object
passing in front of another, an object that leaves the frame and comes back, frame sizes that are not
multiples of the backbones' stride, void pixels on object borders, and a test-dev-like split with only
first-frame masks. Every pixel comes from a seeded numpy Generator, so re-running gives identical bytes.

Objects are described in normalised coordinates (fractions of the frame width/height, sizes in units of
the frame height) and rendered back to front. The *amodal* (unoccluded) mask of every object is kept,
so tests can check that an occlusion really happens rather than trusting the script.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from harness.data.masks import DAVIS_PALETTE, VOID_ID, write_mask
from harness.errors import ConfigError, HarnessError

Size = tuple[int, int]  # (width, height)
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. The defaults give 4 val and 2 test-dev sequences in about half a second."""

    seed: int = 0
    # (width, height) of the frames; sequence i gets sizes[i % len(sizes)]. 144x88 is deliberately not
    # a multiple of 32 (nor of 16 in height), so that backbones have to resize or pad.
    sizes: tuple[Size, ...] = ((160, 96), (192, 96), (144, 88))
    val_frames: int = 12
    test_dev_frames: int = 8
    # Every `void_every`-th ground-truth frame (never frame 0, the propagation input) gets void pixels
    # on a fraction `void_fraction` of the object-border pixels; 0 disables void pixels.
    void_every: int = 3
    void_fraction: float = 0.25
    jpeg_quality: int = 92
    noise_sigma: float = 3.0  # per-frame sensor noise, in grey levels

    def validate(self) -> None:
        if not self.sizes:
            raise ConfigError("SynthSpec.sizes must list at least one (width, height)")
        for width, height in self.sizes:
            if width < 64 or height < 48:
                raise ConfigError(f"SynthSpec.sizes: {width}x{height} is too small (minimum 64x48)")
        # The leave/re-enter script needs a few frames outside the image and a few inside.
        if self.val_frames < 8:
            raise ConfigError(f"SynthSpec.val_frames={self.val_frames}: need at least 8")
        if self.test_dev_frames < 2:
            raise ConfigError(f"SynthSpec.test_dev_frames={self.test_dev_frames}: need at least 2")
        if self.void_every < 0 or not 0.0 <= self.void_fraction <= 1.0:
            raise ConfigError("SynthSpec: void_every must be >= 0 and void_fraction in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"SynthSpec.jpeg_quality={self.jpeg_quality}: must be in 1..100")


@dataclass(frozen=True)
class Texture:
    """A two-colour pattern in the object's own (rotating) coordinates, so it moves with the object."""

    pattern: str  # "stripes", "checker", "rings" or "dots"
    colour_a: Colour
    colour_b: Colour
    period: float  # pixels


@dataclass(frozen=True)
class ObjectScript:
    """One object: shape, texture, depth and a piecewise-linear path over normalised time [0, 1]."""

    object_id: int
    shape: str  # "ellipse", "rect" or "diamond"
    half_extent: tuple[float, float]  # (x, y) half sizes in units of the frame height
    texture: Texture
    depth: int  # larger is nearer to the camera (drawn later)
    path: tuple[tuple[float, float, float], ...]  # (t, x, y); x, y as fractions of width, height
    spin: float = 0.0  # total rotation over the sequence, radians


@dataclass(frozen=True)
class SequenceScript:
    name: str
    split: str  # "val" or "test-dev"
    size: Size
    frames: int
    objects: tuple[ObjectScript, ...]
    background_pan: float = 0.0  # total horizontal camera pan, as a fraction of the width


@dataclass(frozen=True)
class RenderedSequence:
    """Frames, visible labels (with void) and per-object amodal masks of one sequence."""

    script: SequenceScript
    frames: np.ndarray  # (T, H, W, 3) uint8
    labels: np.ndarray  # (T, H, W) uint8: 0 background, object ids, VOID_ID on some borders
    amodal: dict[int, np.ndarray]  # object id -> (T, H, W) bool, the object's full extent


VAL_SEQUENCES = ("synth-occlusion", "synth-reenter", "synth-crossing", "synth-shapes")
TEST_DEV_SEQUENCES = ("synth-td-orbit", "synth-td-drift")

_RED_STRIPES = Texture("stripes", (220, 40, 40), (250, 210, 60), 6.0)
_GREEN_CHECKER = Texture("checker", (30, 160, 60), (230, 240, 230), 7.0)
_BLUE_DOTS = Texture("dots", (40, 70, 200), (250, 250, 250), 8.0)
_MAGENTA_RINGS = Texture("rings", (200, 40, 190), (40, 20, 60), 5.0)
_ORANGE_STRIPES = Texture("stripes", (250, 140, 20), (20, 20, 20), 4.0)
_CYAN_CHECKER = Texture("checker", (20, 200, 210), (20, 60, 120), 5.0)


def sequence_scripts(spec: SynthSpec) -> tuple[SequenceScript, ...]:
    """The scripted sequences of a spec, in a fixed order (val first, then test-dev)."""
    spec.validate()
    size = [spec.sizes[i % len(spec.sizes)] for i in range(len(VAL_SEQUENCES) + len(TEST_DEV_SEQUENCES))]
    val, test = spec.val_frames, spec.test_dev_frames
    return (
        # The striped ellipse (1, in front) sweeps across the larger checkered square (2, behind).
        SequenceScript(
            "synth-occlusion",
            "val",
            size[0],
            val,
            (
                ObjectScript(
                    1,
                    "ellipse",
                    (0.17, 0.22),
                    _RED_STRIPES,
                    2,
                    ((0.0, 0.12, 0.45), (1.0, 0.88, 0.55)),
                    spin=0.6,
                ),
                ObjectScript(
                    2, "rect", (0.26, 0.26), _GREEN_CHECKER, 1, ((0.0, 0.48, 0.52), (1.0, 0.53, 0.48))
                ),
                ObjectScript(
                    3, "ellipse", (0.12, 0.12), _BLUE_DOTS, 0, ((0.0, 0.12, 0.18), (1.0, 0.22, 0.22))
                ),
            ),
            background_pan=0.05,
        ),
        # The rings disc (1) exits on the right, stays out for about a fifth of the clip, and comes back.
        SequenceScript(
            "synth-reenter",
            "val",
            size[1],
            val,
            (
                ObjectScript(
                    1,
                    "ellipse",
                    (0.2, 0.2),
                    _MAGENTA_RINGS,
                    1,
                    ((0.0, 0.55, 0.5), (0.3, 1.25, 0.45), (0.55, 1.25, 0.45), (1.0, 0.62, 0.55)),
                    spin=1.5,
                ),
                ObjectScript(
                    2, "diamond", (0.18, 0.22), _CYAN_CHECKER, 0, ((0.0, 0.2, 0.65), (1.0, 0.3, 0.35))
                ),
            ),
        ),
        # Two objects cross in opposite directions (1 in front of 2); a third moves vertically.
        SequenceScript(
            "synth-crossing",
            "val",
            size[2],
            val,
            (
                ObjectScript(
                    1,
                    "rect",
                    (0.16, 0.12),
                    _ORANGE_STRIPES,
                    2,
                    ((0.0, 0.15, 0.55), (1.0, 0.85, 0.5)),
                    spin=0.8,
                ),
                ObjectScript(
                    2, "ellipse", (0.18, 0.16), _BLUE_DOTS, 1, ((0.0, 0.85, 0.45), (1.0, 0.15, 0.5))
                ),
                ObjectScript(
                    3, "diamond", (0.12, 0.12), _GREEN_CHECKER, 0, ((0.0, 0.5, 0.2), (1.0, 0.5, 0.8))
                ),
            ),
            background_pan=0.08,
        ),
        # Four distinct shapes drifting slowly, a few of them rotating.
        SequenceScript(
            "synth-shapes",
            "val",
            size[3],
            val,
            (
                ObjectScript(
                    1,
                    "ellipse",
                    (0.14, 0.1),
                    _RED_STRIPES,
                    0,
                    ((0.0, 0.15, 0.25), (1.0, 0.22, 0.3)),
                    spin=0.5,
                ),
                ObjectScript(
                    2, "rect", (0.12, 0.12), _CYAN_CHECKER, 0, ((0.0, 0.8, 0.25), (1.0, 0.72, 0.3)), spin=-0.7
                ),
                ObjectScript(
                    3, "diamond", (0.14, 0.14), _MAGENTA_RINGS, 0, ((0.0, 0.2, 0.72), (1.0, 0.3, 0.7))
                ),
                ObjectScript(
                    4,
                    "ellipse",
                    (0.13, 0.13),
                    _ORANGE_STRIPES,
                    0,
                    ((0.0, 0.8, 0.72), (1.0, 0.7, 0.75)),
                    spin=1.0,
                ),
            ),
        ),
        SequenceScript(
            "synth-td-orbit",
            "test-dev",
            size[4],
            test,
            (
                ObjectScript(
                    1,
                    "ellipse",
                    (0.15, 0.15),
                    _BLUE_DOTS,
                    1,
                    ((0.0, 0.3, 0.3), (0.5, 0.7, 0.35), (1.0, 0.65, 0.7)),
                ),
                ObjectScript(
                    2,
                    "rect",
                    (0.14, 0.18),
                    _RED_STRIPES,
                    0,
                    ((0.0, 0.7, 0.7), (0.5, 0.35, 0.65), (1.0, 0.3, 0.3)),
                    spin=0.9,
                ),
            ),
        ),
        SequenceScript(
            "synth-td-drift",
            "test-dev",
            size[5],
            test,
            (
                ObjectScript(
                    1, "diamond", (0.15, 0.15), _GREEN_CHECKER, 0, ((0.0, 0.2, 0.5), (1.0, 0.35, 0.45))
                ),
                ObjectScript(
                    2,
                    "ellipse",
                    (0.12, 0.16),
                    _ORANGE_STRIPES,
                    0,
                    ((0.0, 0.5, 0.3), (1.0, 0.55, 0.6)),
                    spin=0.7,
                ),
                ObjectScript(3, "rect", (0.13, 0.11), _MAGENTA_RINGS, 0, ((0.0, 0.8, 0.6), (1.0, 0.7, 0.4))),
            ),
            background_pan=0.06,
        ),
    )


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted, low-frequency colour field with fine grain: textured but unlike any object."""
    coarse = rng.uniform(70, 150, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ripple = 12.0 * np.sin((xs + 0.6 * ys) / 9.0)[..., None]
    grain = rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    # Desaturate towards grey so objects (saturated colours) stand out.
    grey = smooth.mean(axis=2, keepdims=True)
    return 0.5 * smooth + 0.5 * grey + ripple + grain


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    if shape == "ellipse":
        return (u / half_x) ** 2 + (v / half_y) ** 2 <= 1.0
    if shape == "rect":
        return (np.abs(u) <= half_x) & (np.abs(v) <= half_y)
    if shape == "diamond":
        return np.abs(u) / half_x + np.abs(v) / half_y <= 1.0
    raise ConfigError(f"unknown synthetic shape {shape!r}")


def _pattern_is_b(texture: Texture, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    period = texture.period
    if texture.pattern == "stripes":
        return np.floor(u / period).astype(np.int64) % 2 == 1
    if texture.pattern == "checker":
        return (np.floor(u / period) + np.floor(v / period)).astype(np.int64) % 2 == 1
    if texture.pattern == "rings":
        return np.floor(np.hypot(u, v) / period).astype(np.int64) % 2 == 1
    if texture.pattern == "dots":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return du**2 + dv**2 <= (0.3 * period) ** 2
    raise ConfigError(f"unknown synthetic texture {texture.pattern!r}")


def _border_pixels(labels: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour of a different label (the frame edge does not count)."""
    border = np.zeros(labels.shape, dtype=bool)
    differs_v = labels[1:, :] != labels[:-1, :]
    differs_h = labels[:, 1:] != labels[:, :-1]
    border[1:, :] |= differs_v
    border[:-1, :] |= differs_v
    border[:, 1:] |= differs_h
    border[:, :-1] |= differs_h
    return border & (labels != 0)


def _add_void(labels: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Mark some border pixels void, as DAVIS annotators do where a boundary is uncertain.

    Small objects (a few dozen pixels, e.g. one entering the frame) are left alone so that an object
    that is visible always keeps labelled pixels.
    """
    ids, counts = np.unique(labels, return_counts=True)
    large = [int(i) for i, c in zip(ids, counts, strict=True) if i != 0 and c >= 80]
    candidates = _border_pixels(labels) & np.isin(labels, large)
    chosen = candidates & (rng.random(labels.shape) < fraction)
    out = labels.copy()
    out[chosen] = VOID_ID
    return out


def render_sequence(script: SequenceScript, spec: SynthSpec, index: int) -> RenderedSequence:
    """Render one scripted sequence. ``index`` separates the random streams of different sequences."""
    rng = np.random.default_rng([spec.seed, index])
    width, height = script.size
    pan_pixels = int(round(script.background_pan * width))
    background = _background(rng, width + pan_pixels + 1, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys += 0.5
    xs += 0.5
    times = np.linspace(0.0, 1.0, script.frames)
    ordered = sorted(script.objects, key=lambda obj: (obj.depth, obj.object_id))

    frames = np.empty((script.frames, height, width, 3), dtype=np.uint8)
    labels = np.zeros((script.frames, height, width), dtype=np.uint8)
    amodal = {obj.object_id: np.zeros((script.frames, height, width), dtype=bool) for obj in script.objects}
    for t_index, t in enumerate(times):
        offset = int(round(t * pan_pixels))
        image = background[:, offset : offset + width].copy()
        for obj in ordered:
            path = np.asarray(obj.path, dtype=np.float64)
            cx = float(np.interp(t, path[:, 0], path[:, 1])) * width
            cy = float(np.interp(t, path[:, 0], path[:, 2])) * height
            angle = obj.spin * t
            cos, sin = np.cos(angle), np.sin(angle)
            dx, dy = xs - cx, ys - cy
            u = cos * dx + sin * dy
            v = -sin * dx + cos * dy
            mask = _shape_mask(obj.shape, u, v, obj.half_extent[0] * height, obj.half_extent[1] * height)
            is_b = _pattern_is_b(obj.texture, u, v)
            colours = np.where(is_b[..., None], obj.texture.colour_b, obj.texture.colour_a)
            image[mask] = colours[mask]
            labels[t_index][mask] = obj.object_id
            amodal[obj.object_id][t_index] = mask
        image += rng.normal(0.0, spec.noise_sigma, size=image.shape).astype(np.float32)
        frames[t_index] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        if spec.void_every and t_index > 0 and t_index % spec.void_every == 0:
            labels[t_index] = _add_void(labels[t_index], rng, spec.void_fraction)
    return RenderedSequence(script=script, frames=frames, labels=labels, amodal=amodal)


def _write_sequence(root: Path, rendered: RenderedSequence, spec: SynthSpec) -> None:
    name = rendered.script.name
    frame_dir = root / "JPEGImages" / "480p" / name
    mask_dir = root / "Annotations" / "480p" / name
    frame_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    annotated = range(len(rendered.frames)) if rendered.script.split == "val" else range(1)
    for t_index, frame in enumerate(rendered.frames):
        # No EXIF/ICC or timestamps are written, so the bytes depend only on the pixels.
        path = frame_dir / f"{t_index:05d}.jpg"
        Image.fromarray(frame).save(path, format="JPEG", quality=spec.jpeg_quality)
    for t_index in annotated:
        write_mask(mask_dir / f"{t_index:05d}.png", rendered.labels[t_index], DAVIS_PALETTE)


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HarnessError(f"cannot write the synthetic dataset to {out}: it is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HarnessError(
            f"{out} exists and is not empty; pass --overwrite (overwrite=True in Python) to replace it"
        )


def make_synthetic_dataset(out: Path, spec: SynthSpec = SynthSpec(), *, overwrite: bool = False) -> Path:
    """Write the synthetic dataset to ``out`` (DAVIS-2017 layout) and return ``out``.

    The dataset is built in a temporary folder next to ``out`` and renamed into place, so ``out`` is
    either absent, the old content, or the complete new dataset, never half-written.
    """
    out = Path(out).expanduser().absolute()
    _check_target(out, overwrite)
    scripts = sequence_scripts(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.synth-"))
    try:
        for index, script in enumerate(scripts):
            _write_sequence(staging, render_sequence(script, spec, index), spec)
        imagesets = staging / "ImageSets" / "2017"
        imagesets.mkdir(parents=True)
        for split in ("val", "test-dev"):
            names = [s.name for s in scripts if s.split == split]
            (imagesets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a dataset should be readable like any folder
        _check_target(out, overwrite)  # again: someone may have written there meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "dataset")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
