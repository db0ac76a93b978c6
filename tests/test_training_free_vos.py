"""The Training-Free-VOS method on the synthetic set, through a small stand-in for the sequence context."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backbones import load_backbone
from harness.config import RunConfig
from harness.data import write_mask
from harness.data.dataset import open_dataset
from harness.errors import ConfigError
from harness.evaluation import evaluate_dataset
from harness.frames import load_network_inputs, network_input_size
from harness.methods import get_method
from harness.methods.training_free_vos.method import (
    ObjectModel,
    TrainingFreeVosMethod,
    TrainingFreeVosSettings,
    component_counts,
    object_sizes,
    position_features,
    scaled_window,
    segment_sequence,
    window_counts,
)
from harness.methods.training_free_vos.vmf import SufficientStats

#: small and quick; random-conv features have norms ~2, so they are rescaled like XCiT's (feature_norm)
FAST = TrainingFreeVosSettings(feature_norm=20.0, num_models=5, em_max_iters=30, crf_fit_steps=3)


@dataclass
class StandInContext:
    """The attributes of harness.methods.base.SequenceContext the method reads."""

    name: str
    frames: torch.Tensor  # (T, 3, H, W) in [-1, 1]
    feature_maps: torch.Tensor  # (T, C, h, w)
    first_labels: np.ndarray
    num_classes: int
    output_size: tuple[int, int]
    ground_truth: list[np.ndarray] | None = None
    device: Any = "cpu"
    progress: bool = False
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[3])

    def features(self, t: int) -> torch.Tensor:
        return self.feature_maps[t]

    def load_frames(self, indices: list[int]) -> torch.Tensor:
        return self.frames[list(indices)]


def synth_context(root: Path, name: str, short_side: int = 96, layer: int = 1) -> StandInContext:
    dataset = open_dataset(root, "val")
    sequence = dataset.sequence(name)
    width, height = sequence.frame_size()
    size = network_input_size(width, height, short_side, 8)
    frames = load_network_inputs(list(sequence.frames), size)
    backbone = load_backbone("random-conv", device="cpu")
    feats = backbone.extract(
        frames,
        timestep=0,
        layers=[layer],
        ensemble_size=1,
        seed=0,
        sequence=name,
        frame_indices=list(range(len(sequence.frames))),
    )[layer]
    masks = [sequence.load_mask(n) for n in sequence.frame_names]
    first = masks[0].copy()
    first[first == 255] = 0
    return StandInContext(
        name, frames, feats, first, int(first.max()) + 1, (height, width), ground_truth=masks
    )


def mean_iou(predictions: dict[int, np.ndarray], truth: list[np.ndarray], num_classes: int) -> float:
    scores = []
    for t, labels in predictions.items():
        gt = truth[t]
        valid = gt != 255
        for k in range(1, num_classes):
            a, b = (labels == k) & valid, (gt == k) & valid
            union = (a | b).sum()
            if union:
                scores.append((a & b).sum() / union)
    return float(np.mean(scores))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: on a shared CPU, one intra-op thread is much faster than several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def truncated(ctx: StandInContext, frames: int) -> StandInContext:
    return dataclasses.replace(ctx, frames=ctx.frames[:frames], feature_maps=ctx.feature_maps[:frames])


@pytest.fixture(scope="module")
def contexts(synth_root: Path) -> list[StandInContext]:
    """synth-occlusion (one object passes in front of another) and synth-shapes (four moving shapes)."""
    return [synth_context(synth_root, name) for name in ("synth-occlusion", "synth-shapes")]


def test_yields_every_later_frame_at_the_output_size(contexts: list[StandInContext]) -> None:
    ctx = truncated(contexts[0], 4)
    out = list(segment_sequence(ctx, FAST))
    assert [t for t, _ in out] == list(range(1, ctx.num_frames))
    for _, labels in out:
        assert labels.shape == ctx.output_size and labels.dtype == np.uint8
        assert labels.max() < ctx.num_classes


def test_same_settings_give_the_same_masks(contexts: list[StandInContext]) -> None:
    ctx = truncated(contexts[1], 3)
    settings = dataclasses.replace(FAST, crf=False)
    a = [labels for _, labels in segment_sequence(ctx, settings)]
    b = [labels for _, labels in segment_sequence(ctx, settings)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        TrainingFreeVosSettings(num_models=0)
    with pytest.raises(ConfigError):
        TrainingFreeVosSettings(position_dim=10)
    with pytest.raises(ConfigError):
        TrainingFreeVosSettings(gate_low=0.9, gate_high=0.5)


def test_window_counts_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, size=(9, 11)))
    counts = window_counts(labels, 3, (3, 5)).numpy()
    padded = np.pad(labels.numpy(), ((1, 1), (2, 2)), mode="reflect")
    for y in range(9):
        for x in range(11):
            window = padded[y : y + 3, x : x + 5]
            assert [int((window == k).sum()) for k in range(3)] == counts[:, y, x].tolist()


def test_released_geometry_at_the_reference_grid() -> None:
    settings = TrainingFreeVosSettings()
    assert scaled_window(settings, 120) == (19, 39)
    pe = position_features(120, 208, 64)
    assert pe.shape == (120 * 208, 64)
    # at the reference grid, a pixel's position feature is (sin, cos) pairs of y and x: norm sqrt(32)
    assert torch.allclose(pe.norm(dim=1), torch.full((120 * 208,), math.sqrt(32.0)))
    # half the frame at 120 rows and at 30 rows: the same feature (coordinates in reference pixels)
    assert torch.allclose(position_features(30, 52, 64)[15 * 52 + 26], pe[60 * 208 + 104], atol=1e-4)


def test_component_counts_follow_the_released_linspace() -> None:
    labels = np.zeros((120, 208), dtype=np.int64)
    labels[:60, :104] = 1  # a quarter of the reference grid, a quarter of 480 x 480: sqrt(57600 / 8)
    sizes = object_sizes(labels, 2)
    assert sizes[1] == pytest.approx(math.sqrt(7200))
    fg = component_counts(sizes[1], 10, False, 350)
    bg = component_counts(sizes[0], 10, True, 350)
    assert fg[0] == 2 and fg[-1] == int(sizes[1]) and fg == sorted(fg)
    assert bg[0] == 56 and bg[-1] == int(sizes[0])


def test_older_statistics_take_the_new_position_part() -> None:
    def stats(mass: float, value: float) -> SufficientStats:
        return SufficientStats(torch.full((1, 1), mass), torch.full((1, 1, 4), value))

    model = ObjectModel(mixtures=None, anchor=stats(2.0, 1.0))  # type: ignore[arg-type]
    model.remember(1.0, stats(4.0, 3.0), slice(2, 4), history_size=2)
    expected = torch.tensor([1.0, 1.0, 1.5, 1.5])  # position part: 3 * (2 + 1e-6) / (4 + 1e-6)
    assert torch.allclose(model.anchor.weighted_sum[0, 0], expected)
    for t in range(2, 5):
        model.remember(float(t), stats(1.0, 1.0), slice(2, 4), history_size=2)
    assert [time for time, _ in model.history] == [3.0, 4.0]
    prior = model.prior(5.0, 0.33)
    weight = model.anchor_weight(0.33) * 2.0 + math.exp(-1.0) + math.exp(-0.5)
    assert float(prior.mass) == pytest.approx(weight)


def test_first_frame_labels_are_not_needed_at_the_feature_size(contexts: list[StandInContext]) -> None:
    """The first mask is given at the original size; a one-object sequence works end to end."""
    ctx = truncated(contexts[0], 3)
    one = np.where(ctx.first_labels == 1, 1, 0).astype(np.uint8)
    single = dataclasses.replace(ctx, first_labels=one, num_classes=2)
    out = list(segment_sequence(single, dataclasses.replace(FAST, crf=False)))
    assert len(out) == ctx.num_frames - 1
    assert all(np.unique(labels).tolist() in ([0], [0, 1], [1]) for _, labels in out)


#: synth-occlusion: one object passes in front of another; synth-shapes: four moving shapes
RUN_SEQUENCES = ["synth-occlusion", "synth-shapes"]


def run_config(root: Path, out: Path, backbone: str, **overrides: object) -> RunConfig:
    fast = {f"method.{key}": value for key, value in dataclasses.asdict(FAST).items()}
    base = {
        "dataset.root": str(root),
        "dataset.sequences": RUN_SEQUENCES,
        "backbone.name": backbone,
        "input.short_side": 96,
        "method.name": "training-free-vos",
        **fast,
        "cache.dir": str(out / "cache"),
        "output_dir": str(out / "run"),
        "progress": False,
    }
    return RunConfig().with_overrides(base | overrides)


def static_baseline(root: Path, out: Path) -> float:
    """J&F of copying the first mask to every frame."""
    dataset = open_dataset(root, "val", sequences=RUN_SEQUENCES)
    for sequence in dataset.sequences:
        first = sequence.first_mask().copy()
        first[first == 255] = 0
        for name in sequence.frame_names:
            write_mask(out / sequence.name / f"{name}.png", first)
    return evaluate_dataset(dataset, out, progress=False).global_metrics["J&F-Mean"]


def test_the_confident_fraction_of_a_run_is_the_mean_over_its_sequences() -> None:
    from harness.methods.base import aggregate_sequence_metrics

    per_sequence = [{"tfvos_confident_fraction": 0.9}, {"tfvos_confident_fraction": 0.7}]
    assert aggregate_sequence_metrics(per_sequence) == {"tfvos_confident_fraction": pytest.approx(0.8)}


def test_registered_as_a_method_with_the_released_defaults() -> None:
    method = get_method("training-free-vos")
    assert isinstance(method, TrainingFreeVosMethod)
    defaults = method.settings_class()
    assert (defaults.location_scale, defaults.time_factor, defaults.num_models) == (10.0, 0.33, 10)
    assert (defaults.em_max_iters, defaults.em_tol, defaults.outlier_margin) == (100, 1e-5, 1.0)
    assert (defaults.position_dim, defaults.window_height, defaults.window_width) == (64, 19, 39)
    config = RunConfig.from_dict({"method": {"name": "training-free-vos", "time_factor": 0.5}})
    assert config.method.settings == dataclasses.replace(defaults, time_factor=0.5)
    with pytest.raises(ConfigError, match="num_models"):
        RunConfig.from_dict({"method": {"name": "training-free-vos", "num_models": 0}})


def test_harness_run_with_random_conv_beats_copying_the_first_mask(synth_root: Path, tmp_path: Path) -> None:
    from harness.pipeline import run

    # random-conv's stride-4 layer: at short side 96 the stride-8 grid is too coarse for 10-pixel objects
    result = run(run_config(synth_root, tmp_path, "random-conv", **{"backbone.layer": 1}))
    assert result.metrics is not None
    ours = result.metrics["J&F-Mean"]
    baseline = static_baseline(synth_root, tmp_path / "static")
    assert ours > baseline + 0.15, (ours, baseline)
    assert 0.0 < result.method_metrics["tfvos_confident_fraction"] <= 1.0  # a share, averaged over sequences


def test_harness_run_with_the_tiny_xcit(synth_root: Path, tmp_path: Path) -> None:
    from harness.pipeline import run

    config = run_config(synth_root, tmp_path, "dino-xcits8-tiny", **{"dataset.sequences": RUN_SEQUENCES[:1]})
    result = run(config)
    assert result.metrics is not None and 0.0 <= result.metrics["J&F-Mean"] <= 1.0
    # a sweep over the method's settings reads the cached features: no extraction the second time
    other = {"method.time_factor": 0.5, "method.crf": False, "output_dir": str(tmp_path / "again")}
    again = run(config.with_overrides(other))
    assert again.cache_stats is not None and again.cache_stats.misses == 0 and again.cache_stats.hits > 0


def test_study_runs_the_published_system_first_and_sweeps_method_settings() -> None:
    from harness.published import PUBLISHED
    from harness.study.spec import load_study_spec

    spec = load_study_spec(Path(__file__).resolve().parents[1] / "studies" / "training_free_vos.yaml")
    assert (spec.dataset.root, spec.dataset.split) == ("data/DAVIS", "val")
    system = PUBLISHED["training-free-vos"]
    assert system.jf == 76.3 and system.weights == ("dino-xcits8",)
    first = RunConfig().with_overrides(spec.trial_overrides(spec.enqueue[0]))
    assert first == RunConfig().with_overrides(system.overrides)  # the default trial is the published system
    assert first.method.settings == TrainingFreeVosSettings()
    assert {name.split(".")[0] for name in spec.search_space} == {"method"}


def test_leaderboard_shows_the_published_number_only_beside_the_released_setting() -> None:
    """A trial of the study's search (settings other than the released ones) is not the published system."""
    from harness.published import PUBLISHED
    from harness.tracking.leaderboard import published_system_of
    from harness.tracking.names import flatten_settings

    system = PUBLISHED["training-free-vos"]
    every_setting = {f"method.{field.name}" for field in dataclasses.fields(TrainingFreeVosSettings)}
    assert every_setting - set(system.overrides) == {"method.chunk_size"}
    on_davis_val = {"dataset.root": "data/DAVIS", "dataset.split": "val"}

    def matched(**changes: object) -> str | None:
        config = RunConfig().with_overrides(on_davis_val | system.overrides | changes)
        found = published_system_of(flatten_settings(config.to_dict()), {}, PUBLISHED)
        return found.name if found else None

    assert matched() == "training-free-vos"
    assert matched(**{"method.chunk_size": 1024}) == "training-free-vos"  # memory only, same masks
    assert matched(**{"method.time_factor": 1.5}) is None
    assert matched(**{"method.crf": False}) is None
    assert matched(**{"method.num_models": 3}) is None
