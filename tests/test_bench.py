"""The benchmarks (`harness bench`) at toy sizes, their baselines against hand-computed cases, and the
fast-path extras of the extraction loop (prefetching, halving the batch after a CUDA out-of-memory error).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from backbones.adm_unet import ADM_256_UNCOND
from backbones.base import Backbone, LayerInfo, LayerKey
from harness.bench import propagation as bench_propagation
from harness.bench.common import (
    BenchOptions,
    format_table,
    peak_rss_increase,
    time_calls,
    time_interleaved,
)
from harness.bench.extraction import adm_flops
from harness.bench.runner import main, run_one
from harness.bench.sweep import SEARCH_SPACE, draw_trials
from harness.errors import ConfigError, HarnessError
from harness.features import FeatureCache, extract_sequence_features
from harness.methods.labelprop import PropagationSettings, propagate_frame
from harness.methods.labelprop.reference import propagate_dense

# -- runner helpers --------------------------------------------------------------------------------------


def test_format_table_aligns_numbers_right_and_text_left() -> None:
    table = format_table(["name", "seconds"], [["a", 1.5], ["longer", 12.25]])
    assert table.splitlines() == [
        "name    seconds",
        "------  -------",
        "a          1.50",
        "longer    12.25",
    ]


def test_time_calls_runs_warmup_untimed_and_times_each_repeat() -> None:
    calls: list[int] = []

    def sleep() -> None:
        calls.append(1)
        time.sleep(0.02)

    timing = time_calls(sleep, repeats=3, warmup=2)
    assert len(calls) == 5
    assert len(timing.seconds) == 3
    assert all(seconds >= 0.02 for seconds in timing.seconds)
    assert timing.median == sorted(timing.seconds)[1]


def test_time_interleaved_alternates_the_functions() -> None:
    order: list[str] = []
    timings = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=1
    )
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert [len(t.seconds) for t in timings.values()] == [2, 2]


def test_peak_rss_increase_sees_a_freed_allocation() -> None:
    """The call allocates and frees 128 MiB; the probe must report at least that, not the (zero) net."""
    size = 32 * 2**20  # float32 elements: 128 MiB

    def allocate() -> None:
        block = torch.empty(size)
        block.fill_(1.0)  # touch every page
        del block

    increase, method = peak_rss_increase(allocate)
    if "ru_maxrss" in method:
        pytest.skip("this kernel does not let a process reset its peak RSS; the fallback may under-count")
    assert increase >= 0.95 * size * 4
    assert increase < 4 * size * 4


def test_bench_options_reject_bad_values() -> None:
    with pytest.raises(ConfigError, match="repeats"):
        BenchOptions(repeats=0)
    with pytest.raises(ConfigError, match="--quick"):
        BenchOptions(quick=True, full=True)
    with pytest.raises(ConfigError, match="tpu"):
        BenchOptions(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            BenchOptions(device="cuda")
    assert BenchOptions().scale == "reduced"
    assert BenchOptions(full=True).scale == "full"
    assert BenchOptions(quick=True).scale == "quick"


def test_main_reports_bad_options_as_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["propagation", "--quick", "--repeats", "0"]) == 1
    assert "repeats" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["no-such-benchmark"])


# -- propagation baseline --------------------------------------------------------------------------------


def test_released_window_mask_by_hand() -> None:
    """2 x 3 grid, radius 1: a corner sees its 2 x 2 neighbourhood, a middle-column cell all 6 cells."""
    mask = bench_propagation.released_window_mask(2, 3, 1)
    assert mask.shape == (6, 6)
    assert mask.sum(dim=1).tolist() == [4.0, 6.0, 4.0, 4.0, 6.0, 4.0]
    assert mask[0].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert torch.equal(mask, mask.t())


@pytest.mark.parametrize(("height", "width", "radius"), [(5, 7, 2), (3, 4, 0), (6, 3, 10)])
def test_vectorised_window_equals_the_loop(height: int, width: int, radius: int) -> None:
    loop = bench_propagation.released_window_mask(height, width, radius)
    assert torch.equal(bench_propagation.window_mask_vectorised(height, width, radius), loop)


def test_released_propagate_by_hand() -> None:
    """One memory frame of two positions; query i equals key i. With T = 1 query 0 gives key 0 weight
    e / (e + 1) and key 1 weight 1 / (e + 1); with top-1 only key 0 remains."""
    query = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (C=2, h=1, w=2)
    memory = query[None].clone()
    masks = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # class 0 at position 0, class 1 at position 1
    soft = bench_propagation.released_propagate(query, memory, masks, window=None, temperature=1.0, topk=2)
    e = math.e
    expected = torch.tensor([[[e / (e + 1), 1 / (e + 1)]], [[1 / (e + 1), e / (e + 1)]]])
    torch.testing.assert_close(soft, expected)
    top1 = bench_propagation.released_propagate(query, memory, masks, window=None, temperature=1.0, topk=1)
    torch.testing.assert_close(top1, masks[0])


@pytest.mark.parametrize("radius", [0, 2, 4])
def test_released_propagate_matches_propagate_frame(radius: int) -> None:
    case = bench_propagation.PropagationCase("t", 9, 13, channels=24, n_memory=4, radius=radius, topk=6)
    query, memory, masks = bench_propagation.make_inputs(case)
    window = bench_propagation.released_window_mask(9, 13, radius) if radius else None
    released = bench_propagation.released_propagate(
        query, memory, masks, window=window, temperature=0.2, topk=6
    )
    ours = propagate_frame(query, memory, masks, temperature=0.2, topk=6, radius=radius)
    assert (released - ours).abs().max() < 1e-5
    reference = propagate_dense(query, memory, masks, temperature=0.2, topk=6, radius=radius)
    assert (released - reference).abs().max() < 1e-5


@pytest.mark.parametrize("module", ["propagation", "sweep", "evaluation", "extraction", "smoke", "common"])
def test_sub_benchmarks_import_without_the_runner(module: str) -> None:
    """No import cycle: a sub-benchmark needs only the shared helpers, never the entry point."""
    code = (
        f"import sys; import harness.bench.{module}; "
        "assert 'harness.bench.runner' not in sys.modules, 'runner imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_released_propagate_reports_the_top_k_margin_by_hand() -> None:
    """One query, three keys with logits 1, 0.5, 0 (T = 1): with k = 2 the gap between the 2nd and 3rd
    affinity is (e^0.5 - 1) / e^0.5; with k = 3 there is no 4th key, so the margin is infinite."""
    query = torch.tensor([1.0, 0.0]).reshape(2, 1, 1)
    keys = torch.tensor([[1.0, 0.0], [0.5, 0.75**0.5], [0.0, 1.0]]).reshape(3, 2, 1, 1)
    masks = torch.eye(3).reshape(3, 3, 1, 1)
    margins: list[torch.Tensor] = []
    bench_propagation.released_propagate(
        query, keys, masks, window=None, temperature=1.0, topk=2, margins=margins
    )
    expected = (math.exp(0.5) - 1.0) / math.exp(0.5)
    assert margins[0].shape == (1,)
    assert margins[0].item() == pytest.approx(expected, rel=1e-5)
    margins.clear()
    bench_propagation.released_propagate(
        query, keys, masks, window=None, temperature=1.0, topk=3, margins=margins
    )
    assert margins[0].item() == math.inf


def test_agreement_check_ignores_only_near_ties() -> None:
    ours = torch.zeros(2, 1, 3)
    released = ours.clone()
    released[0, 0, 1] = 0.05  # position 1 differs
    clear = torch.tensor([1e-2, 1e-2, 1e-2])
    with pytest.raises(RuntimeError, match="disagree by 0.05"):
        bench_propagation.check_agreement(ours, released, clear, "toy")
    near_tie = torch.tensor([1e-2, 1e-6, 1e-2])
    result = bench_propagation.check_agreement(ours, released, near_tie, "toy")
    assert result["near_tie_positions"] == 1
    assert result["max_abs_diff_decided"] == 0.0
    assert result["max_abs_diff_all"] == pytest.approx(0.05)


def test_baseline_memory_formula_at_davis_scale() -> None:
    case = bench_propagation.PropagationCase("davis", 60, 104)
    estimate = bench_propagation.estimated_baseline_bytes(case)
    assert estimate["dense_affinity_bytes"] == 29 * 6240 * 6240 * 4  # 4.5 GB, as the README says
    assert estimate["window_bytes"] == 6240 * 6240 * 4
    assert estimate["estimated_peak_bytes"] > 1.25 * estimate["dense_affinity_bytes"]


# -- sweep and extraction pieces -------------------------------------------------------------------------


def test_draw_trials_are_distinct_start_with_the_defaults_and_repeat() -> None:
    trials = draw_trials(20)
    assert trials[0] == PropagationSettings()
    assert len({repr(t) for t in trials}) == 20
    assert draw_trials(20) == trials
    for trial in trials[1:]:
        for name, values in SEARCH_SPACE.items():
            assert getattr(trial, name) in values
    with pytest.raises(ValueError, match="only"):
        draw_trials(10_000)


@pytest.mark.slow
def test_adm_flop_counts_match_the_published_figures() -> None:
    """Reference: 14,583 GFLOPs for the whole UNet at 480x864 and 4,812 GFLOPs through decoder layer 6."""
    full, to_layer_6 = adm_flops(ADM_256_UNCOND, 480, 864, [None, 6])
    assert abs(full / 1e9 - 14_583) < 1
    assert abs(to_layer_6 / 1e9 - 4_812) < 1


# -- the sub-benchmarks end to end, at toy size ----------------------------------------------------------


def quick_options(tmp_path: Path) -> BenchOptions:
    return BenchOptions(device="cpu", quick=True, out_dir=tmp_path / "out", work_dir=tmp_path / "work")


def read_report(path: Path, name: str) -> dict[str, Any]:
    assert path == path.parent / f"{name}.json"
    report = json.loads(path.read_text())
    assert report["benchmark"] == name
    for key in ("cpu_model", "logical_cores", "usable_cores", "memory_total_bytes", "gpu"):
        assert key in report["machine"]
    assert report["machine"]["logical_cores"] >= 1
    for key in ("python", "torch", "project_commit"):
        assert key in report["versions"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["options"]["scale"] == "quick"
    assert report["settings"] and report["notes"]
    assert report["command"].startswith("python -m harness.bench")
    return report


@pytest.mark.slow
def test_propagation_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = read_report(run_one("propagation", quick_options(tmp_path)), "propagation")
    assert "speed-up" in capsys.readouterr().out
    assert len(report["cases"]) == 2
    for entry in report["cases"]:
        assert entry["agreement_max_abs_diff"] <= 1e-5
        assert entry["ours"]["median_seconds"] > 0 and entry["baseline"]["median_seconds"] > 0
        assert entry["baseline"]["window_build_seconds"] > 0
        assert entry["diagnostics"]["on"]["median_seconds"] > 0
    measured = report["cases"][-1]
    dense = measured["baseline_estimate"]["dense_affinity_bytes"]
    # the baseline holds the dense affinity at its peak, ours a small fraction of it
    assert measured["baseline"]["peak_call_bytes"] >= 0.9 * dense
    assert measured["ours"]["peak_call_bytes"] < dense / 5


def test_diagnostics_timing_checks_that_the_masks_are_unchanged() -> None:
    case = bench_propagation.PropagationCase("t", 9, 13, channels=8, n_memory=3, radius=2, topk=4)
    inputs = bench_propagation.make_inputs(case)
    plain = bench_propagation.SequenceStep(case, inputs)
    timing = bench_propagation._diagnostics_overhead(case, inputs, plain, 1, "cpu")
    assert len(timing["on"]["seconds"]) == len(timing["off"]["seconds"]) == 1
    assert timing["overhead_fraction"] == pytest.approx(
        timing["on"]["median_seconds"] / timing["off"]["median_seconds"] - 1
    )
    # a step whose diagnostics changed the masks is refused
    broken = bench_propagation.SequenceStep(case, inputs)
    broken.masks = broken.masks.flip(0).contiguous()
    with pytest.raises(RuntimeError, match="diagnostics changed the propagated masks"):
        bench_propagation._diagnostics_overhead(case, inputs, broken, 1, "cpu")


def test_real_footage_check_runs_both_paths_on_a_davis_layout(tmp_path: Path, synth_root: Path) -> None:
    options = BenchOptions(
        device="cpu", quick=True, out_dir=tmp_path, work_dir=tmp_path, real_data=synth_root
    )
    footage = bench_propagation.real_footage_check(options)
    assert footage["same_labels"] is True and footage["frames"] == 4
    default, exact = footage["runs"]["default"], footage["runs"]["float32"]
    assert exact["blocks"] == 0 and exact["candidate_fraction_mean"] is None
    if footage["screening_available"]:
        assert default["blocks"] > 0 and 0.0 <= default["candidate_fraction_mean"] <= 1.0
    report = {"cases": [], "targets": {}, "real_footage_screening": footage}
    assert "same labels" in bench_propagation.format_report(report)
    missing = replace(options, real_data=tmp_path / "nowhere")
    assert "skipped" in bench_propagation.real_footage_check(missing)


@pytest.mark.slow
def test_sweep_benchmark_quick(tmp_path: Path) -> None:
    report = read_report(run_one("sweep", quick_options(tmp_path)), "sweep")
    study = report["affinity_study"]
    assert len(study["warm_trials"]) == 2 and len(study["uncached_runs"]) == 1
    assert all(trial["cache_misses"] == 0 and trial["cache_hits"] > 0 for trial in study["warm_trials"])
    assert study["uncached_runs"][0]["cache_hits"] is None
    expected_ratio = study["warm_sweep_seconds"] / study["uncached_median_seconds"]
    assert study["warm_ratio"] == pytest.approx(expected_ratio)
    sweep = report["layer_sweep"]
    assert sweep["layers"] == [0, 1]
    assert [t["jf"] for t in sweep["warm_trials"]] == [t["jf"] for t in sweep["uncached_runs"]]
    assert all(trial["split"]["extraction"] < sweep["fill_seconds"] for trial in sweep["warm_trials"])


@pytest.mark.slow
def test_extraction_benchmark_quick(tmp_path: Path) -> None:
    report = read_report(run_one("extraction", quick_options(tmp_path)), "extraction")
    assert report["matmul_rate"]["tflops"] > 0
    for model in ("adm", "sd21"):
        entry = report[model]
        assert entry["fp32_agreement_relative"] <= 1e-4
        released, ours = entry["variants"][:2]
        # stopping early (and, for SD, encoding once) must count fewer FLOPs than the released path
        assert ours["flops_per_frame"] < released["flops_per_frame"]
        assert entry["davis17_val_trial_seconds"]["projected_from_flops"] is True
    assert report["sd21"]["size"]["ensemble_size"] == 2


def test_smoke_benchmark_quick_times_every_tiny_backbone(tmp_path: Path) -> None:
    from harness.bench.smoke import TINY_BACKBONES

    report = read_report(run_one("smoke", quick_options(tmp_path)), "smoke")
    assert [row["backbone"] for row in report["backbones"]] == list(TINY_BACKBONES)
    assert all(row["best_s"] > 0 and row["calls"] == 1 for row in report["backbones"])


def test_evaluation_benchmark_quick(tmp_path: Path) -> None:
    report = read_report(run_one("evaluation", quick_options(tmp_path)), "evaluation")
    ours = report["results"]["harness.evaluation"]
    assert ours["median_seconds"] > 0
    assert report["results"]["dataset"]["sequences"] == 2
    assert set(report["targets"]) >= {"met_seconds", "met_memory"}


# -- extraction loop: prefetching and out-of-memory handling ---------------------------------------------


class FakeBackbone(Backbone):
    """Features = the frame's mean colour plus its index; can fail like a GPU that is out of memory."""

    name = "fake"

    def __init__(self, max_batch: int | None = None) -> None:
        self.max_batch = max_batch
        self.batches: list[list[int]] = []
        self.on_extract: Any = None

    def layers(self) -> dict[LayerKey, LayerInfo]:
        return {0: LayerInfo(0, 2, 1)}

    def identity(self) -> str:
        return "fake/v1"

    def extract(
        self,
        frames: torch.Tensor,
        *,
        timestep: int,
        layers: list[LayerKey],
        ensemble_size: int,
        seed: int,
        sequence: str,
        frame_indices: list[int],
    ) -> dict[LayerKey, torch.Tensor]:
        self.batches.append(list(frame_indices))
        if self.on_extract is not None:
            self.on_extract(frame_indices)
        if self.max_batch is not None and len(frame_indices) > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        mean = frames.mean(dim=(1, 2, 3))
        index = torch.tensor(frame_indices, dtype=torch.float32)
        features = torch.stack([mean, index], dim=1)[:, :, None, None].expand(-1, -1, 2, 2)
        return {0: features.clone()}


FRAMES = torch.linspace(-1, 1, 6 * 3 * 4 * 4).reshape(6, 3, 4, 4)


def extract(backbone: FakeBackbone, batch_size: int, **overrides: Any) -> dict[LayerKey, torch.Tensor]:
    options: dict[str, Any] = {
        "sequence": "seq-a",
        "frame_ids": [f"id{i}" for i in range(len(FRAMES))],
        "load_frames": lambda indices: FRAMES[indices],
        "input_size": (4, 4),
        "timestep": 10,
        "layers": [0],
        "batch_size": batch_size,
        "progress": False,
    }
    options.update(overrides)
    return extract_sequence_features(backbone, **options)


def test_out_of_memory_halves_the_batch_and_keeps_it_halved() -> None:
    reference = extract(FakeBackbone(), batch_size=1)
    backbone = FakeBackbone(max_batch=2)
    result = extract(backbone, batch_size=4)
    assert backbone.batches == [[0, 1, 2, 3], [0, 1], [2, 3], [4, 5]]
    assert torch.equal(result[0], reference[0])


def test_out_of_memory_results_reach_the_cache(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    first = extract(FakeBackbone(max_batch=3), batch_size=6, cache=cache)
    warm_backbone = FakeBackbone(max_batch=0)  # would fail on any batch: everything must come from the cache
    again = extract(warm_backbone, batch_size=6, cache=FeatureCache(tmp_path / "cache"))
    assert warm_backbone.batches == []
    assert torch.equal(again[0], first[0])


def test_second_out_of_memory_fails_cleanly_naming_the_batch_size() -> None:
    backbone = FakeBackbone(max_batch=1)
    with pytest.raises(HarnessError, match=r"seq-a.*batch of 2 frame\(s\), after halving from 4"):
        extract(backbone, batch_size=4)
    assert backbone.batches == [[0, 1, 2, 3], [0, 1]]


def test_out_of_memory_with_one_frame_cannot_be_halved() -> None:
    backbone = FakeBackbone(max_batch=0)
    with pytest.raises(HarnessError, match="batch of 1 frame"):
        extract(backbone, batch_size=1)
    assert backbone.batches == [[0]]


def test_other_backbone_errors_are_not_retried() -> None:
    backbone = FakeBackbone()

    def fail(indices: list[int]) -> None:
        raise RuntimeError("a bug, not a lack of memory")

    backbone.on_extract = fail
    with pytest.raises(RuntimeError, match="a bug"):
        extract(backbone, batch_size=2)
    assert backbone.batches == [[0, 1]]


def test_next_batch_is_loaded_while_the_backbone_runs() -> None:
    """The first forward pass waits for the load of the second batch: without a prefetch thread that load
    would only start after the pass, and the wait would time out."""
    second_batch_loading = threading.Event()
    waited: list[bool] = []
    loads: list[list[int]] = []

    def load(indices: list[int]) -> torch.Tensor:
        loads.append(list(indices))
        if indices[0] == 2:
            second_batch_loading.set()
        return FRAMES[indices]

    backbone = FakeBackbone()

    def wait_for_prefetch(indices: list[int]) -> None:
        if indices[0] == 0:
            waited.append(second_batch_loading.wait(timeout=20))

    backbone.on_extract = wait_for_prefetch
    result = extract(backbone, batch_size=2, load_frames=load)
    assert waited == [True]
    assert loads == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(result[0], extract(FakeBackbone(), batch_size=6)[0])


def test_loader_errors_surface_from_the_prefetch_thread() -> None:
    def broken(indices: list[int]) -> torch.Tensor:
        if indices[0] == 2:
            raise OSError("frame 00002.jpg is unreadable")
        return FRAMES[indices]

    with pytest.raises(OSError, match="00002.jpg"):
        extract(FakeBackbone(), batch_size=2, load_frames=broken)
