"""Memory estimates: the smoke models at 480p stay in bounded memory, and runs that cannot fit are refused
before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backbones import load_backbone
from harness.config import RunConfig
from harness.data import open_dataset
from harness.errors import ConfigError, NotEnoughMemoryError
from harness.memory_check import MAX_SHORT_SIDE, AvailableMemory, check_run_memory, estimate_run_memory
from harness.pipeline import run

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: extracts one 480x854 frame (network input 480x832) and reports the growth of
# the peak resident set (ru_maxrss) over the pass, next to the backbone's own estimate.
_MEASURE = """
import gc, json, resource, sys
import numpy as np, torch
from backbones import load_backbone
from harness.frames import network_input_size, to_network_range, resize_frame
torch.set_num_threads(1)
backbone = load_backbone(sys.argv[1], device="cpu")
getattr(backbone, "load", lambda: None)()
layer = backbone.default_layer
rgb = np.random.default_rng(0).integers(0, 256, (480, 854, 3), dtype=np.uint8)
size = network_input_size(854, 480, 480, backbone.size_multiple)
frame = to_network_range(resize_frame(rgb, size))[None]
call = dict(timestep=30, layers=[layer], ensemble_size=1, seed=0, sequence="s", frame_indices=[0])
backbone.extract(torch.zeros((1, 3, 64, 64)), **call)  # imports and one-off set-up outside the measurement
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
features = backbone.extract(frame, **call)[layer]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
estimate = backbone.estimate_memory(size, [layer])
print(json.dumps({"size": list(size), "grid": list(features.shape[-2:]), "grew": peak - before,
                  "estimate": estimate.peak(1, 1) - estimate.weights}))
"""


@pytest.mark.parametrize("name", ["adm-tiny", "sd-tiny"])
def test_smoke_models_run_a_480p_frame_in_bounded_memory(name: str) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, name], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["size"] == [480, 832]
    assert report["grid"] == [60, 104]  # both default layers have stride 8
    # attention at stride 2 asked for 1.3 TB; now the pass fits well under a GiB, within the estimate
    assert report["grew"] < 2**30
    assert report["grew"] <= report["estimate"]


def _config(root: Path, out: Path, **overrides: object) -> RunConfig:
    base = {
        "dataset.root": str(root),
        "input.short_side": 64,
        "method.n_last_frames": 3,
        "cache.enabled": False,
        "output_dir": str(out / "run"),
        "progress": False,
    }
    return RunConfig().with_overrides(base | overrides)


def test_a_huge_short_side_is_refused_before_any_work(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"above the largest supported {MAX_SHORT_SIDE}"):
        _config(synth_root, tmp_path, **{"input.short_side": 100000})
    assert _config(synth_root, tmp_path, **{"input.short_side": MAX_SHORT_SIDE}).input.short_side == 2160
    # the largest accepted size for a real-size model on this data: refused by the memory estimate, at once
    config = _config(
        synth_root, tmp_path, **{"input.short_side": MAX_SHORT_SIDE, "backbone.name": "adm-tiny"}
    )
    dataset = open_dataset(synth_root, "val")
    backbone = load_backbone("adm-tiny", device="cpu")
    with pytest.raises(ConfigError, match="needs about"):
        check_run_memory(config, dataset, backbone, 4, available=AvailableMemory(host=2**33))
    with pytest.raises(ConfigError, match="needs about"):
        run(config.with_overrides({"backbone.batch_size": 64, "backbone.ensemble_size": 64}))
    assert not (tmp_path / "run" / "predictions").exists()


def test_runs_that_do_not_fit_the_free_memory_are_refused(synth_root: Path, tmp_path: Path) -> None:
    config = _config(synth_root, tmp_path, **{"backbone.name": "adm-tiny", "input.short_side": 480})
    dataset = open_dataset(synth_root, "val")
    backbone = load_backbone("adm-tiny", device="cpu")
    layer = backbone.default_layer
    estimate = estimate_run_memory(config, dataset, backbone, layer)
    # hand-computed: the widest synthetic frames, 192x96, -> 480 x 960 (30 * 32); layer 4 has stride 8
    assert estimate.input_size == (480, 960) and estimate.grid == (60, 120)
    longest = max(len(sequence.frames) for sequence in dataset.sequences)
    channels = backbone.layers()[layer].channels
    assert estimate.sequence_features == 4 * longest * channels * 60 * 120
    assert estimate.host > estimate.extraction > backbone.estimate_memory((480, 960), [layer]).weights
    assert (
        check_run_memory(config, dataset, backbone, layer, available=AvailableMemory(host=2**40)) == estimate
    )
    with pytest.raises(NotEnoughMemoryError, match="needs about .* of RAM but 0.1 GiB is free"):
        check_run_memory(config, dataset, backbone, layer, available=AvailableMemory(host=2**27))
    # a GPU run needs one frame's ensemble on the device; its free memory is checked too
    with pytest.raises(NotEnoughMemoryError, match="GPU memory"):
        check_run_memory(
            config, dataset, _OnCuda(backbone), layer, available=AvailableMemory(host=2**40, device=2**20)
        )


def test_larger_settings_need_more(synth_root: Path) -> None:
    dataset = open_dataset(synth_root, "val")
    backbone = load_backbone("adm-tiny", device="cpu")
    layer = backbone.default_layer
    base = RunConfig().with_overrides({"backbone.name": "adm-tiny", "input.short_side": 256})
    small = estimate_run_memory(base, dataset, backbone, layer)
    for key, value in (("input.short_side", 512), ("backbone.batch_size", 16), ("backbone.ensemble_size", 8)):
        bigger = estimate_run_memory(base.with_overrides({key: value}), dataset, backbone, layer)
        assert bigger.host > small.host, key
    longer = estimate_run_memory(base.with_overrides({"method.n_last_frames": 40}), dataset, backbone, layer)
    assert longer.propagation >= small.propagation


class _OnCuda:
    """The backbone as if it ran on a GPU (only its device is looked at besides the estimate)."""

    def __init__(self, backbone: object) -> None:
        self._backbone = backbone

    def __getattr__(self, name: str) -> object:
        if name == "device":
            import torch

            return torch.device("cuda")
        return getattr(self._backbone, name)
