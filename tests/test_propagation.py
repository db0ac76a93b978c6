"""Tests of harness.methods.labelprop, checked against its dense reference.py: windowed top-k label
propagation and the sequence memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.errors import ConfigError, DataError
from harness.methods.labelprop import (
    PropagationSettings,
    labels_to_onehot,
    plan_blocks,
    propagate_frame,
    propagate_prepared,
    propagate_sequence,
    resize_labels_nearest,
    soft_to_labels,
    unit_memory,
    unit_query,
)
from harness.methods.labelprop.reference import propagate_dense as dense_reference

REPO = Path(__file__).resolve().parents[1]


def random_inputs(seed: int, n_memory: int, channels: int, height: int, width: int, n_classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(channels, height, width, generator=generator)
    memory = torch.randn(n_memory, channels, height, width, generator=generator)
    masks = torch.rand(n_memory, n_classes, height, width, generator=generator)
    return query, memory, masks


# -- propagate_frame against the reference ------------------------------------------------------------------

SHAPES = [  # (N, C, h, w)
    (1, 8, 7, 9),
    (3, 16, 12, 10),
    (2, 5, 3, 4),  # smaller than most windows
]


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("similarity", ["cosine", "l2", "l1"])
@pytest.mark.parametrize("radius", [0, 1, 3, 20])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense_reference(
    similarity: str, radius: int, shape: tuple[int, int, int, int], screen: bool
) -> None:
    """Both paths (float32 products, bfloat16 screening; l1 has no screening and always takes the first)."""
    n_memory, channels, height, width = shape
    seed = 100 * radius + 10 * SHAPES.index(shape) + ["cosine", "l2", "l1"].index(similarity)
    query, memory, masks = random_inputs(seed, *shape)
    for topk in (1, 4, 15, 10_000):  # 10_000 exceeds the number of keys (and of valid keys in a window)
        expected = dense_reference(
            query, memory, masks, similarity=similarity, temperature=0.2, topk=topk, radius=radius
        )
        got = propagate_frame(
            query,
            memory,
            masks,
            similarity=similarity,
            temperature=0.2,
            topk=topk,
            radius=radius,
            screen=screen,
        )
        assert got.shape == (masks.shape[1], height, width)
        assert got.dtype == torch.float32
        assert (got - expected).abs().max().item() < 1e-5, (topk, radius)


def _prepared(query, memory, masks, **kwargs) -> torch.Tensor:
    soft = propagate_prepared(
        unit_query(query), unit_memory(memory), masks.permute(2, 3, 0, 1).contiguous(), **kwargs
    )
    return soft.permute(2, 0, 1)


@pytest.mark.parametrize("similarity", ["cosine", "l2", "l1"])
@pytest.mark.parametrize(
    ("tile", "rows_per_product"), [((1, 1), None), ((2, 3), 1), ((5, 2), 2), ((5, 2), None), ((4, 3), 100)]
)
def test_blocks_and_product_grouping_do_not_change_the_result(
    similarity: str, tile: tuple[int, int], rows_per_product: int | None
) -> None:
    """Odd blocks; key rows multiplied one at a time (exact window rows), in pairs, or all at once."""
    query, memory, masks = random_inputs(7, 3, 6, 9, 11, n_classes=4)
    expected = dense_reference(query, memory, masks, similarity=similarity, topk=5, radius=2)
    got = _prepared(
        query,
        memory,
        masks,
        similarity=similarity,
        temperature=0.2,
        topk=5,
        radius=2,
        tile=tile,
        rows_per_product=rows_per_product,
    )
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(("rows_per_product", "screen"), [(1, False), (100, False), (None, True)])
def test_memory_may_be_a_view_of_a_partly_filled_ring_buffer(
    rows_per_product: int | None, screen: bool
) -> None:
    """Frames 0..2 of a 5-slot position-major buffer (a frame-strided view) give the same result as the
    three frames on their own; unused slots hold NaN that must not leak in (screening gathers its float32
    keys by storage offset from such a view, and reads a bfloat16 ring of the same shape)."""
    query, memory, masks = random_inputs(8, 3, 6, 9, 12)
    ring = torch.full((9, 12, 5, 6), float("nan"))
    ring_masks = torch.full((9, 12, 5, 3), float("nan"))
    ring[:, :, :3] = unit_memory(memory)
    ring_masks[:, :, :3] = masks.permute(2, 3, 0, 1)
    got = propagate_prepared(
        unit_query(query),
        ring[:, :, :3],
        ring_masks[:, :, :3],
        similarity="cosine",
        temperature=0.2,
        topk=7,
        radius=3,
        rows_per_product=rows_per_product,
        screen=screen,
        memory_bf16=ring.to(torch.bfloat16)[:, :, :3] if screen else None,
    ).permute(2, 0, 1)
    assert (got - dense_reference(query, memory, masks, topk=7, radius=3)).abs().max() < 1e-5


def test_temperature_matters_and_matches_reference() -> None:
    query, memory, masks = random_inputs(3, 2, 8, 6, 6)
    sharp = propagate_frame(query, memory, masks, temperature=0.05, topk=10, radius=2)
    soft = propagate_frame(query, memory, masks, temperature=1.0, topk=10, radius=2)
    assert (sharp - soft).abs().max() > 1e-3
    assert (
        sharp - dense_reference(query, memory, masks, temperature=0.05, topk=10, radius=2)
    ).abs().max() < 1e-5


# -- hand-computed cases ------------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["float32", "screened"])
def screen(request: pytest.FixtureRequest) -> bool:
    """Both propagation paths, whatever this machine's default (screening needs bf16 instructions)."""
    return request.param


def _two_position_case(scale: float = 1.0):
    """Grid 1 x 2; query and memory hold e0 at x=0 and e1 at x=1; memory labels: x=0 class 1, x=1 class 0."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feats = torch.stack([e0, e1], dim=1).reshape(2, 1, 2) * scale  # (C=2, h=1, w=2)
    masks = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).reshape(
        1, 2, 1, 2
    )  # channel 0 = [0, 1], channel 1 = [1, 0]
    return feats, feats[None].clone(), masks


@pytest.mark.parametrize(
    ("similarity", "other_logit"),
    [("cosine", 0.0), ("l2", -math.sqrt(2.0)), ("l1", -2.0)],  # logit of the orthogonal key, x T
)
def test_hand_computed_weights(similarity: str, other_logit: float, screen: bool) -> None:
    """Same-position key: similarity 1 (cosine) or distance 0; the orthogonal key: cos 0, l2 sqrt 2, l1 2."""
    temperature = 0.5
    same_logit = 1.0 / temperature if similarity == "cosine" else 0.0
    other = other_logit / temperature
    weight_same = math.exp(same_logit) / (math.exp(same_logit) + math.exp(other))
    query, memory, masks = _two_position_case(scale=3.0)  # not unit length: propagation must normalise
    out = propagate_frame(
        query, memory, masks, similarity=similarity, temperature=temperature, topk=2, radius=0, screen=screen
    )
    # position 0 matches memory position 0 (class 1) most, position 1 matches memory position 1 (class 0)
    expected = torch.tensor([[[1 - weight_same, weight_same]], [[weight_same, 1 - weight_same]]])
    assert torch.allclose(out, expected, atol=1e-6)
    top1 = propagate_frame(
        query, memory, masks, similarity=similarity, temperature=temperature, topk=1, radius=0, screen=screen
    )
    assert torch.equal(top1, torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]))


def test_ties_at_kth_place_are_kept(screen: bool) -> None:
    """Query e0 against keys e0, u, u, e1 with u = (0.6, 0.8): cos 1, 0.6, 0.6, 0. With k = 2 the two keys
    tied at the 2nd place are both kept (3 keys), the 4th key is dropped."""
    temperature = 0.25
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.0, 1.0]]).t().reshape(1, 2, 1, 4)
    query = keys[0].clone()
    query[:, 0, 0] = torch.tensor([1.0, 0.0])
    masks = torch.eye(4).reshape(1, 4, 1, 4)  # key j carries class j only: output = weight per key
    out = propagate_frame(query, keys, masks, temperature=temperature, topk=2, radius=0, screen=screen)
    affinities = torch.tensor(
        [math.exp(1 / temperature), math.exp(0.6 / temperature), math.exp(0.6 / temperature), 0]
    )
    expected = affinities / affinities.sum()
    assert torch.allclose(out[:, 0, 0], expected.float(), atol=1e-6)
    assert out[3, 0, 0] == 0.0
    assert out[1, 0, 0] > 0.0 and out[2, 0, 0] > 0.0


@pytest.mark.parametrize("topk", [1, 3, 5])
def test_ties_everywhere_with_duplicated_memory_frames(topk: int, screen: bool) -> None:
    """Two identical memory frames with different masks: every key has a twin, so an odd k always ends in a
    tie, which must keep both twins (the k+1 keys mix both frames' masks)."""
    query, memory, _ = random_inputs(11, 1, 6, 9, 10)
    memory = torch.cat([memory, memory])
    masks = torch.stack([torch.zeros(2, 9, 10), torch.zeros(2, 9, 10)])
    masks[0, 0] = 1.0  # frame 0 says class 0
    masks[1, 1] = 1.0  # frame 1 says class 1
    out = propagate_frame(query, memory, masks, topk=topk, radius=3, screen=screen)
    expected = dense_reference(query, memory, masks, topk=topk, radius=3)
    assert (out - expected).abs().max() < 1e-5
    # each pair of twins has equal weight, so both classes get exactly half
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=1e-6)


def test_ties_are_judged_on_float32_affinities_like_the_released_code() -> None:
    """Logits 0.5 and the float32 just below it differ, but exp() maps both to one float32 affinity: the
    released code (top-k on exp values, ``aff[aff < kth] = 0``) keeps both when they share the k-th place."""
    from harness.methods.labelprop.affinity import _weighted_masks

    below_half = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
    logits = torch.tensor([[2.0, 0.5, below_half, -1.0]])
    assert logits[0, 1] != logits[0, 2] and torch.exp(logits[0, 1]) == torch.exp(logits[0, 2])  # precondition
    masks = torch.eye(4)
    got = _weighted_masks(logits.clone(), masks, topk=2)[0]
    affinity = torch.exp(logits[0].double())
    affinity[3] = 0.0  # below the k-th
    assert torch.allclose(got.double(), affinity / affinity.sum(), atol=1e-6)
    assert got[2] > 0.0
    # with a clear gap the (k+1)-th key is dropped
    clear = _weighted_masks(torch.tensor([[2.0, 0.5, 0.4, -1.0]]), masks, topk=2)[0]
    assert clear[2] == 0.0 and clear[3] == 0.0


def test_unit_vectors_are_bitwise_those_of_f_normalize() -> None:
    """Bit-exact normalisation keeps near-tied k-th affinities on the same side of the cut as the released
    code (a 1-ulp difference moved a few per DAVIS-sized frame)."""
    generator = torch.Generator().manual_seed(12)
    memory = torch.randn(5, 64, 9, 13, generator=generator) * 3.0
    memory[1, :, 2, 3] = 0.0  # a zero vector stays zero
    query = memory[2].clone()
    assert torch.equal(unit_memory(memory), F.normalize(memory, dim=1).permute(2, 3, 0, 1))
    assert torch.equal(unit_query(query), F.normalize(query, dim=0).permute(1, 2, 0))


def test_window_excludes_far_identical_key(screen: bool) -> None:
    """A memory key identical to the query but outside the window gets no weight; without a window it wins."""
    generator = torch.Generator().manual_seed(5)
    height, width, channels = 5, 12, 8
    query = torch.randn(channels, height, width, generator=generator)
    memory = torch.randn(1, channels, height, width, generator=generator)
    memory[0, :, 2, 11] = query[:, 2, 1]  # same vector, 10 columns away from query position (2, 1)
    masks = torch.zeros(1, 2, height, width)
    masks[0, 0] = 1.0
    masks[0, 0, 2, 11], masks[0, 1, 2, 11] = 0.0, 1.0  # only the far twin carries class 1
    windowed = propagate_frame(query, memory, masks, topk=3, radius=4, screen=screen)
    assert windowed[1, 2, 1] == 0.0
    unwindowed = propagate_frame(query, memory, masks, topk=3, radius=0, screen=screen)
    assert unwindowed[1, 2, 1] > 0.5  # cos 1 at T = 0.2 dominates the other top-3 keys


def test_border_windows_with_fewer_valid_keys_than_k(screen: bool) -> None:
    """1 x 3 grid, r = 1: the corner window has 2 keys; with k = 5 both are kept, nothing outside counts."""
    query, memory, masks = random_inputs(2, 1, 4, 1, 3, n_classes=3)
    masks = torch.eye(3).reshape(1, 3, 1, 3)  # key x carries class x
    out = propagate_frame(query, memory, masks, topk=5, radius=1, screen=screen)
    assert out[2, 0, 0] == 0.0 and out[0, 0, 2] == 0.0
    assert torch.allclose(out.sum(dim=0), torch.ones(1, 3))
    assert (out - dense_reference(query, memory, masks, topk=5, radius=1)).abs().max() < 1e-6


# -- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"similarity": "dot"}, "dot"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"topk": 0}, "topk"),
        ({"radius": -1}, "radius"),
        ({"radius": 1.5}, "radius"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs: dict, fragment: str) -> None:
    query, memory, masks = random_inputs(0, 1, 4, 3, 3)
    with pytest.raises(ConfigError, match=fragment):
        propagate_frame(query, memory, masks, **kwargs)
    with pytest.raises(ConfigError, match=fragment):
        PropagationSettings(**kwargs)


def test_bad_settings_n_last_frames() -> None:
    with pytest.raises(ConfigError, match="n_last_frames"):
        PropagationSettings(n_last_frames=-1)
    assert PropagationSettings() == PropagationSettings("cosine", 0.2, 15, 15, 28)


@pytest.mark.parametrize(
    ("query_shape", "memory_shape", "masks_shape", "fragment"),
    [
        ((4, 3, 3), (1, 4, 3, 4), (1, 2, 3, 4), "do not match"),
        ((4, 3, 3), (1, 5, 3, 3), (1, 2, 3, 3), "do not match"),
        ((4, 3, 3), (2, 4, 3, 3), (1, 2, 3, 3), "memory_masks"),
        ((4, 3, 3), (1, 4, 3, 3), (1, 2, 3, 2), "memory_masks"),
        ((4, 3), (1, 4, 3, 3), (1, 2, 3, 3), "query"),
        ((4, 3, 3), (0, 4, 3, 3), (0, 2, 3, 3), "no frame"),
    ],
)
def test_shape_mismatch_raises(query_shape, memory_shape, masks_shape, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        propagate_frame(torch.rand(query_shape), torch.rand(memory_shape), torch.rand(masks_shape))


# -- memory: planning and a measured peak -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "radius"), [(60, 104, 15), (13, 7, 2), (9, 30, 4), (5, 5, 0), (4, 6, 9)]
)
def test_plan_covers_every_query_once_with_its_whole_window(height: int, width: int, radius: int) -> None:
    strips = plan_blocks(height, width, radius, n_memory=29, channels=512, n_classes=3, budget_bytes=2**26)
    covered = np.zeros((height, width), dtype=int)
    for strip in strips:
        for block in strip.blocks:
            (r0, r1), (c0, c1) = block.query_rows, block.query_cols
            covered[r0:r1, c0:c1] += 1
            if block.windowed:
                assert block.key_rows == (max(0, r0 - radius), min(height, r1 + radius))
                assert block.key_cols == (max(0, c0 - radius), min(width, c1 + radius))
            else:  # no mask: the whole grid must be inside every query's window
                assert block.key_rows == (0, height) and block.key_cols == (0, width)
                assert radius == 0 or (radius >= height - 1 and radius >= width - 1)
            assert strip.key_rows[0] <= block.key_rows[0] and block.key_rows[1] <= strip.key_rows[1]
            assert strip.key_cols == block.key_cols
    assert (covered == 1).all()


def test_plan_keeps_strips_and_blocks_within_the_budget() -> None:
    from harness.methods.labelprop.affinity import block_bytes, strip_bytes

    sizes = {"n_memory": 29, "channels": 512, "n_classes": 3}
    generous = plan_blocks(60, 104, 15, **sizes, tile=(16, 16), budget_bytes=2**31)
    budget = 160 * 2**20
    tight = plan_blocks(60, 104, 15, **sizes, tile=(16, 16), budget_bytes=budget)
    assert max(block.num_queries for strip in generous for block in strip.blocks) == 256
    assert len(generous) == 7  # one strip per tile column: everything fits
    assert max(block_bytes(block, 29) for strip in tight for block in strip.blocks) <= budget // 2
    assert max(strip_bytes(strip, **sizes) for strip in tight) <= budget // 2
    assert len(tight) > len(generous)


def test_plan_at_davis_scale_stays_far_below_the_dense_affinity() -> None:
    """Grid 60 x 104, 512 channels, N = 29, r = 15: the dense affinity alone is 4.5 GB; a strip plus one
    block's logits is what propagation adds on top of the normalised memory."""
    from harness.methods.labelprop.affinity import DEFAULT_BUDGET_BYTES, block_bytes, strip_bytes

    sizes = {"n_memory": 29, "channels": 512, "n_classes": 3}
    strips = plan_blocks(60, 104, 15, **sizes)
    dense_bytes = 29 * (60 * 104) ** 2 * 4
    largest_strip = max(strip_bytes(strip, **sizes) for strip in strips)
    largest_block = max(block_bytes(block, 29) for strip in strips for block in strip.blocks)
    assert largest_strip + largest_block <= DEFAULT_BUDGET_BYTES
    assert largest_strip + largest_block < dense_bytes / 15


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from harness.methods.labelprop import propagate_frame

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    n, c, h, w = 16, 32, 40, 64
    g = torch.Generator().manual_seed(0)
    query, memory = torch.randn(c, h, w, generator=g), torch.randn(n, c, h, w, generator=g)
    masks = torch.rand(n, 3, h, w, generator=g)
    propagate_frame(query[:, :8, :8], memory[:2, :, :8, :8], masks[:2, :, :8, :8], radius=2)  # warm-up
    before = peak_mb()
    propagate_frame(query, memory, masks, radius=4, topk=15)
    windowed = peak_mb() - before
    before = peak_mb()
    dense = torch.ones(n * (h * w) ** 2)  # what the dense affinity alone would take: proves the probe works
    probe = peak_mb() - before
    dense_mb = dense.numel() * 4 / 2**20
    print(json.dumps({"windowed_mb": windowed, "dense_probe_mb": probe, "dense_mb": dense_mb}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux-specific")
def test_measured_peak_memory_with_window_is_far_below_dense() -> None:
    """Peak resident memory of a fresh process: the windowed propagation adds under a tenth of the dense
    affinity (400 MB here), and the same probe does see a dense-sized allocation."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    if numbers["dense_probe_mb"] < 0.9 * numbers["dense_mb"]:
        # the peak-RSS probe must see a dense-sized allocation, otherwise it measures nothing here
        pytest.skip(f"ru_maxrss did not register a {numbers['dense_mb']:.0f} MB allocation on this machine")
    assert numbers["windowed_mb"] < numbers["dense_mb"] / 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_stays_small() -> None:
    query, memory, masks = random_inputs(4, 8, 64, 40, 64)
    cpu = propagate_frame(query, memory, masks, radius=5, topk=15)
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    gpu = propagate_frame(query.cuda(), memory.cuda(), masks.cuda(), radius=5, topk=15)
    assert gpu.device.type == "cuda"
    extra = torch.cuda.max_memory_allocated() - start
    assert extra < 8 * (40 * 64) ** 2 * 4 / 10  # a tenth of the dense affinity
    assert (gpu.cpu() - cpu).abs().max() < 1e-4


# -- post-processing ----------------------------------------------------------------------------------------


def test_soft_to_labels_min_max_rule() -> None:
    """Channel 0 is all zero (left alone: a 0/0 NaN would win every argmax); channels 1 and 2 are min-max
    normalised, which changes the argmax at x=2 (raw 0.95 > 0.9, normalised 0.5 < 1). At x=0 every channel
    is 0 after normalisation and the first one wins."""
    soft = torch.tensor([[[0.0, 0.0, 0.0]], [[0.9, 1.0, 0.95]], [[0.1, 0.2, 0.9]]])
    labels = soft_to_labels(soft, (1, 3), (1, 3))
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[0, 1, 2]])
    # without normalisation the raw argmax would give channel 1 everywhere
    assert soft.argmax(dim=0).tolist() == [[1, 1, 1]]


def test_soft_to_labels_upsamples_bilinearly_then_resizes_nearest() -> None:
    """1 x 2 grid -> input 1 x 4 samples at x = -0.25, 0.25, 0.75, 1.25 (align_corners=False): channel 0
    = [1, 0.75, 0.25, 0], channel 1 = [0, 0.25, 0.75, 1]; then nearest to 2 x 8 repeats each pixel."""
    soft = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    labels = soft_to_labels(soft, (1, 4), (2, 8))
    np.testing.assert_array_equal(labels, [[0, 0, 0, 0, 1, 1, 1, 1]] * 2)
    # a constant positive channel has no range; the released code's 0/0 = NaN wins torch's argmax everywhere
    flat = torch.tensor([[[0.0, 0.3]], [[0.5, 0.5]], [[0.0, 0.2]], [[0.7, 0.7]]])
    np.testing.assert_array_equal(soft_to_labels(flat, (1, 2), (1, 2)), [[1, 1]])
    released = flat.clone()
    for channel in released:
        if channel.max() > 0:
            channel -= channel.min()
            channel /= channel.max()
    assert released.argmax(dim=0).tolist() == [[1, 1]]


def test_labels_to_onehot_resizes_with_nearest() -> None:
    blocks = np.kron(np.array([[0, 1], [2, 3]]), np.ones((3, 3), dtype=np.int64))  # 6 x 6, 3 x 3 blocks
    onehot = labels_to_onehot(blocks, 4, (2, 2))
    assert onehot.shape == (4, 2, 2) and onehot.dtype == torch.float32
    assert torch.equal(onehot.argmax(dim=0), torch.tensor([[0, 1], [2, 3]]))
    assert torch.equal(onehot.sum(dim=0), torch.ones(2, 2))
    # 7 -> 3 samples pixel centres 1.17, 3.5, 5.83 -> columns 1, 3, 5 (no rounding ties)
    row = np.arange(7).reshape(1, 7)
    np.testing.assert_array_equal(resize_labels_nearest(row, (1, 3)), [[1, 3, 5]])
    with pytest.raises(DataError, match="0..3"):
        labels_to_onehot(np.array([[0, 4]]), 4, (1, 2))


# -- propagate_sequence -------------------------------------------------------------------------------------


def _explicit_memory_reference(features, first_labels, num_classes, settings, input_size, output_size):
    """The memory semantics written out with Python lists and propagate_frame."""
    height, width = features.shape[-2:]
    first_mask = labels_to_onehot(first_labels, num_classes, (height, width))
    previous: list[tuple[torch.Tensor, torch.Tensor]] = []
    outputs = []
    for t in range(1, features.shape[0]):
        memory_feats = torch.stack([features[0]] + [f for f, _ in previous])
        memory_masks = torch.stack([first_mask] + [m for _, m in previous])
        soft = propagate_frame(
            features[t],
            memory_feats,
            memory_masks,
            similarity=settings.similarity,
            temperature=settings.temperature,
            topk=settings.topk,
            radius=settings.radius,
        )
        outputs.append(soft_to_labels(soft, input_size, output_size))
        if settings.n_last_frames > 0:
            previous.append((features[t], soft))
            previous = previous[-settings.n_last_frames :]
    return outputs


@pytest.mark.parametrize("n_last_frames", [0, 1, 2, 28])
def test_sequence_matches_explicit_memory(n_last_frames: int) -> None:
    generator = torch.Generator().manual_seed(n_last_frames)
    features = torch.randn(7, 6, 5, 8, generator=generator)
    first_labels = np.kron(
        torch.randint(0, 3, (5, 8), generator=generator).numpy(), np.ones((2, 2), np.int64)
    )
    settings = PropagationSettings(topk=3, radius=2, n_last_frames=n_last_frames, temperature=0.1)
    got = list(
        propagate_sequence(features, first_labels, 3, settings, input_size=(10, 16), output_size=(10, 16))
    )
    expected = _explicit_memory_reference(features, first_labels, 3, settings, (10, 16), (10, 16))
    assert [t for t, _ in got] == list(range(1, 7))  # the first frame is not an output
    for (_, labels), reference in zip(got, expected, strict=True):
        assert labels.shape == (10, 16) and labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, reference)


def test_fifo_with_one_last_frame_forgets_older_frames() -> None:
    """Grid 1 x 2, k = 1, no window. Frame 0: e0 (class 1), e1 (class 2). Frame 1: x = e0 + 0.5 e2 (-> class
    1), e1. Frame 2: e1, e1 (-> class 2). Frame 3 at x=0: y with cos(y, x) > cos(y, e1) > cos(y, e0), so
    it is class 1 only while frame 1 is remembered: n_last_frames >= 2, not 1 (memory = frames 0 and 2)."""
    e0, e1, e2 = torch.eye(3)
    x = e0 + 0.5 * e2
    y = 0.1 * e0 + 0.3 * e1 + 0.6 * e2
    frames = [(e0, e1), (x, e1), (e1, e1), (y, e1)]
    features = torch.stack([torch.stack(pair, dim=1).reshape(3, 1, 2) for pair in frames])
    first_labels = np.array([[1, 2]])

    def frame3(n_last_frames: int) -> list[int]:
        settings = PropagationSettings(topk=1, radius=0, n_last_frames=n_last_frames)
        outputs = dict(
            propagate_sequence(features, first_labels, 3, settings, input_size=(1, 2), output_size=(1, 2))
        )
        assert outputs[1].tolist() == [[1, 2]] and outputs[2].tolist() == [[2, 2]]
        return outputs[3].tolist()

    assert frame3(2) == [[1, 2]]
    assert frame3(28) == [[1, 2]]
    assert frame3(1) == [[2, 2]]
    assert frame3(0) == [[2, 2]]


def test_sequence_of_identical_frames_reproduces_first_mask_through_resizing() -> None:
    """Identical frames, k = 1: labels go down to the grid (nearest) and back up unchanged when blocky."""
    features = torch.randn(1, 8, 4, 6).repeat(4, 1, 1, 1)
    first_labels = np.kron(np.array([[0, 1, 1, 2, 0, 0], [0, 0, 3, 3, 2, 1]] * 2), np.ones((4, 4), np.int64))
    settings = PropagationSettings(topk=1, radius=1)
    outputs = list(
        propagate_sequence(features, first_labels, 4, settings, input_size=(8, 12), output_size=(16, 24))
    )
    assert len(outputs) == 3
    for _, labels in outputs:
        np.testing.assert_array_equal(labels, first_labels)


def test_sequence_loads_lazy_features_once_each_in_order() -> None:
    generator = torch.Generator().manual_seed(1)
    stored = torch.randn(5, 4, 3, 3, generator=generator)
    calls: list[int] = []

    def load(index: int) -> torch.Tensor:
        calls.append(index)
        return stored[index]

    settings = PropagationSettings(topk=2, radius=1, n_last_frames=2)
    first = np.zeros((3, 3), dtype=np.int64)
    first[1, 1] = 1
    lazy = propagate_sequence(load, first, 2, settings, input_size=(3, 3), output_size=(3, 3), num_frames=5)
    assert calls == []  # nothing is read before iteration
    lazy_out = [labels for _, labels in lazy]
    eager_out = [
        labels
        for _, labels in propagate_sequence(
            list(stored), first, 2, settings, input_size=(3, 3), output_size=(3, 3)
        )
    ]
    assert calls == [0, 1, 2, 3, 4]
    for a, b in zip(lazy_out, eager_out, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="num_frames"):
        propagate_sequence(load, first, 2, settings, input_size=(3, 3), output_size=(3, 3))


def test_sequence_input_errors() -> None:
    features = torch.randn(3, 4, 2, 2)
    settings = PropagationSettings()
    with pytest.raises(DataError, match="output_size"):
        propagate_sequence(
            features, np.zeros((3, 3), np.int64), 2, settings, input_size=(2, 2), output_size=(2, 2)
        )
    with pytest.raises(DataError, match="channel range"):
        propagate_sequence(features, np.full((2, 2), 2), 2, settings, input_size=(2, 2), output_size=(2, 2))
    with pytest.raises(ConfigError, match="num_classes"):
        propagate_sequence(
            features, np.zeros((2, 2), np.int64), 0, settings, input_size=(2, 2), output_size=(2, 2)
        )
    bad = [torch.randn(4, 2, 2), torch.randn(4, 2, 3)]
    with pytest.raises(DataError, match="frame 1"):
        list(
            propagate_sequence(
                bad, np.zeros((2, 2), np.int64), 2, settings, input_size=(2, 2), output_size=(2, 2)
            )
        )
    assert (
        list(
            propagate_sequence(
                features[:1], np.zeros((2, 2), np.int64), 2, settings, input_size=(2, 2), output_size=(2, 2)
            )
        )
        == []
    )
