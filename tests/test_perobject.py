"""Per-object propagation (logit aggregation), the per-object oracle and the correspondence diagnostics,
against hand-computed cases and a dense brute force built on reference.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.config import RunConfig
from harness.errors import ConfigError
from harness.methods.base import aggregate_sequence_metrics
from harness.methods.labelprop import PropagationSettings, PropagationWorkspace, propagate_sequence
from harness.methods.labelprop.diagnostics import CorrespondenceStats
from harness.methods.labelprop.per_object import (
    aggregate_labels,
    aggregate_logits,
    object_probability,
    propagate_per_object,
)
from harness.methods.labelprop.reference import dense_weights
from harness.pipeline import run

# -- aggregation by hand ----------------------------------------------------------------------------------


def _logit(p: float) -> float:
    """log(p / (1 - p)) in float32, as the released code computes it (1 - 1e-7 rounds to 1 - 2^-23)."""
    value = np.float32(p)
    return float(np.log(value / (np.float32(1) - value)))


def test_aggregate_logits_by_hand() -> None:
    """Two objects, three pixels: p = (0.9, 0.5), (0.2, 0.3), (0, 0) (clamped to 1e-7)."""
    p = torch.tensor([[[0.9, 0.2, 0.0]], [[0.5, 0.3, 0.0]]])
    logits = aggregate_logits(p)
    expected = [
        [_logit(0.1 * 0.5), _logit(0.8 * 0.7), _logit(1 - 1e-7)],
        [_logit(0.9), _logit(0.2), _logit(1e-7)],
        [_logit(0.5), _logit(0.3), _logit(1e-7)],
    ]
    np.testing.assert_allclose(logits[:, 0].numpy(), np.array(expected), rtol=1e-4, atol=1e-4)
    # background wins where both are unlikely, object 1 where it is likely
    assert aggregate_labels(p)[0].tolist() == [1, 0, 0]


def test_the_clamp_makes_near_certain_objects_tie_and_the_first_wins() -> None:
    """float32 1 - 2^-23 and 1 - 2^-24 both clamp to 1 - 1e-7: a tie that object 1 wins, though
    object 2's probability is larger (without the clamp object 2 would win)."""
    p = torch.tensor([[[1 - 2**-23]], [[1 - 2**-24]]], dtype=torch.float32)
    assert p[1, 0, 0] > p[0, 0, 0]
    assert aggregate_labels(p).item() == 1
    p_small = torch.tensor([[[0.6]], [[0.7]]])
    assert aggregate_labels(p_small).item() == 2  # no clamp involved: the larger one wins


def test_a_nan_probability_is_background_as_the_released_argmax_gives() -> None:
    p = torch.tensor([[[0.9, float("nan")]], [[0.1, 0.95]]])
    assert aggregate_labels(p)[0].tolist() == [1, 0]


def test_object_probability_upsamples_then_normalises_by_hand() -> None:
    fg = torch.tensor([[0.2, 0.6]])
    # (1, 2) -> (1, 4) bilinear, align_corners=False: 0.2, 0.3, 0.5, 0.6; min-max: 0, 0.25, 0.75, 1
    np.testing.assert_allclose(object_probability(fg, (1, 4)).numpy(), [[0.0, 0.25, 0.75, 1.0]], atol=1e-6)
    zero = torch.zeros(1, 2)
    assert torch.equal(object_probability(zero, (1, 4)), torch.zeros(1, 4))  # max 0: left alone
    assert torch.isnan(object_probability(torch.full((1, 2), 0.5), (1, 4))).all()  # released 0/0


# -- per-object propagation and diagnostics against a dense brute force ------------------------------------

HEIGHT, WIDTH, FRAMES, OBJECTS = 4, 6, 6, 2
SIZE = (2 * HEIGHT, 2 * WIDTH)  # input and output size; labels are 2 x 2 blocks


def _case(seed: int):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(FRAMES, 5, HEIGHT, WIDTH, generator=generator)
    grid = torch.randint(0, OBJECTS + 1, (FRAMES, HEIGHT, WIDTH), generator=generator)
    grid[:, 0, 0] = 1  # every object is in every frame
    grid[:, 0, 1] = 2
    full = [np.kron(grid[t].numpy(), np.ones((2, 2), np.int64)) for t in range(FRAMES)]
    return features, grid, full


def _brute_stats(weights: torch.Tensor, key_labels: torch.Tensor, query_labels: torch.Tensor, k: int):
    """(precision sum, queries, fg->bg sum, fg queries, bg->fg sum, bg queries) by counting per query."""
    sums = [0.0] * 6
    for q in range(query_labels.numel()):
        share = sum(float(weights[j, q]) for j in range(key_labels.numel()) if int(key_labels[j]) == k)
        fg = int(query_labels[q]) == k
        sums[0] += share if fg else 1 - share
        sums[1] += 1
        if fg:
            sums[2], sums[3] = sums[2] + 1 - share, sums[3] + 1
        else:
            sums[4], sums[5] = sums[4] + share, sums[5] + 1
    return sums


def _metrics_of(sums: list[float]) -> dict[str, float]:
    names = ("corr_precision", "corr_fg_to_bg", "corr_bg_to_fg")
    return {name: sums[2 * i] / sums[2 * i + 1] for i, name in enumerate(names) if sums[2 * i + 1] > 0}


def _dense_run(features, grid, settings: PropagationSettings, per_object: bool, oracle: bool):
    """Labels per frame and per-object diagnostics, the released way, densely (float64)."""
    n_last = settings.n_last_frames
    tracks = [(k,) for k in range(1, OBJECTS + 1)] if per_object else [tuple(range(1, OBJECTS + 1))]
    sums = {k: [0.0] * 6 for k in range(1, OBJECTS + 1)}
    outputs = []
    for objects in tracks:
        if per_object:
            (k,) = objects
            first = torch.stack([grid[0] == 0, grid[0] == k]).double()
        else:
            first = torch.nn.functional.one_hot(grid[0], OBJECTS + 1).permute(2, 0, 1).double()
        memory = [(0, first)]
        soft_frames = []
        for t in range(1, FRAMES):
            frames = [0] + [f for f, _ in memory[1:]]
            masks = torch.stack([m for _, m in memory])
            keep = None
            if oracle:
                assert per_object
                key_fg = torch.cat([(grid[f] == objects[0]).flatten() for f in frames])
                keep = key_fg[:, None] == (grid[t] == objects[0]).flatten()[None, :]
            weights = dense_weights(
                features[t],
                features[frames],
                topk=settings.topk,
                radius=settings.radius,
                keep=keep,
            )
            soft = (masks.permute(1, 0, 2, 3).reshape(masks.shape[1], -1) @ weights).reshape(
                -1, HEIGHT, WIDTH
            )
            key_labels = torch.cat([grid[f].flatten() for f in frames])
            for k in objects:
                for i, value in enumerate(_brute_stats(weights, key_labels, grid[t].flatten(), k)):
                    sums[k][i] += value
            soft_frames.append(soft)
            if n_last > 0 and t < FRAMES - 1:
                memory = (
                    [memory[0], *memory[1:][-(n_last - 1) :], (t, soft)]
                    if n_last > 1
                    else [memory[0], (t, soft)]
                )
        outputs.append(soft_frames)
    return outputs, {k: _metrics_of(s) for k, s in sums.items()}


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("oracle", [False, True])
@pytest.mark.parametrize("same_features", [False, True])
def test_per_object_run_equals_the_dense_released_loop(
    screen: bool, oracle: bool, same_features: bool
) -> None:
    """Object by object, or (same features, no ground-truth filter) all objects in one pass: the released
    per-object loop's labels and the brute-force diagnostics either way."""
    features, grid, full = _case(3 + 2 * oracle + screen)
    settings = PropagationSettings(
        topk=4, radius=2, n_last_frames=2, per_object=True, filter="oracle" if oracle else None
    )
    stats = CorrespondenceStats()
    workspace = PropagationWorkspace()
    got = list(
        propagate_per_object(
            lambda _: features,
            full[0],
            OBJECTS + 1,
            settings,
            input_size=SIZE,
            output_size=SIZE,
            ground_truth=lambda t: full[t],
            diagnostics=stats,
            screen=screen,
            workspace=workspace,
            same_features=same_features,
        )
    )
    outputs, expected_stats = _dense_run(features, grid, settings, per_object=True, oracle=oracle)
    for t, labels in got:
        probabilities = torch.stack(
            [object_probability(frames[t - 1][1].float(), SIZE) for frames in outputs]
        )
        np.testing.assert_array_equal(labels, aggregate_labels(probabilities).numpy(), err_msg=f"frame {t}")
    assert [t for t, _ in got] == list(range(1, FRAMES))
    for k, metrics in stats.per_object().items():
        assert metrics == pytest.approx(expected_stats[k], abs=1e-5), k
    if oracle:  # every object's filter ran on every frame's queries, one object at a time
        assert workspace.filtering.queries == OBJECTS * (FRAMES - 1) * HEIGHT * WIDTH
        # no query was left without an agreeing key in its window, so all weight goes to agreeing keys
        assert workspace.filtering.unfiltered_queries == 0
        assert all(m["corr_precision"] == pytest.approx(1.0) for m in stats.per_object().values())


@pytest.mark.parametrize("screen", [False, True])
def test_joint_diagnostics_equal_a_brute_force_count(screen: bool) -> None:
    features, grid, full = _case(11 + screen)
    settings = PropagationSettings(topk=5, radius=1, n_last_frames=3)
    stats = CorrespondenceStats()
    joint = list(
        propagate_sequence(
            features,
            full[0],
            OBJECTS + 1,
            settings,
            input_size=SIZE,
            output_size=SIZE,
            ground_truth=lambda t: full[t],
            diagnostics=stats,
            screen=screen,
        )
    )
    _, expected = _dense_run(features, grid, settings, per_object=False, oracle=False)
    for k, metrics in stats.per_object().items():
        assert metrics == pytest.approx(expected[k], abs=1e-5), k
    sequence = stats.metrics()
    for name in ("corr_precision", "corr_fg_to_bg", "corr_bg_to_fg"):
        assert sequence[name] == pytest.approx(np.mean([expected[k][name] for k in expected]), abs=1e-5)
    # the diagnostics ride along: the labels are those of a run without them
    plain = propagate_sequence(
        features, full[0], OBJECTS + 1, settings, input_size=SIZE, output_size=SIZE, screen=screen
    )
    for (_, a), (_, b) in zip(joint, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_first_frame_filter_also_runs_all_objects_in_one_pass() -> None:
    """A filter that reads no ground truth treats every object alike: one pass equals object by object."""
    features, _, full = _case(8)
    settings = PropagationSettings(topk=3, radius=1, n_last_frames=2, per_object=True, filter="first-frame")
    runs = {}
    for same in (False, True):
        stats, workspace = CorrespondenceStats(), PropagationWorkspace()
        labels = propagate_per_object(
            lambda _: features,
            full[0],
            OBJECTS + 1,
            settings,
            input_size=SIZE,
            output_size=SIZE,
            ground_truth=lambda t: full[t],
            diagnostics=stats,
            workspace=workspace,
            same_features=same,
        )
        runs[same] = ([frame for _, frame in labels], stats.per_object(), workspace.filtering.queries)
    for a, b in zip(runs[False][0], runs[True][0], strict=True):
        np.testing.assert_array_equal(a, b)
    for k in range(1, OBJECTS + 1):
        assert runs[True][1][k] == pytest.approx(runs[False][1][k], abs=1e-6)
    assert runs[False][2] == OBJECTS * runs[True][2]  # K propagations against one


def test_features_for_object_are_used_per_object() -> None:
    """The hook for per-object features: object k's propagation reads only features_for_object(k)."""
    features, _, full = _case(5)
    asked: list[int] = []

    def features_for_object(k: int) -> torch.Tensor:
        asked.append(k)
        return features if k == 1 else features.flip(0)

    settings = PropagationSettings(topk=3, radius=1, n_last_frames=1)
    per_object = list(
        propagate_per_object(
            features_for_object, full[0], OBJECTS + 1, settings, input_size=SIZE, output_size=SIZE
        )
    )
    shared = list(
        propagate_per_object(
            lambda _: features, full[0], OBJECTS + 1, settings, input_size=SIZE, output_size=SIZE
        )
    )
    assert asked == [1, 2]
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(per_object, shared, strict=True))


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="per_object must be true or false"):
        PropagationSettings(per_object="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="diagnostics must be true or false"):
        PropagationSettings(diagnostics=1)  # type: ignore[arg-type]


def test_rates_are_averaged_over_sequences_and_counts_summed() -> None:
    per_sequence = [
        {"corr_precision": 0.5, "filter_queries": 10.0},
        {"corr_precision": 0.9, "filter_queries": 5.0},
        {"filter_queries": 1.0},
    ]
    assert aggregate_sequence_metrics(per_sequence) == {
        "corr_precision": pytest.approx(0.7),
        "filter_queries": 16.0,
    }


# -- end to end ------------------------------------------------------------------------------------------


def _config(synth_root: Path, tmp_path: Path, **overrides: object) -> RunConfig:
    return RunConfig().with_overrides(
        {
            "dataset.root": str(synth_root),
            "dataset.sequences": ["synth-occlusion", "synth-crossing"],
            "input.short_side": 64,
            "method.radius": 4,
            "method.n_last_frames": 3,
            "cache.dir": str(tmp_path / "cache"),
            "output_dir": str(tmp_path / "run"),
            "progress": False,
            **overrides,
        }
    )


def test_per_object_runs_end_to_end_with_diagnostics(synth_root: Path, tmp_path: Path) -> None:
    joint = run(_config(synth_root, tmp_path))
    per_object = run(_config(synth_root, tmp_path, **{"method.per_object": True}))
    oracle = run(_config(synth_root, tmp_path, **{"method.per_object": True, "method.filter": "oracle"}))
    for result in (joint, per_object, oracle):
        assert result.metrics is not None and 0 < result.metrics["J&F-Mean"] <= 1
        values = [o.metrics["corr_precision"] for o in result.sequences]
        assert result.metrics["corr_precision"] == pytest.approx(np.mean(values))  # a mean, not a sum
        assert all(0 <= o.metrics["corr_fg_to_bg"] <= 1 for o in result.sequences)
    # with the same features per object and no filter, both modes see the same weights
    assert per_object.metrics["corr_precision"] == pytest.approx(joint.metrics["corr_precision"], abs=1e-6)
    assert oracle.metrics["corr_precision"] > per_object.metrics["corr_precision"]
    assert oracle.metrics["filter_queries"] > 0
    off = run(_config(synth_root, tmp_path, **{"method.per_object": True, "method.diagnostics": False}))
    assert all("corr_precision" not in o.metrics for o in off.sequences)


def test_per_object_on_test_dev(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(
        synth_root,
        tmp_path,
        **{"method.per_object": True, "dataset.split": "test-dev", "dataset.sequences": None},
    )
    result = run(config)
    assert result.submission_zip is not None and result.submission_zip.exists()
    assert all("corr_precision" not in o.metrics for o in result.sequences)  # no ground truth, no diagnostics
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        f"dataset: {{root: {synth_root}, split: test-dev}}\ninput: {{short_side: 64}}\n"
        f"method: {{per_object: true, filter: oracle}}\ncache: {{dir: {tmp_path / 'cache'}}}\n"
        f"output_dir: {tmp_path / 'run2'}\n"
    )
    assert main(["run", "--config", str(config_path), "--quiet"]) == 2
    assert "needs the ground truth" in capsys.readouterr().err


def test_harness_run_cli_with_the_per_object_oracle(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        f"dataset: {{root: {synth_root}, sequences: [synth-crossing]}}\ninput: {{short_side: 64}}\n"
        f"method: {{radius: 4, n_last_frames: 3}}\ncache: {{dir: {tmp_path / 'cache'}}}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    settings = ["--set", "method.per_object=true", "--set", "method.filter=oracle"]
    assert main(["run", "--config", str(config_path), "--quiet", *settings]) == 0
    assert "J&F-Mean" in capsys.readouterr().out
    written = sorted((tmp_path / "run" / "predictions" / "synth-crossing").glob("*.png"))
    assert len(written) > 2
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "per_object: true" in resolved and "filter: oracle" in resolved
