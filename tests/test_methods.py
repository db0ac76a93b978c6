"""Methods and correspondence filters as plug-ins: registries, the one-file recipe, filters on both kernel
paths against the dense reference, and the sequence loop's filter plumbing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.errors import ConfigError, DataError
from harness.methods import _MODULES, available_methods, get_method
from harness.methods.labelprop import (
    PropagationSettings,
    PropagationWorkspace,
    QueryBlock,
    propagate_frame,
    propagate_sequence,
)
from harness.methods.labelprop import filters as filter_registry
from harness.methods.labelprop.filters import FilterContext, available_filters, get_filter, register_filter
from harness.methods.labelprop.reference import propagate_dense


def _whole_grid_keep(name: str, context: FilterContext, height: int, width: int) -> torch.Tensor:
    """The filter's keep-mask over the whole grid in the reference's (N*h*w keys, h*w queries) order."""
    block = QueryBlock((0, height), (0, width), (0, height), (0, width), windowed=False)
    keep = get_filter(name).keep(context, block)  # (h, w, N, hw)
    n_memory = keep.shape[2]
    return keep.permute(2, 0, 1, 3).reshape(n_memory * height * width, height * width)


def _random_case(seed: int, n_memory: int = 3, channels: int = 8, height: int = 9, width: int = 11):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(channels, height, width, generator=generator)
    memory = torch.randn(n_memory, channels, height, width, generator=generator)
    masks = torch.rand(n_memory, 3, height, width, generator=generator)
    # labels 0..2 in memory; the query also has label 3, which no key has: those queries keep everything
    memory_truth = torch.randint(0, 3, (height, width, n_memory), generator=generator)
    query_truth = torch.randint(0, 4, (height, width), generator=generator)
    return query, memory, masks, query_truth, memory_truth


# -- registries -------------------------------------------------------------------------------------------


def test_method_registry_knows_labelprop_and_names_unknown_ones() -> None:
    assert "labelprop" in available_methods()
    method = get_method("labelprop")
    assert method.name == "labelprop" and method.settings_class is PropagationSettings
    with pytest.raises(ConfigError, match="unknown method 'nope'; available: .*labelprop"):
        get_method("nope")


def test_filter_registry_and_unknown_filter() -> None:
    assert {"first-frame", "oracle"} <= set(available_filters())
    assert get_filter("first-frame").needs_ground_truth is False
    assert get_filter("oracle").needs_ground_truth is True
    with pytest.raises(ConfigError, match="unknown correspondence filter 'nope'"):
        get_filter("nope")
    with pytest.raises(ConfigError, match="unknown correspondence filter"):
        PropagationSettings(filter="nope")


# -- filters in the kernel against the dense reference ------------------------------------------------------


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("similarity", ["cosine", "l2"])
@pytest.mark.parametrize("radius", [0, 2, 4])
@pytest.mark.parametrize("name", ["first-frame", "oracle"])
def test_filter_on_both_kernel_paths_equals_the_dense_reference(
    name: str, radius: int, similarity: str, screen: bool
) -> None:
    query, memory, masks, query_truth, memory_truth = _random_case(radius + 10 * screen)
    n_memory, _, height, width = memory.shape
    context = FilterContext(
        frame=5, memory_frames=(0, 3, 4), query_truth=query_truth, memory_truth=memory_truth
    )
    keep = _whole_grid_keep(name, context, height, width)
    for topk in (1, 5, 1000):
        expected = propagate_dense(
            query, memory, masks, similarity=similarity, topk=topk, radius=radius, keep=keep
        )
        unfiltered = propagate_dense(query, memory, masks, similarity=similarity, topk=topk, radius=radius)
        workspace = PropagationWorkspace()
        got = propagate_frame(
            query,
            memory,
            masks,
            similarity=similarity,
            topk=topk,
            radius=radius,
            screen=screen,
            workspace=workspace,
            correspondence_filter=get_filter(name),
            filter_context=context,
        )
        assert (got - expected).abs().max().item() < 1e-5, topk
        assert (got - unfiltered).abs().max().item() > 1e-3  # the filter changed something
        if name == "oracle":  # queries labelled 3 have no agreeing key: they keep their window
            assert workspace.filtering.unfiltered_queries == int((query_truth == 3).sum())
        else:
            assert workspace.filtering.unfiltered_queries == 0
        assert workspace.filtering.queries == height * width


def test_a_query_without_kept_keys_keeps_its_unfiltered_window() -> None:
    query, memory, masks, _, memory_truth = _random_case(7)
    query_truth = torch.full(memory_truth.shape[:2], 3)  # no key agrees anywhere
    context = FilterContext(
        frame=5, memory_frames=(0, 3, 4), query_truth=query_truth, memory_truth=memory_truth
    )
    for screen in (False, True):
        workspace = PropagationWorkspace()
        got = propagate_frame(
            query,
            memory,
            masks,
            topk=5,
            radius=2,
            screen=screen,
            workspace=workspace,
            correspondence_filter=get_filter("oracle"),
            filter_context=context,
        )
        plain = propagate_frame(query, memory, masks, topk=5, radius=2, screen=screen)
        assert torch.equal(got, plain)
        assert not torch.isnan(got).any()
        assert workspace.filtering.unfiltered_queries == query_truth.numel()


def test_filter_needs_its_context() -> None:
    query, memory, masks, *_ = _random_case(1)
    with pytest.raises(ValueError, match="filter_context"):
        propagate_frame(query, memory, masks, correspondence_filter=get_filter("first-frame"))


# -- the sequence loop ------------------------------------------------------------------------------------


def _sequence_case(seed: int):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(6, 5, 4, 6, generator=generator)
    truth = [np.kron(torch.randint(0, 3, (4, 6), generator=generator).numpy(), np.ones((2, 2), np.int64))]
    truth += [np.kron(torch.randint(0, 3, (4, 6), generator=generator).numpy(), np.ones((2, 2), np.int64))]
    truth = [truth[t % 2] for t in range(6)]
    return features, truth


@pytest.mark.parametrize("screen", [False, True])
def test_first_frame_filter_in_a_sequence_equals_a_memory_of_the_first_frame_only(screen: bool) -> None:
    """Every window reaches frame 0, so keeping only frame-0 keys is a memory without previous frames."""
    features, truth = _sequence_case(3)
    settings = PropagationSettings(topk=3, radius=1, n_last_frames=3)

    def labels(settings: PropagationSettings) -> list[np.ndarray]:
        frames = propagate_sequence(
            features, truth[0], 3, settings, input_size=(8, 12), output_size=(8, 12), screen=screen
        )
        return [labels for _, labels in frames]

    filtered = labels(PropagationSettings(topk=3, radius=1, n_last_frames=3, filter="first-frame"))
    first_only = labels(PropagationSettings(topk=3, radius=1, n_last_frames=0))
    with_memory = labels(settings)
    for a, b in zip(filtered, first_only, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(filtered, with_memory, strict=True))


def test_sequence_feeds_ground_truth_to_the_filter_per_slot() -> None:
    """The filter context follows the memory's slots: which frame each slot holds and its ground truth,
    and the query frame's ground truth, all on the feature grid."""
    features, truth = _sequence_case(5)
    calls: list[FilterContext] = []

    @register_filter("test-recording")
    class Recording:
        needs_ground_truth = True

        def keep(self, context: FilterContext, block: QueryBlock) -> torch.Tensor:
            calls.append(context)
            return get_filter("oracle").keep(context, block)

    try:
        settings = PropagationSettings(topk=2, radius=1, n_last_frames=2, filter="test-recording")
        list(
            propagate_sequence(
                features,
                truth[0],
                3,
                settings,
                input_size=(8, 12),
                output_size=(8, 12),
                ground_truth=lambda t: truth[t],
                screen=False,
            )
        )
    finally:
        filter_registry._FILTERS.pop("test-recording")
    frames = {context.frame: context for context in calls}
    assert sorted(frames) == [1, 2, 3, 4, 5]
    assert frames[1].memory_frames == (0,)
    assert sorted(frames[5].memory_frames) == [0, 3, 4]
    small = {t: torch.from_numpy(truth[t][::2, ::2].astype(np.int64)) for t in range(6)}
    for t, context in frames.items():
        assert torch.equal(context.query_truth, small[t])
        for slot, frame in enumerate(context.memory_frames):
            assert torch.equal(context.memory_truth[:, :, slot], small[frame])


def test_filter_that_needs_ground_truth_fails_clearly_without_it() -> None:
    features, truth = _sequence_case(1)
    settings = PropagationSettings(filter="oracle")
    with pytest.raises(DataError, match="needs the ground truth"):
        propagate_sequence(features, truth[0], 3, settings, input_size=(8, 12), output_size=(8, 12))


# -- the one-file recipe: a toy method through `harness run` ------------------------------------------------

TOY_METHOD = textwrap.dedent(
    '''
    from dataclasses import dataclass

    import numpy as np

    from harness.methods import register_method


    @dataclass(frozen=True)
    class StaticSettings:
        label_shift: int = 0


    @register_method("toy-static")
    class StaticMethod:
        """Copies the first-frame mask to every frame."""

        settings_class = StaticSettings

        def segment_sequence(self, ctx, settings):
            ctx.metrics["toy_feature_channels"] = float(ctx.features(ctx.num_frames - 1).shape[0])
            for t in range(1, ctx.num_frames):
                yield t, ctx.first_labels.astype(np.uint8) + settings.label_shift
    '''
)


def test_a_new_method_is_one_file_and_one_registry_line(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "toy_static_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_MODULES, "toy-static", "toy_static_method")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        f"dataset: {{root: {synth_root}, sequences: [synth-occlusion]}}\n"
        f"input: {{short_side: 64}}\nmethod: {{name: toy-static}}\n"
        f"cache: {{dir: {tmp_path / 'cache'}}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    assert main(["run", "--config", str(config_path), "--quiet", "--set", "method.label_shift=0"]) == 0
    assert "J&F-Mean" in capsys.readouterr().out
    written = sorted((tmp_path / "run" / "predictions" / "synth-occlusion").glob("*.png"))
    assert len(written) > 2
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: toy-static" in resolved and "label_shift: 0" in resolved
    assert main(["run", "--config", str(config_path), "--quiet", "--set", "method.topk=3"]) == 2
    assert "method.topk for method 'toy-static'" in capsys.readouterr().err


def test_method_metrics_reach_the_sequence_outcome(synth_root: Path, tmp_path: Path) -> None:
    from harness.config import RunConfig
    from harness.pipeline import run

    config = RunConfig().with_overrides(
        {
            "dataset.root": str(synth_root),
            "dataset.sequences": ["synth-occlusion"],
            "input.short_side": 64,
            "method.radius": 3,
            "method.filter": "first-frame",
            "cache.dir": str(tmp_path / "cache"),
            "output_dir": str(tmp_path / "run"),
            "progress": False,
        }
    )
    result = run(config)
    (outcome,) = result.sequences
    assert outcome.metrics["filter_queries"] > 0
    assert outcome.metrics["filter_unfiltered_queries"] == 0


def test_oracle_keeps_pairs_whose_labels_agree_by_hand() -> None:
    """Released rule (label_propagation_oracle): keep key-query pairs with equal ground truth. A 1 x 3 grid,
    one memory frame: query 0 (background) keeps keys 0 and 2, query 1 (object) keeps key 1 only."""
    truth = torch.tensor([[0, 1, 0]])
    context = FilterContext(frame=1, memory_frames=(0,), query_truth=truth, memory_truth=truth[..., None])
    keep = _whole_grid_keep("oracle", context, 1, 3)  # (3 keys, 3 queries)
    assert keep.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_oracle_run_on_the_synthetic_set_and_its_error_without_ground_truth(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        f"dataset: {{root: {synth_root}, sequences: [synth-occlusion]}}\n"
        f"input: {{short_side: 64}}\nmethod: {{radius: 4, n_last_frames: 3}}\n"
        f"cache: {{dir: {tmp_path / 'cache'}}}\noutput_dir: {tmp_path / 'run'}\nprogress: false\n"
    )
    from harness.config import RunConfig
    from harness.pipeline import run

    plain = run(RunConfig.from_yaml(config_path))
    oracle = run(RunConfig.from_yaml(config_path).with_overrides({"method.filter": "oracle"}))
    assert oracle.metrics is not None and plain.metrics is not None
    # the oracle only removes wrong correspondences: on this sequence it must not score lower
    assert oracle.metrics["J&F-Mean"] >= plain.metrics["J&F-Mean"]
    assert oracle.metrics["filter_queries"] > 0
    assert "filter_unfiltered_queries" in oracle.metrics
    test_dev = ["run", "--config", str(config_path), "--quiet", "--set", "method.filter=oracle"]
    assert main([*test_dev, "--set", "dataset.split=test-dev", "--set", "dataset.sequences=null"]) == 2
    assert "needs the ground truth" in capsys.readouterr().err
