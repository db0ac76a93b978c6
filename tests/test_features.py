"""The feature cache and the cached extraction loop, with the weight-free random-conv backbone."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import harness.features.cache as cache_module
from backbones import Backbone, LayerKey, load_backbone
from harness.errors import ConfigError, DataError
from harness.features import (
    CacheInfo,
    FeatureCache,
    FeatureKey,
    default_cache_dir,
    extract_sequence_features,
    format_bytes,
    format_cache_info,
    frame_identity,
)

NUM_FRAMES = 5
HEIGHT, WIDTH = 32, 48
ALL_LAYERS: list[LayerKey] = [0, 1, 2]


def make_frames(
    num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((num_frames, 3, height, width), generator=generator) * 2 - 1


def content_ids(frames: torch.Tensor) -> list[str]:
    return [hashlib.sha256(frame.numpy().tobytes()).hexdigest() for frame in frames]


@dataclass
class Recorder:
    """Counts backbone forward passes and frame loads while delegating to the real ones."""

    backbone: Backbone
    frames: torch.Tensor
    extract_calls: list[tuple[list[int], list[LayerKey]]] = field(default_factory=list)
    load_calls: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        original = self.backbone.extract

        def counting_extract(frames: torch.Tensor, **kwargs: object) -> dict[LayerKey, torch.Tensor]:
            self.extract_calls.append((list(kwargs["frame_indices"]), list(kwargs["layers"])))  # type: ignore[arg-type]
            return original(frames, **kwargs)  # type: ignore[arg-type]

        self.backbone.extract = counting_extract  # type: ignore[method-assign]

    def load_frames(self, indices: list[int]) -> torch.Tensor:
        self.load_calls.append(list(indices))
        return self.frames[indices]

    def reset(self) -> None:
        self.extract_calls.clear()
        self.load_calls.clear()

    def computed_frames(self) -> list[int]:
        return [index for indices, _ in self.extract_calls for index in indices]


def run(recorder: Recorder, cache: FeatureCache | None, **overrides: object) -> dict[LayerKey, torch.Tensor]:
    options: dict[str, object] = {
        "sequence": "seq",
        "frame_ids": content_ids(recorder.frames),
        "load_frames": recorder.load_frames,
        "input_size": tuple(recorder.frames.shape[-2:]),
        "timestep": 50,
        "layers": ALL_LAYERS,
        "ensemble_size": 2,
        "seed": 0,
        "batch_size": 2,
        "dtype": "fp32",
        "cache": cache,
        "progress": False,
    }
    options.update(overrides)
    return extract_sequence_features(recorder.backbone, **options)  # type: ignore[arg-type]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder(load_backbone("random-conv", device="cpu"), make_frames())


def assert_same(actual: dict[LayerKey, torch.Tensor], expected: dict[LayerKey, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for layer in expected:
        assert actual[layer].dtype == torch.float32
        assert torch.equal(actual[layer], expected[layer]), f"layer {layer} differs"


def make_key(**overrides: object) -> FeatureKey:
    values: dict[str, object] = {
        "backbone": "random-conv/width=32/init_seed=0",
        "timestep": 50,
        "layer": "1",
        "ensemble_size": 2,
        "seed": 0,
        "input_size": (HEIGHT, WIDTH),
        "dtype": "fp32",
        "frame": "ab" * 32,
        "sequence": "seq",
        "frame_index": 0,
    }
    values.update(overrides)
    return FeatureKey(**values)  # type: ignore[arg-type]


def entry_files(root: Path) -> list[Path]:
    """Files under ``root`` but the cache's marker."""
    return sorted(
        path for path in root.rglob("*") if path.is_file() and path.name != cache_module.MARKER_NAME
    )


# -- extraction without cache ----------------------------------------------------------------------------


def test_matches_one_backbone_call_and_batches_frames(recorder: Recorder) -> None:
    result = run(recorder, None)
    assert recorder.extract_calls == [([0, 1], ALL_LAYERS), ([2, 3], ALL_LAYERS), ([4], ALL_LAYERS)]
    assert recorder.load_calls == [[0, 1], [2, 3], [4]]
    recorder.reset()
    reference = recorder.backbone.extract(
        recorder.frames,
        timestep=50,
        layers=ALL_LAYERS,
        ensemble_size=2,
        seed=0,
        sequence="seq",
        frame_indices=list(range(NUM_FRAMES)),
    )
    for layer in ALL_LAYERS:
        assert result[layer].shape == reference[layer].shape
        assert result[layer].shape[0] == NUM_FRAMES
        torch.testing.assert_close(result[layer], reference[layer], rtol=1e-5, atol=1e-6)


def test_result_is_keyed_by_the_layers_as_given(recorder: Recorder) -> None:
    result = run(recorder, None, layers=[0, "2", 2])
    assert list(result) == [0, "2", 2]
    assert torch.equal(result["2"], result[2])
    assert len(recorder.extract_calls) == 3 and all(layers == [0, 2] for _, layers in recorder.extract_calls)


def test_invalid_arguments_raise_config_errors(recorder: Recorder, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp64"):
        run(recorder, None, dtype="fp64")
    with pytest.raises(ConfigError, match="batch size"):
        run(recorder, None, batch_size=0)
    with pytest.raises(ConfigError, match="ensemble"):
        run(recorder, None, ensemble_size=0)
    with pytest.raises(ConfigError, match="up_ft9"):
        run(recorder, None, layers=["up_ft9"])
    with pytest.raises(ConfigError, match="5000"):
        run(recorder, None, timestep=5000)
    with pytest.raises(DataError, match="empty-seq"):
        run(recorder, None, sequence="empty-seq", frame_ids=[])
    with pytest.raises(ValueError, match="shape"):
        run(recorder, None, input_size=(64, 64))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ConfigError, match="file"):
        FeatureCache(not_a_folder)
    with pytest.raises(ConfigError, match="positive"):
        FeatureCache(tmp_path / "cache", max_bytes=0)
    with pytest.raises(ConfigError, match="fp8"):
        make_key(dtype="fp8")


# -- warm cache ------------------------------------------------------------------------------------------


def test_warm_cache_runs_no_backbone_and_reads_no_frames(recorder: Recorder, tmp_path: Path) -> None:
    uncached = run(recorder, None)
    recorder.reset()
    cache = FeatureCache(tmp_path / "cache")
    cold = run(recorder, cache)
    assert len(recorder.extract_calls) == 3
    assert cache.stats.misses == NUM_FRAMES * len(ALL_LAYERS) and cache.stats.hits == 0
    assert cache.info().entries == NUM_FRAMES * len(ALL_LAYERS)
    assert_same(cold, uncached)

    recorder.reset()
    warm_cache = FeatureCache(tmp_path / "cache")
    warm = run(recorder, warm_cache)
    assert recorder.extract_calls == [] and recorder.load_calls == []
    assert warm_cache.stats.hits == NUM_FRAMES * len(ALL_LAYERS) and warm_cache.stats.misses == 0
    assert_same(warm, cold)


def test_fp16_storage_is_close_and_warm_equals_cold(recorder: Recorder, tmp_path: Path) -> None:
    exact = run(recorder, None)
    cache = FeatureCache(tmp_path / "cache", fp16=True)
    recorder.reset()
    cold = run(recorder, cache)
    for layer in ALL_LAYERS:
        assert cold[layer].dtype == torch.float32
        torch.testing.assert_close(cold[layer], exact[layer], rtol=1e-3, atol=1e-6)
        assert not torch.equal(cold[layer], exact[layer]), "values should have been rounded through fp16"
    recorder.reset()
    warm = run(recorder, FeatureCache(tmp_path / "cache", fp16=True))
    assert recorder.extract_calls == []
    assert_same(warm, cold)

    # an fp32 cache over the same folder never serves the rounded entries
    recorder.reset()
    fp32_cache = FeatureCache(tmp_path / "cache")
    assert_same(run(recorder, fp32_cache), exact)
    assert len(recorder.extract_calls) == 3
    fp16_sizes = [p.stat().st_size for p in entry_files(tmp_path / "cache") if ".fp16." in p.name]
    fp32_sizes = [p.stat().st_size for p in entry_files(tmp_path / "cache") if ".fp32." in p.name]
    assert len(fp16_sizes) == len(fp32_sizes) == NUM_FRAMES * len(ALL_LAYERS)
    assert sum(fp16_sizes) < 0.6 * sum(fp32_sizes)


def test_layer_sweep_reuses_one_forward_pass(recorder: Recorder, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    together = run(recorder, cache, layers=ALL_LAYERS)
    assert len(recorder.extract_calls) == 3
    recorder.reset()
    for layer in [0, 1, 2, "2"]:
        alone = run(recorder, cache, layers=[layer])
        assert torch.equal(alone[layer], together[int(layer)])
    assert recorder.extract_calls == [] and recorder.load_calls == []


def test_only_missing_layers_are_computed(recorder: Recorder, tmp_path: Path) -> None:
    reference = run(recorder, None)
    recorder.reset()
    cache = FeatureCache(tmp_path / "cache")
    run(recorder, cache, layers=[2])
    recorder.reset()
    result = run(recorder, cache, layers=ALL_LAYERS)
    assert [layers for _, layers in recorder.extract_calls] == [[0, 1]] * 3
    assert_same(result, reference)


def test_only_frames_with_missing_entries_are_loaded(recorder: Recorder, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    cold = run(recorder, cache)
    ids = content_ids(recorder.frames)
    for index, layer in [(1, 0), (3, 2), (4, 1)]:
        key = make_key(
            backbone=recorder.backbone.identity(), layer=str(layer), frame=ids[index], frame_index=index
        )
        path = cache.path_for(key)
        assert path.is_file()
        path.unlink()
    recorder.reset()
    again = run(recorder, cache)
    assert recorder.load_calls == [[1, 3], [4]]
    assert recorder.extract_calls == [([1, 3], [0, 2]), ([4], [1])]
    assert_same(again, cold)


CHANGES: dict[str, dict[str, object]] = {
    "timestep": {"timestep": 51},
    "seed": {"seed": 1},
    "ensemble": {"ensemble_size": 3},
    "dtype": {"dtype": "bf16"},
    "sequence": {"sequence": "other-seq"},
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_setting_is_a_miss(recorder: Recorder, tmp_path: Path, change: str) -> None:
    cache = FeatureCache(tmp_path / "cache")
    run(recorder, cache)
    recorder.reset()
    run(recorder, cache)
    assert recorder.extract_calls == [], "control: unchanged settings hit"
    run(recorder, cache, **CHANGES[change])
    assert sorted(recorder.computed_frames()) == list(range(NUM_FRAMES))


def test_changed_input_size_is_a_miss(recorder: Recorder, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    run(recorder, cache)
    taller = Recorder(recorder.backbone, make_frames(height=HEIGHT + 8))
    # same content identities, different network input size
    run(taller, cache, frame_ids=content_ids(recorder.frames))
    assert sorted(taller.computed_frames()) == list(range(NUM_FRAMES))


def test_changed_backbone_identity_is_a_miss(recorder: Recorder, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    run(recorder, cache)
    other = Recorder(load_backbone("random-conv", device="cpu", init_seed=1), recorder.frames)
    assert other.backbone.identity() != recorder.backbone.identity()
    run(other, cache)
    assert sorted(other.computed_frames()) == list(range(NUM_FRAMES))


def test_changed_frame_content_recomputes_that_frame(recorder: Recorder, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    run(recorder, cache)
    edited = recorder.frames.clone()
    edited[2] = -edited[2]
    changed = Recorder(recorder.backbone, edited)
    result = run(changed, cache)
    assert changed.computed_frames() == [2] and changed.load_calls == [[2]]
    reference = run(Recorder(load_backbone("random-conv", device="cpu"), edited), None)
    assert_same(result, reference)


def test_duplicate_frames_at_other_positions_do_not_share_entries(recorder: Recorder, tmp_path: Path) -> None:
    """Noise is seeded by frame index, so identical content at two positions gives different features."""
    frames = recorder.frames.clone()
    frames[3] = frames[1]
    duplicated = Recorder(recorder.backbone, frames)
    cold = run(duplicated, FeatureCache(tmp_path / "cache"))
    assert not torch.equal(cold[0][1], cold[0][3])
    duplicated.reset()
    warm = run(duplicated, FeatureCache(tmp_path / "cache"))
    assert duplicated.extract_calls == []
    assert_same(warm, cold)


# -- keys ------------------------------------------------------------------------------------------------


def test_feature_key_digest_is_stable_and_covers_every_field() -> None:
    key = make_key()
    assert key.digest() == make_key().digest()
    assert len(key.digest()) == 64 and int(key.digest(), 16) >= 0
    # layer keys and sizes given as int/list mean the same entry as their canonical forms
    assert make_key(layer=1).digest() == key.digest()
    assert make_key(input_size=[HEIGHT, WIDTH]).digest() == key.digest()
    variants = {
        "backbone": "random-conv/width=32/init_seed=1",
        "timestep": 51,
        "layer": "2",
        "ensemble_size": 3,
        "seed": 1,
        "input_size": (WIDTH, HEIGHT),
        "dtype": "bf16",
        "frame": "cd" * 32,
        "sequence": "other",
        "frame_index": 1,
    }
    digests = {key.digest()}
    for name, value in variants.items():
        changed = replace(key, **{name: value})
        digests.add(changed.digest())
    assert len(digests) == len(variants) + 1


# -- corruption ------------------------------------------------------------------------------------------


def warm_cache_and_key(
    recorder: Recorder, root: Path, frame: int = 2, layer: int = 1
) -> tuple[FeatureCache, FeatureKey]:
    cache = FeatureCache(root)
    run(recorder, cache)
    key = make_key(
        backbone=recorder.backbone.identity(),
        layer=str(layer),
        frame=content_ids(recorder.frames)[frame],
        frame_index=frame,
    )
    assert cache.path_for(key).is_file()
    return cache, key


def test_truncated_entry_is_detected_and_recomputed(recorder: Recorder, tmp_path: Path) -> None:
    cache, key = warm_cache_and_key(recorder, tmp_path / "cache")
    reference = run(recorder, None)
    path = cache.path_for(key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    recorder.reset()
    fresh = FeatureCache(tmp_path / "cache")
    result = run(recorder, fresh)
    assert fresh.stats.corrupt == 1
    assert recorder.extract_calls == [([2], [1])]
    assert_same(result, reference)
    rewritten = fresh.get(key)
    assert rewritten is not None and torch.equal(rewritten, reference[1][2]), "the entry was rewritten"


@pytest.mark.parametrize("damage", ["overwrite-data", "overwrite-header", "garbage", "empty"])
def test_damaged_entry_is_a_deleted_miss(recorder: Recorder, tmp_path: Path, damage: str) -> None:
    cache, key = warm_cache_and_key(recorder, tmp_path / "cache")
    path = cache.path_for(key)
    data = bytearray(path.read_bytes())
    if damage == "overwrite-data":
        data[-16:] = bytes(byte ^ 0xFF for byte in data[-16:])
    elif damage == "overwrite-header":
        data[8:24] = b"\x00" * 16
    elif damage == "garbage":
        data = bytearray(b"this is not a safetensors file")
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    fresh = FeatureCache(tmp_path / "cache")
    assert fresh.get(key) is None
    assert fresh.stats.corrupt == 1 and fresh.stats.misses == 1
    assert not path.exists()


def test_entry_of_another_key_is_detected(recorder: Recorder, tmp_path: Path) -> None:
    cache, key = warm_cache_and_key(recorder, tmp_path / "cache", frame=2)
    other_key = replace(key, frame=content_ids(recorder.frames)[3], frame_index=3)
    shutil.copyfile(cache.path_for(other_key), cache.path_for(key))
    fresh = FeatureCache(tmp_path / "cache")
    assert fresh.get(key) is None
    assert fresh.stats.corrupt == 1
    assert fresh.get(other_key) is not None and fresh.stats.hits == 1


def test_wrong_tensor_shape_or_dtype_is_detected(recorder: Recorder, tmp_path: Path) -> None:
    cache, key = warm_cache_and_key(recorder, tmp_path / "cache")
    path = cache.path_for(key)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    for bad in [torch.zeros(4, 5), torch.zeros(2, 4, 5, dtype=torch.float64)]:
        save_file({"features": bad}, str(path), metadata=metadata)
        fresh = FeatureCache(tmp_path / "cache")
        assert fresh.get(key) is None and fresh.stats.corrupt == 1


def test_get_of_absent_key_is_a_plain_miss(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    assert cache.get(make_key()) is None
    assert (cache.stats.misses, cache.stats.corrupt, cache.stats.hits) == (1, 0, 0)
    assert not (tmp_path / "cache").exists(), "lookups do not create folders"


def test_put_rejects_non_feature_maps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        FeatureCache(tmp_path / "cache").put(make_key(), torch.zeros(4, 5))


# -- atomic writes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["replace", "fsync", "serialize"])
def test_crash_during_put_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    key = make_key()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash")

    if failing == "serialize":
        monkeypatch.setattr(cache_module, "serialize_tensors", crash)
    else:
        monkeypatch.setattr(cache_module.os, failing, crash)
    with pytest.raises(OSError, match="simulated crash"):
        cache.put(key, torch.ones(2, 3, 4))
    monkeypatch.undo()
    assert not cache.path_for(key).exists()
    assert entry_files(tmp_path) == []
    assert cache.get(key) is None and cache.stats.corrupt == 0
    cache.put(key, torch.ones(2, 3, 4))
    got = cache.get(key)
    assert got is not None and torch.equal(got, torch.ones(2, 3, 4))


def test_put_writes_one_safetensors_file_with_the_key_in_its_metadata(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    key = make_key()
    features = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    cache.put(key, features)
    digest = key.digest()
    files = entry_files(tmp_path / "cache")
    assert len(files) == 1
    assert files[0].parent.name == digest[:2] and files[0].name.startswith(digest)
    assert files[0].suffix == ".safetensors"
    assert torch.equal(load_file(str(files[0]))["features"], features)
    with safe_open(str(files[0]), framework="pt") as handle:
        assert json.loads(handle.metadata()["key"]) == key.fields()


# -- size cap --------------------------------------------------------------------------------------------


def test_least_recently_used_entry_is_evicted_first(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    keys = {name: make_key(frame=name * 64) for name in "abcde"}
    unbounded = FeatureCache(root)
    for name in "abc":
        unbounded.put(keys[name], torch.full((4, 8, 8), float(ord(name))))
    size = unbounded.path_for(keys["a"]).stat().st_size
    now = time.time()
    for age, name in [(300, "a"), (200, "b"), (100, "c")]:
        os.utime(unbounded.path_for(keys[name]), (now - age, now - age))

    cache = FeatureCache(root, max_bytes=int(3.5 * size))
    assert cache.get(keys["a"]) is not None  # "a" becomes the most recently used of a, b, c
    cache.put(keys["d"], torch.zeros(4, 8, 8))
    assert not cache.path_for(keys["b"]).exists()
    assert all(cache.path_for(keys[name]).exists() for name in "acd")
    assert cache.stats.evicted == 1

    cache.put(keys["e"], torch.zeros(4, 8, 8))
    assert not cache.path_for(keys["c"]).exists()
    assert all(cache.path_for(keys[name]).exists() for name in "ade")
    assert cache.stats.evicted == 2
    assert cache.info().total_bytes <= 3.5 * size


def test_entry_larger_than_cap_is_kept_until_the_next_put(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache", max_bytes=10)
    cache.put(make_key(frame="a"), torch.zeros(4, 8, 8))
    assert cache.get(make_key(frame="a")) is not None
    cache.put(make_key(frame="b"), torch.zeros(4, 8, 8))
    assert cache.get(make_key(frame="a")) is None
    assert cache.get(make_key(frame="b")) is not None


def test_size_cap_does_not_scan_the_folder_on_every_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path / "cache", max_bytes=1 << 30)
    scans: list[int] = []
    original_scan = cache._scan

    def counting_scan(**kwargs: bool) -> list:
        scans.append(1)
        return original_scan(**kwargs)

    monkeypatch.setattr(cache, "_scan", counting_scan)
    puts = cache_module.SCAN_EVERY_PUTS + 5
    for index in range(puts):
        cache.put(make_key(frame_index=index), torch.zeros(1, 2, 2))
    # one scan to learn the folder's size, one after SCAN_EVERY_PUTS puts (other processes add entries too)
    assert len(scans) == 2
    assert cache.info().entries == puts


def test_eviction_tolerates_entries_vanishing_and_removes_stale_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = FeatureCache(root, max_bytes=1)
    cache.put(make_key(frame="a"), torch.zeros(1, 2, 2))
    shard = cache.path_for(make_key(frame="a")).parent
    # a dangling link behaves like an entry another process deleted between listing and stat
    (shard / f"{'0' * 64}.fp32.safetensors").symlink_to(tmp_path / "gone")
    stale = shard / ".tmp-stale.part"
    stale.write_bytes(b"half an entry")
    old = time.time() - 2 * cache_module.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    fresh_temp = shard / ".tmp-writing.part"
    fresh_temp.write_bytes(b"another process is writing this")
    cache.put(make_key(frame="b"), torch.zeros(1, 2, 2))
    assert not stale.exists(), "temp files of killed writers are cleaned up"
    assert fresh_temp.exists(), "a temp file being written right now is left alone"
    assert cache.get(make_key(frame="b")) is not None
    assert cache.info().entries == 1


# -- info / clear / helpers ------------------------------------------------------------------------------


def test_info_and_clear(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = FeatureCache(root, max_bytes=1 << 20)
    assert cache.info() == CacheInfo(root=root, entries=0, total_bytes=0, max_bytes=1 << 20)
    assert cache.clear() == 0
    assert not root.exists()
    for index in range(4):
        cache.put(make_key(frame_index=index), torch.zeros(2, 4, 4))
    (root / "aa").mkdir(exist_ok=True)
    (root / "aa" / ".tmp-left-over.part").write_bytes(b"x")
    info = cache.info()
    sizes = [p.stat().st_size for p in entry_files(root) if p.suffix == ".safetensors"]
    assert info.entries == 4 and info.total_bytes == sum(sizes)
    text = format_cache_info(info)
    assert str(root) in text and "entries: 4" in text and format_bytes(sum(sizes)) in text
    assert "1.0 MiB" in text
    assert "cap: none" in format_cache_info(replace(info, max_bytes=None))
    assert cache.clear() == 4
    assert cache.info().entries == 0
    assert entry_files(root) == []


def test_format_bytes_uses_binary_units() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 * 1024**2) == "5.0 MiB"
    assert format_bytes(3 * 1024**3 + 1024**3 // 4) == "3.2 GiB"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DIFFVOS_CACHE_DIR", raising=False)
    assert default_cache_dir() == Path("cache/features")
    monkeypatch.setenv("DIFFVOS_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"


def test_frame_identity_hashes_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "00000.jpg"
    payload = bytes(range(256)) * 5000
    path.write_bytes(payload)
    assert frame_identity(path) == hashlib.sha256(payload).hexdigest()
    copy = tmp_path / "renamed.jpg"
    copy.write_bytes(payload)
    assert frame_identity(copy) == frame_identity(path)
    with pytest.raises(DataError, match="missing.jpg"):
        frame_identity(tmp_path / "missing.jpg")


# -- several processes -----------------------------------------------------------------------------------


CONCURRENT_FRAMES = 12


def fill_cache_worker(root: str, out_file: str, barrier: object) -> None:
    """Runs in a spawned process: a cold extraction into the shared cache, results saved for comparison."""
    torch.set_num_threads(1)
    recorder = Recorder(load_backbone("random-conv", device="cpu"), make_frames(CONCURRENT_FRAMES))
    barrier.wait()  # type: ignore[attr-defined]
    result = run(recorder, FeatureCache(Path(root)), batch_size=1)
    save_file({str(layer): tensor for layer, tensor in result.items()}, out_file)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as in the workers, so that every process sums in the same order; restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("one_thread")
def test_two_processes_fill_one_cache(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    outputs = [tmp_path / f"worker{i}.safetensors" for i in range(2)]
    workers = [
        context.Process(target=fill_cache_worker, args=(str(root), str(out), barrier)) for out in outputs
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()

    recorder = Recorder(load_backbone("random-conv", device="cpu"), make_frames(CONCURRENT_FRAMES))
    single = run(recorder, None, batch_size=1)
    recorder.reset()
    shared = FeatureCache(root)
    from_cache = run(recorder, shared, batch_size=1)
    assert recorder.extract_calls == [] and shared.stats.corrupt == 0
    assert shared.stats.hits == CONCURRENT_FRAMES * len(ALL_LAYERS)
    assert_same(from_cache, single)
    for out in outputs:
        saved = load_file(str(out))
        assert_same({int(layer): tensor for layer, tensor in saved.items()}, single)
    assert not [p for p in root.rglob(".tmp-*")], "no temp files left behind"
