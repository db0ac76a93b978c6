"""Training-Free-VOS (Uziel, Dinari, Freifeld, NeurIPS 2023): streaming vMF mixture models per object.

Per object (background included) the method keeps M mixtures of von Mises-Fisher distributions over
unit vectors (ViT feature ++ scaled position feature), M = 10 mixtures with different numbers of
components. It fits them by EM on the first frame, labels each next frame by the object whose best
component explains a pixel best, refines the labels with a pixel-adaptive CRF, and updates the mixtures
with the confident pixels of the new frame plus time-weighted statistics of earlier frames. Released
code: github BGU-CS-VIL/Training-Free-VOS (main_seg.py, models_new.py, helper.py); the file:line
references below are to it. README.md ("Training-Free-VOS") lists what we do differently and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from harness.errors import ConfigError
from harness.methods import register_method
from harness.methods.training_free_vos.crf import RELEASED_KERNELS, PacCrf, PacKernelSpec, fit_to_first_frame
from harness.methods.training_free_vos.vmf import (
    SufficientStats,
    VmfMixtures,
    component_log_likelihoods,
    fit_em,
    init_mixtures,
    initial_responsibilities,
)

#: the released features have 60 rows at 480p, upsampled 2x (main_seg.py:24-33): the grid that its
#: window sizes, position frequencies and CRF dilations were tuned on. We express them relative to it.
REFERENCE_GRID_ROWS = 120
#: the CRF runs at twice the feature grid (main_seg.py:148-151)
REFERENCE_CRF_ROWS = 2 * REFERENCE_GRID_ROWS
#: object sizes are sqrt(pixels / 8) of the 480 x 480 annotation (helper.py:220-236, main_seg.py:74-78),
#: which covers the same frame as the 120 x 208 reference grid of a 16:9 DAVIS frame
REFERENCE_ANNOTATION_PIXELS = 480 * 480
REFERENCE_GRID_PIXELS = REFERENCE_GRID_ROWS * 208
#: first-frame statistics are kept in 5 of the 20 history slots (models_new.py:165, 307)
ANCHOR_SLOTS = 5


@dataclass(frozen=True)
class TrainingFreeVosSettings:
    """The method's settings; defaults are the released ones (main_seg.py:256-285 and the constants
    inside models_new.py / helper.py, cited per field)."""

    #: --loc: position features are multiplied by 0.25 * location_scale (main_seg.py:282)
    location_scale: float = 10.0
    #: positions are multiplied by this when pixels are classified: the released code fits with
    #: 0.25 * location_scale but classifies with unscaled positions (main_seg.py:116-118 vs 177);
    #: None = the fitting scale
    classify_position_weight: float | None = 1.0
    #: --time: frame t has time 1 + t * time_factor; history weights exp(-|dt| / 2) (models_new.py:13-29)
    time_factor: float = 0.33
    #: --num_models: mixtures per object, with component counts spread over linspace (models_new.py:180-195)
    num_models: int = 10
    #: None: raw features, as released for XCiT-S/8 (their scale against the position features is part of
    #: the method); a number: every pixel's feature vector is rescaled to this L2 norm first, for backbones
    #: whose features have another scale (random-conv: ~2; the position part has norm 2.5 * sqrt(32))
    feature_norm: float | None = None
    #: --add_dim: size of the 2D rotary position features (helper.py:43-58, 160-162)
    position_dim: int = 64
    #: --max_iters / --rll_tol: first-frame EM (models_new.py:497-532)
    em_max_iters: int = 100
    em_tol: float = 1e-5
    #: EM iterations of each streaming update (models_new.py:465)
    update_em_iters: int = 2
    #: --std: a pixel updates the models only if its best object beats the second by this margin in
    #: log-likelihood (main_seg.py:133-140)
    outlier_margin: float = 1.0
    #: --n_h, --n_w: window (at the 120-row reference grid) in which an object may appear around its last
    #: mask, and inside which a fully covered pixel keeps its label (helper.py:238-288)
    window_height: int = 19
    window_width: int = 39
    #: features are upsampled by this factor before anything else (main_seg.py:24-28)
    feature_upsample: int = 2
    #: largest number of components of one mixture (main_seg.py:78)
    max_components: int = 350
    #: a component may explain a pixel only if the cosine of their position features exceeds a threshold,
    #: spread linearly from gate_low (first mixture) to gate_high (last) (models_new.py:68-105)
    gate_low: float = 0.65
    gate_high: float = 0.80
    #: recent frames whose statistics feed the updates (20 slots minus 5 anchors, models_new.py:165, 307)
    history_size: int = 15
    #: pixel-adaptive CRF refinement (main_seg.py:63-66, 147-164, 226-229)
    crf: bool = True
    crf_steps: int = 5
    #: Adam steps fitting the CRF to the first frame (models_new.py:586-608)
    crf_fit_steps: int = 100
    crf_fit_lr: float = 0.02
    #: main_seg.py:278
    seed: int = 123
    #: points per chunk when scoring pixels (memory, not results)
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        positive = {
            "num_models": self.num_models,
            "em_max_iters": self.em_max_iters,
            "update_em_iters": self.update_em_iters,
            "window_height": self.window_height,
            "window_width": self.window_width,
            "feature_upsample": self.feature_upsample,
            "max_components": self.max_components,
            "history_size": self.history_size,
            "chunk_size": self.chunk_size,
            "crf_steps": self.crf_steps,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"method.{name} must be a positive integer, got {value!r}")
        if self.position_dim < 4 or self.position_dim % 4:
            raise ConfigError(
                f"method.position_dim must be a positive multiple of 4, got {self.position_dim}"
            )
        if self.classify_position_weight is not None and self.classify_position_weight < 0:
            raise ConfigError(
                f"method.classify_position_weight must be >= 0 or null, got {self.classify_position_weight}"
            )
        if self.feature_norm is not None and not self.feature_norm > 0:
            raise ConfigError(f"method.feature_norm must be positive or null, got {self.feature_norm}")
        if self.location_scale < 0 or self.time_factor < 0 or self.em_tol < 0 or self.crf_fit_steps < 0:
            raise ConfigError("method.location_scale, time_factor, em_tol and crf_fit_steps must be >= 0")
        if not -1.0 <= self.gate_low <= self.gate_high <= 1.0:
            raise ConfigError(
                f"method.gate_low <= gate_high must lie in [-1, 1], got {self.gate_low}, {self.gate_high}"
            )


class SequenceInputs(Protocol):
    """What the method reads of a sequence (harness.methods.base.SequenceContext provides it)."""

    name: str
    num_frames: int
    first_labels: np.ndarray
    num_classes: int
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    device: Any
    metrics: dict[str, float]

    @property
    def features(self) -> Callable[[int], Tensor]: ...

    @property
    def load_frames(self) -> Callable[[list[int]], Tensor] | None: ...


# --------------------------------------------------------------------------------------------------
# features and geometry


def upsample_features(features: Tensor, factor: int) -> Tensor:
    """(C, h, w) -> (C, factor h, factor w), bilinear with aligned corners (main_seg.py:24-28)."""
    if factor == 1:
        return features
    return F.interpolate(features[None], scale_factor=factor, mode="bilinear", align_corners=True)[0]


def position_features(rows: int, cols: int, dim: int, device: Any = None) -> Tensor:
    """(rows * cols, dim) 2D rotary position features (helper.py:43-58): for frequencies
    10000^(-4i/dim), sin and cos of y and x. Coordinates are in pixels of the 120-row reference grid,
    so that frequencies (and the position gate) mean the same at every input size."""
    unit = REFERENCE_GRID_ROWS / rows
    freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 4, dtype=torch.float32, device=device) / dim))
    ys = torch.arange(rows, dtype=torch.float32, device=device) * unit
    xs = torch.arange(cols, dtype=torch.float32, device=device) * unit
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    y = grid_y.reshape(-1, 1) * freqs
    x = grid_x.reshape(-1, 1) * freqs
    return torch.stack([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1).reshape(rows * cols, dim)


def to_points(
    features: Tensor, positions: Tensor, position_weight: float, feature_norm: float | None = None
) -> Tensor:
    """(h*w, C + P) unit vectors: features ++ position_weight * positions, normalised together
    (models_new.py:613-622); features first rescaled to ``feature_norm`` if given."""
    c = features.shape[0]
    flat = features.reshape(c, -1).T.to(positions.dtype)
    if feature_norm is not None:
        flat = feature_norm * F.normalize(flat, dim=1)
    return F.normalize(torch.cat([flat, position_weight * positions], dim=1), dim=1)


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()


def window_counts(labels: Tensor, num_classes: int, window: tuple[int, int]) -> Tensor:
    """(K+1, H, W): how many pixels of each class lie in the window around each pixel (helper.py:246-257;
    reflect padding, or replicate where the window is too large to reflect)."""
    wh, ww = window
    onehot = F.one_hot(labels, num_classes).permute(2, 0, 1).float()[None]
    pads = (ww // 2, ww // 2, wh // 2, wh // 2)
    h, w = labels.shape
    mode = "reflect" if wh // 2 < h and ww // 2 < w else "replicate"
    padded = F.pad(onehot, pads, mode=mode)
    ones = torch.ones(num_classes, 1, wh, ww, device=labels.device)
    return F.conv2d(padded, ones, groups=num_classes)[0].round()


def scaled_window(settings: TrainingFreeVosSettings, grid_rows: int) -> tuple[int, int]:
    """The released window sizes scaled from the 120-row reference grid to ``grid_rows``, kept odd."""
    ratio = grid_rows / REFERENCE_GRID_ROWS

    def odd(n: int) -> int:
        size = max(1, round(n * ratio))
        return size if size % 2 else size + 1

    return odd(settings.window_height), odd(settings.window_width)


def scaled_crf_kernels(crf_rows: int) -> tuple[PacKernelSpec, ...]:
    """The released CRF kernels with dilations and position scales scaled from the 240-row reference."""
    ratio = crf_rows / REFERENCE_CRF_ROWS
    return tuple(
        PacKernelSpec(
            k.kernel_size,
            max(1, round(k.dilation * ratio)),
            k.compatibility,
            k.position_scale * ratio,
            k.color_scale,
        )
        for k in RELEASED_KERNELS
    )


def object_sizes(grid_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """sqrt(pixels / 8) of each class in the 480 x 480 annotation the released code counts
    (main_seg.py:74-76), from its pixel count on the feature grid: at the reference grid (120 x 208 for
    DAVIS 480p) one grid pixel stands for 480 * 480 / (120 * 208) annotation pixels. Component numbers
    thus scale with the grid, as they do in the released code for its one grid size."""
    counts = np.bincount(grid_labels.reshape(-1), minlength=num_classes)[:num_classes]
    return np.sqrt(np.floor(counts * REFERENCE_ANNOTATION_PIXELS / REFERENCE_GRID_PIXELS / 8.0))


def component_counts(size: float, num_models: int, background: bool, max_components: int) -> list[int]:
    """Active components of each of the M mixtures: linspace(start, sqrt(int(size)), M)^2 with start 7.5
    for the background and 1.5 for objects (models_new.py:180-195); at least 1, at most max_components."""
    start = 7.5 if background else 1.5
    counts = (np.linspace(start, math.sqrt(int(size)), num_models) ** 2).astype(np.int64)
    return [int(min(max(c, 1), max_components)) for c in counts]


# --------------------------------------------------------------------------------------------------
# per-object streaming models


@dataclass
class ObjectModel:
    """One object's mixtures and the statistics of the frames it has seen."""

    mixtures: VmfMixtures
    #: statistics of the first frame: always part of the prior (models_new.py:306-316)
    anchor: SufficientStats
    #: (time, statistics) of recent frames, oldest first
    history: list[tuple[float, SufficientStats]] = field(default_factory=list)
    #: frames since the first one at which the anchor was refreshed (at most ANCHOR_SLOTS count)
    refreshes: int = 0

    def prior(self, now: float, time_factor: float) -> SufficientStats:
        """Time-weighted statistics of earlier frames: exp(-|now - t| / 2) per recent frame
        (models_new.py:13-29, 290-296) plus the anchor, whose slots the released code re-dates to one
        step before each save (models_new.py:325), so it keeps a constant weight."""
        total = self.anchor.scaled(self.anchor_weight(time_factor))
        for time, stats in self.history:
            total = total + stats.scaled(math.exp(-0.5 * abs(now - time)))
        return total

    def anchor_weight(self, time_factor: float) -> float:
        slots = min(max(self.refreshes, 1), ANCHOR_SLOTS)
        return sum(math.exp(-0.5 * (j + 1) * time_factor) for j in range(1, slots + 1))

    def remember(self, time: float, stats: SufficientStats, position: slice, history_size: int) -> None:
        """Add a frame's statistics; earlier statistics keep their appearance part but take the new
        frame's position part, rescaled to their own mass (models_new.py:318-329): the object moves."""
        for old in [self.anchor, *(s for _, s in self.history)]:
            ratio = (old.mass + 1e-6) / (stats.mass + 1e-6)
            old.weighted_sum[..., position] = stats.weighted_sum[..., position] * ratio[..., None]
        self.history.append((time, stats))
        del self.history[:-history_size]
        self.refreshes += 1

    def age(self, time_factor: float) -> None:
        """An object not seen: its history does not grow older (models_new.py:299-303)."""
        self.history = [(time + time_factor, stats) for time, stats in self.history]


def position_gate(mix: VmfMixtures, positions: Tensor, thresholds: Tensor) -> Tensor:
    """(M, N, K): the component may explain the point (cosine of position parts > the mixture's threshold)."""
    means = F.normalize(mix.means[..., -positions.shape[1] :], dim=-1)
    cos = torch.einsum("np,mkp->mnk", F.normalize(positions, dim=-1), means)
    return cos > thresholds[:, None, None]


def best_log_likelihood(
    mix: VmfMixtures, points: Tensor, positions: Tensor, thresholds: Tensor | None, chunk: int
) -> Tensor:
    """(N,): max over mixtures and components of log alpha + log vMF (models_new.py:375-413)."""
    out = []
    for start in range(0, points.shape[0], chunk):
        x = points[start : start + chunk]
        gate = (
            None if thresholds is None else position_gate(mix, positions[start : start + chunk], thresholds)
        )
        out.append(component_log_likelihoods(mix, x, gate).amax(dim=(0, 2)))
    return torch.cat(out)


@dataclass
class FrameScores:
    """Per-pixel scores of each class at the feature grid, -inf where a class may not be."""

    scores: Tensor  # (K+1, H, W)

    def labels(self) -> Tensor:
        """The best class; the background where no class may be (all -inf)."""
        return self.scores.argmax(dim=0)

    def margin(self) -> Tensor:
        """Best minus second-best score (inf where only one class may be)."""
        if self.scores.shape[0] < 2:
            return torch.full_like(self.scores[0], math.inf)
        top = self.scores.topk(2, dim=0).values
        return torch.nan_to_num(top[0] - top[1], nan=-math.inf)


class TrainingFreeVos:
    """The streaming method on one sequence; ``run`` yields (t, labels at the output size)."""

    def __init__(self, ctx: SequenceInputs, settings: TrainingFreeVosSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.device = torch.device(ctx.device) if ctx.device is not None else torch.device("cpu")
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.thresholds = torch.linspace(
            settings.gate_low, settings.gate_high, settings.num_models, device=self.device
        )

    # --- per-frame pieces -------------------------------------------------------------------------

    def frame_points(self, t: int) -> tuple[Tensor, Tensor]:
        """Frame t's points as the models are fitted to them (positions x 0.25 x location scale,
        main_seg.py:177, 282) and as they are classified (positions x classify_position_weight,
        main_seg.py:116-118)."""
        s = self.settings
        feats = upsample_features(self.ctx.features(t).to(self.device, torch.float32), s.feature_upsample)
        fit = to_points(feats, self.positions, 0.25 * s.location_scale, s.feature_norm)
        if s.classify_position_weight is None:
            return fit, fit
        return fit, to_points(feats, self.positions, s.classify_position_weight, s.feature_norm)

    def frame_image(self, t: int) -> Tensor:
        """(3, Hc, Wc) 0-255 frame at the CRF's size (bicubic, as main_seg.py:149-151)."""
        if self.ctx.load_frames is None:
            raise ConfigError("method training-free-vos: the CRF needs the frames (or set method.crf: false)")
        frame = self.ctx.load_frames([t])[0].to(self.device, torch.float32)
        image = F.interpolate((frame[None] + 1.0) * 127.5, size=self.crf_size, mode="bicubic", antialias=True)
        return image[0].clamp(0.0, 255.0)

    def score(self, points: Tensor, previous: Tensor, gated: bool) -> FrameScores:
        """Scores of every class: the best component's log-likelihood; +inf where the window around a
        pixel held only that class in the previous frame, -inf where it held none of it (helper.py:238-288,
        models_new.py:375-411); absent objects keep their last window (helper.py:264-267)."""
        h, w = self.grid
        counts = window_counts(previous, self.ctx.num_classes, self.window)
        full = self.window[0] * self.window[1]
        scores = torch.full((self.ctx.num_classes, h * w), -math.inf, device=self.device)
        for i, model in self.models.items():
            present = counts[i] > 0
            if present.any():
                self.last_seen[i] = counts[i]
                self.skipped[i] = False
            else:
                self.skipped[i] = True
                counts_i = self.last_seen[i]
                present = counts_i > 0
            thresholds = self.thresholds if gated and self.settings.location_scale > 0 else None
            ll = best_log_likelihood(
                model.mixtures, points, self.positions, thresholds, self.settings.chunk_size
            )
            ll = torch.where(present.reshape(-1), ll, torch.full_like(ll, -math.inf))
            keep = (self.last_seen[i] == full).reshape(-1)
            scores[i] = torch.where(keep, torch.full_like(ll, math.inf), ll)
        return FrameScores(scores.view(-1, h, w))

    def refine(self, scores: FrameScores, image: Tensor) -> Tensor:
        """(K+1, Hc, Wc) CRF log-potentials from 2x-upsampled scores (main_seg.py:129, 142-158)."""
        finite = torch.nan_to_num(scores.scores, posinf=1e5, neginf=-1e5)
        up = F.interpolate(finite[None], size=self.crf_size, mode="bilinear", align_corners=False)[0]
        onehot = F.one_hot(up.argmax(dim=0), self.ctx.num_classes).permute(2, 0, 1).float()
        unary = 5.0 * onehot  # models_new.py:151
        if self.crf is None:
            return unary
        with torch.no_grad():
            return self.crf(unary, image)

    def update(self, t: int, points: Tensor, labels: Tensor, confident: Tensor) -> None:
        """Streaming EM on each object's confident pixels with the time-weighted prior (main_seg.py:171-188,
        models_new.py:446-580)."""
        now = 1.0 + t * self.settings.time_factor
        flat, ok = labels.reshape(-1), confident.reshape(-1)
        for i, model in self.models.items():
            mask = (flat == i) & ok
            if self.skipped[i] or not bool(mask.any()):
                model.age(self.settings.time_factor)
                continue
            x, pos = points[mask], self.positions[mask]
            allowed = (
                position_gate(model.mixtures, pos, self.thresholds)
                if self.settings.location_scale > 0
                else None
            )
            result = fit_em(
                model.mixtures,
                x,
                max_iters=self.settings.update_em_iters,
                tol=self.settings.em_tol,
                prior=model.prior(now, self.settings.time_factor),
                allowed=allowed,
                min_iters=self.settings.update_em_iters,
            )
            model.mixtures = result.mixtures
            assert result.stats is not None
            model.remember(now, result.stats, self.position_part, self.settings.history_size)

    # --- the sequence -----------------------------------------------------------------------------

    def setup(self) -> Tensor:
        s = self.settings
        first = self.ctx.features(0)
        self.grid = (first.shape[1] * s.feature_upsample, first.shape[2] * s.feature_upsample)
        self.crf_size = (2 * self.grid[0], 2 * self.grid[1])
        self.window = scaled_window(s, self.grid[0])
        self.positions = position_features(*self.grid, s.position_dim, device=self.device)
        self.position_part = slice(first.shape[0], first.shape[0] + s.position_dim)
        first_labels = torch.from_numpy(np.asarray(self.ctx.first_labels, dtype=np.int64)).to(self.device)
        grid_labels = resize_labels(first_labels, self.grid)
        sizes = object_sizes(grid_labels.cpu().numpy(), self.ctx.num_classes)
        # objects smaller than this are dropped (main_seg.py:84-87); tiny ones get 16 (main_seg.py:89-90)
        kept = {i: (16.0 if size < 2 else float(size)) for i, size in enumerate(sizes) if size >= 1.01}
        order = int(min(max(kept.values(), default=1.0), s.max_components))
        points, queries = self.frame_points(0)
        self.models: dict[int, ObjectModel] = {}
        self.skipped: dict[int, bool] = {}
        self.last_seen: dict[int, Tensor] = {}
        for i, size in kept.items():
            x = points[(grid_labels == i).reshape(-1)]
            if x.shape[0] == 0:
                continue
            counts = component_counts(size, s.num_models, i == 0, order)
            mix = init_mixtures(x, counts, order, self.generator, init_slice=self.position_part)
            start = initial_responsibilities(mix, x, init_slice=self.position_part)
            result = fit_em(mix, x, s.em_max_iters, s.em_tol, start_responsibilities=start)
            assert result.stats is not None
            model = ObjectModel(result.mixtures, result.stats)
            model.history.append(
                (1.0, SufficientStats(result.stats.mass.clone(), result.stats.weighted_sum.clone()))
            )
            self.models[i] = model
            self.skipped[i] = False
            self.last_seen[i] = torch.zeros(self.grid, device=self.device)
        self.crf = None
        if s.crf:
            self.crf = PacCrf(self.ctx.num_classes, scaled_crf_kernels(self.crf_size[0]), steps=s.crf_steps)
            self.crf = self.crf.to(self.device)
            if s.crf_fit_steps:
                # fitted on the first frame's own classification against its labels (models_new.py:582-608)
                scores = self.score(queries, grid_labels, gated=False)
                up = F.interpolate(
                    torch.nan_to_num(scores.scores, posinf=1e5, neginf=-1e5)[None],
                    size=self.crf_size,
                    mode="bilinear",
                )[0]
                unary = 5.0 * F.one_hot(up.argmax(0), self.ctx.num_classes).permute(2, 0, 1).float()
                target = resize_labels(first_labels, self.crf_size)
                fit_to_first_frame(
                    self.crf,
                    unary,
                    self.frame_image(0),
                    target,
                    s.crf_fit_steps,
                    lr=s.crf_fit_lr,
                    generator=self.generator,
                )
            self.crf.eval()
        return grid_labels

    def run(self) -> Iterator[tuple[int, np.ndarray]]:
        previous = self.setup()
        out_h, out_w = self.ctx.output_size
        confident_total = 0.0
        for t in range(1, self.ctx.num_frames):
            points, queries = self.frame_points(t)
            image = self.frame_image(t) if self.crf is not None else None
            # pass 1: classify with the current models, refine, keep the confident agreeing pixels
            first = self.score(queries, previous, gated=True)
            raw = first.labels()
            refined = self.grid_labels(self.refine(first, image))
            confident = (first.margin() > self.settings.outlier_margin) & (refined == raw)
            confident_total += float(confident.float().mean())
            self.update(t, points, refined, confident)
            # pass 2: classify again with the updated models, refine, write (main_seg.py:195-240)
            second = self.score(queries, previous, gated=True)
            log_q = self.refine(second, image)
            previous = self.grid_labels(log_q)
            up = F.interpolate(log_q[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
            yield t, up.argmax(dim=0).to(torch.uint8).cpu().numpy()
        if self.ctx.num_frames > 1:
            # the share of pixels that updated the models (outlier margin and CRF agreement)
            self.ctx.metrics["tfvos_confident_fraction"] = confident_total / (self.ctx.num_frames - 1)

    def grid_labels(self, log_q: Tensor) -> Tensor:
        """Labels at the feature grid from CRF-resolution log-potentials (main_seg.py:161-164)."""
        return F.interpolate(log_q[None], size=self.grid, mode="bilinear", align_corners=False)[0].argmax(0)


@register_method("training-free-vos")
class TrainingFreeVosMethod:
    """Training-Free-VOS as a registered method (run config ``method: {name: training-free-vos, ...}``)."""

    settings_class = TrainingFreeVosSettings

    def segment_sequence(
        self, ctx: SequenceInputs, settings: TrainingFreeVosSettings
    ) -> Iterator[tuple[int, np.ndarray]]:
        return TrainingFreeVos(ctx, settings).run()


def segment_sequence(
    ctx: SequenceInputs, settings: TrainingFreeVosSettings
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (t, (H0, W0) uint8 class indices) for t = 1 .. T-1."""
    return TrainingFreeVos(ctx, settings).run()
