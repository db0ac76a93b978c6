"""Tests of the bfloat16 screening in harness.methods.labelprop: the bound, the candidates, and that the
screened path gives the float32 path's result (fallbacks, worker threads and the sequence loop included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.methods.labelprop import (
    PropagationSettings,
    PropagationWorkspace,
    affinity,
    propagate_frame,
    propagate_prepared,
    propagate_sequence,
    unit_memory,
    unit_query,
)
from harness.methods.labelprop.screening import (
    FALLBACK_PATIENCE,
    ScreeningStats,
    candidate_keys,
    screening_available,
    screening_thresholds,
)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(rows, dim=1)


def _adversarial_keys(query: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Key sets where rounding matters most: near-duplicates of the query (similarities near 1, many
    within a bfloat16 rounding of each other), near-opposites, a few large coordinates, plain noise."""
    n_keys, channels = 4000, query.shape[0]
    noise = torch.randn(n_keys, channels, generator=generator)
    spiky = torch.zeros(n_keys, channels)
    spikes = min(4, channels)
    spiky[:, :spikes] = torch.randn(n_keys, spikes, generator=generator)
    spiky += 1e-3 * noise
    return {
        "random": _unit(noise),
        "near-duplicates": _unit(query[None] + 0.02 * noise),
        "near-opposites": _unit(-query[None] + 0.05 * noise),
        "mixed": _unit(torch.cat([query[None] + 0.01 * noise[:100], noise[100:]])),
        "spiky": _unit(spiky),
    }


@pytest.mark.parametrize("channels", [3, 64, 512])
@pytest.mark.parametrize("topk", [1, 15])
def test_thresholds_keep_every_key_of_the_exact_top_k(channels: int, topk: int) -> None:
    """For each adversarial key set: every key whose float32 similarity reaches the float32 k-th (the top
    k and its ties) has a bfloat16 similarity at or above the threshold, while the threshold still
    excludes most keys of plain noise (it is a bound, not -inf)."""
    generator = torch.Generator().manual_seed(channels + topk)
    queries = _unit(torch.randn(8, channels, generator=generator))
    excluded_noise = []
    for q_index in range(queries.shape[0]):
        query = queries[q_index]
        for name, keys in _adversarial_keys(query, generator).items():
            exact = keys @ query  # what the float32 path multiplies
            approx = (keys.to(torch.bfloat16) @ query.to(torch.bfloat16)).to(torch.float32)
            rounding = (query - query.to(torch.bfloat16).to(torch.float32)).norm().reshape(1, 1)
            approx_kth = torch.topk(approx, topk).values[-1].reshape(1, 1)
            threshold = screening_thresholds(approx_kth, rounding, channels, temperature=0.2)[0, 0]
            exact_kth = torch.topk(exact, topk).values[-1]
            needed = exact >= exact_kth
            assert bool((approx[needed] >= threshold).all()), (name, q_index)
            if name == "random":
                excluded_noise.append(float((approx < threshold).float().mean()))
    assert min(excluded_noise) > 0.5


def test_thresholds_follow_the_temperature_tie_slack_and_reject_nothing_finite_below_bound() -> None:
    kth = torch.tensor([[0.5], [-0.5], [0.0]])
    rounding = torch.full((3, 1), 1e-3)
    cold = screening_thresholds(kth, rounding, 64, temperature=0.1)
    hot = screening_thresholds(kth, rounding, 64, temperature=1000.0)
    assert bool((cold < kth).all()) and bool((hot < cold).all())
    # the margin grows with the query's rounding error
    rough = screening_thresholds(kth, torch.full((3, 1), 4e-3), 64, temperature=0.1)
    assert bool((rough < cold).all())


def test_candidates_when_the_top_keys_share_one_group() -> None:
    """The k-th is bounded from the maxima of key groups (one column and frame across key rows). If the
    top k all sit in one group, the bound is loose, but every top key must still be a candidate."""
    key_rows, group, n_queries = 6, 10, 8
    generator = torch.Generator().manual_seed(3)
    approx = torch.rand(key_rows * group, n_queries, generator=generator) * 0.1
    approx.view(key_rows, group, n_queries)[:, 4] = 0.9 + 0.01 * torch.arange(key_rows)[:, None]
    approx = approx.to(torch.bfloat16)
    rounding = torch.zeros(1, n_queries)
    out = torch.empty(approx.shape, dtype=torch.bool)
    candidates, used = candidate_keys(approx, key_rows, rounding, 16, 5, 0.2, out)
    top = torch.topk(approx.float(), 5, dim=0).indices  # (5, Q)
    for q in range(n_queries):
        assert bool(candidates[top[:, q], q].all())
    assert torch.equal(used, torch.nonzero(candidates.any(dim=1)).squeeze(1))
    # -inf keys (outside every window) are never candidates, even for a query with fewer than k finite keys
    approx[:, 0] = float("-inf")
    approx[3, 0] = 0.2
    candidates, _ = candidate_keys(approx, key_rows, rounding, 16, 5, 0.2, out)
    assert torch.equal(torch.nonzero(candidates[:, 0]).squeeze(1), torch.tensor([3]))


def _inputs(seed: int, n_memory: int, channels: int, height: int, width: int, smooth: bool):
    generator = torch.Generator().manual_seed(seed)
    shape = (channels, height, width)
    if smooth:  # video-like: frames share a scene, neighbours are alike (many keys close to the k-th)
        scene = torch.randn(shape, generator=generator)
        query = scene + 0.1 * torch.randn(shape, generator=generator)
        frames = [scene + 0.1 * torch.randn(shape, generator=generator) for _ in range(n_memory)]
        memory_feats = torch.stack(frames)
    else:
        query = torch.randn(shape, generator=generator)
        memory_feats = torch.randn((n_memory, *shape), generator=generator)
    masks = torch.rand((n_memory, 3, height, width), generator=generator)
    return query, memory_feats, masks


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
@pytest.mark.parametrize(("radius", "topk"), [(0, 5), (2, 1), (3, 15), (6, 40), (30, 7)])
@pytest.mark.parametrize("smooth", [False, True])
def test_screened_equals_float32(similarity: str, radius: int, topk: int, smooth: bool) -> None:
    query, memory_feats, masks = _inputs(radius + topk, 4, 48, 17, 23, smooth)
    kwargs = dict(similarity=similarity, temperature=0.1, topk=topk, radius=radius)
    exact = propagate_frame(query, memory_feats, masks, screen=False, **kwargs)
    workspace = PropagationWorkspace()
    screened = propagate_frame(query, memory_feats, masks, screen=True, workspace=workspace, **kwargs)
    assert workspace.screening.blocks > 0  # the screened path ran
    assert torch.allclose(screened, exact, atol=2e-6, rtol=0)


def test_every_block_falling_back_gives_the_same_result_and_stops_screening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no candidates allowed every block is recomputed in float32; after FALLBACK_PATIENCE such blocks
    the workspace stops screening by default (an explicit screen=True still screens)."""
    query, memory_feats, masks = _inputs(5, 3, 16, 20, 20, smooth=True)
    kwargs = dict(similarity="cosine", temperature=0.2, topk=5, radius=3)
    exact = propagate_frame(query, memory_feats, masks, screen=False, **kwargs)
    monkeypatch.setattr(affinity, "MAX_CANDIDATE_FRACTION", 0.0)
    workspace = PropagationWorkspace()
    fell_back = propagate_frame(query, memory_feats, masks, screen=True, workspace=workspace, **kwargs)
    assert torch.equal(fell_back, exact)
    stats = workspace.screening
    assert stats.blocks == stats.fallbacks > 0
    while stats.blocks < FALLBACK_PATIENCE:
        propagate_frame(query, memory_feats, masks, screen=True, workspace=workspace, **kwargs)
    assert not stats.worthwhile
    monkeypatch.setattr(affinity, "screening_available", lambda device: True)
    assert not affinity.uses_screening(None, "cosine", torch.device("cpu"), workspace)
    assert affinity.uses_screening(True, "cosine", torch.device("cpu"), workspace)
    assert affinity.uses_screening(None, "cosine", torch.device("cpu"), PropagationWorkspace())
    assert not affinity.uses_screening(True, "l1", torch.device("cpu"), PropagationWorkspace())


def test_screening_stats_patience() -> None:
    stats = ScreeningStats()
    for _ in range(FALLBACK_PATIENCE - 1):
        stats.record(fell_back=True)
    assert stats.worthwhile  # too few blocks to judge
    stats.record(fell_back=True)
    assert not stats.worthwhile
    for _ in range(FALLBACK_PATIENCE):
        stats.record(fell_back=False)
    assert stats.worthwhile  # half or fewer fell back


def test_worker_threads_give_the_serial_result_and_restore_the_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    query, memory_feats, masks = _inputs(9, 3, 32, 24, 40, smooth=True)
    prepared = (
        unit_query(query),
        unit_memory(memory_feats),
        masks.permute(2, 3, 0, 1).contiguous(),
    )
    kwargs = dict(similarity="cosine", temperature=0.2, topk=10, radius=4, tile=(4, 4), screen=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert affinity._cpu_workers(torch.device("cpu"), 10) == 2
        threaded = propagate_prepared(*prepared, **kwargs)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(affinity, "_cpu_workers", lambda device, n_strips: 1)
        serial = propagate_prepared(*prepared, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(threaded, serial)
    assert affinity._cpu_workers(torch.device("meta"), 10) == 1


def test_screening_available_only_on_cpus() -> None:
    assert screening_available(torch.device("meta")) is False
    expected = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert screening_available(torch.device("cpu")) is expected


@pytest.mark.parametrize("n_last_frames", [0, 3])
def test_sequence_with_and_without_screening(n_last_frames: int) -> None:
    """The sequence loop keeps a bfloat16 copy of its ring buffer when it screens; the labels it writes are
    those of the float32 loop, and the workspace passed in holds the screening statistics."""
    generator = torch.Generator().manual_seed(4)
    scene = torch.randn(24, 15, 18, generator=generator)
    frames = [scene + 0.2 * torch.randn(scene.shape, generator=generator) for _ in range(7)]
    first_labels = np.zeros((30, 36), dtype=np.uint8)
    first_labels[5:20, 4:15] = 1
    first_labels[18:28, 20:34] = 2
    settings = PropagationSettings(topk=5, radius=4, n_last_frames=n_last_frames)

    def labels(screen: bool) -> tuple[list[np.ndarray], PropagationWorkspace]:
        workspace = PropagationWorkspace()
        run = propagate_sequence(
            frames,
            first_labels,
            3,
            settings,
            input_size=(30, 36),
            output_size=(30, 36),
            screen=screen,
            workspace=workspace,
        )
        return [mask for _, mask in run], workspace

    (screened, workspace), (exact, float32_workspace) = labels(True), labels(False)
    assert len(screened) == len(exact) == 6
    for got, expected in zip(screened, exact, strict=True):
        assert np.array_equal(got, expected)
    summary = workspace.screening.summary()
    assert summary["blocks"] > 0
    assert 0.0 < summary["candidate_fraction_min"] <= summary["candidate_fraction_mean"]
    assert summary["candidate_fraction_mean"] <= summary["candidate_fraction_max"] <= 1.0
    assert float32_workspace.screening.summary()["candidate_fraction_mean"] is None
