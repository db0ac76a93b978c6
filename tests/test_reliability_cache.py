"""The feature cache only ever touches files it wrote, cleans up after killed writers, reports its cap and
size per backbone / time step / layer, and writes files other users can read (issues #13, #15)."""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import harness.features.cache as cache_module
from harness.cli import main
from harness.config import RunConfig
from harness.errors import ConfigError
from harness.features import FeatureCache, FeatureKey, default_max_bytes
from harness.pipeline import build_cache, run


def make_key(**overrides: object) -> FeatureKey:
    fields: dict[str, object] = {
        "backbone": "random-conv/v1",
        "timestep": 0,
        "layer": "2",
        "ensemble_size": 1,
        "seed": 0,
        "input_size": (8, 8),
        "dtype": "fp32",
        "frame": "f" * 64,
    }
    return FeatureKey(**(fields | overrides))  # type: ignore[arg-type]


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _model_folder(root: Path) -> Path:
    """What a diffusers model folder looks like to a glob for */*.safetensors."""
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"precious weights")
    return weights


def test_clear_refuses_a_folder_without_the_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = _model_folder(tmp_path / "model")
    with pytest.raises(ConfigError, match="not a feature cache"):
        FeatureCache(tmp_path / "model").clear()
    assert main(["cache", "clear", "--dir", str(tmp_path / "model")]) == 2
    assert "refusing to clear" in capsys.readouterr().err
    assert weights.read_bytes() == b"precious weights"


def test_a_folder_with_foreign_files_is_not_used_as_a_cache(tmp_path: Path) -> None:
    weights = _model_folder(tmp_path / "model")
    with pytest.raises(ConfigError, match="did not write"):
        FeatureCache(tmp_path / "model", max_bytes=1).put(make_key(), torch.zeros(1, 2, 2))
    assert sorted(p.name for p in (tmp_path / "model").rglob("*")) == [
        "diffusion_pytorch_model.safetensors",
        "unet",
    ]
    assert weights.read_bytes() == b"precious weights"


def test_size_cap_and_clear_only_delete_entries_the_cache_wrote(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = FeatureCache(root, max_bytes=1)
    cache.put(make_key(frame_index=0), torch.zeros(4, 8, 8))
    shard = cache.path_for(make_key(frame_index=0)).parent
    foreign = [shard / "model.safetensors", root / "zz" / "weights.safetensors", root / "notes.txt"]
    for path in foreign:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not the cache's")
    old = time.time() - 1000
    for path in foreign:
        os.utime(path, (old, old))  # least recently used: the first the cap would take
    for index in range(1, 4):
        cache.put(make_key(frame_index=index), torch.zeros(4, 8, 8))
    assert cache.stats.evicted == 3
    assert cache.info().entries == 1
    assert cache.clear() == 1
    assert all(path.read_bytes() == b"not the cache's" for path in foreign)
    assert (root / cache_module.MARKER_NAME).is_file()


def test_a_cache_written_before_markers_is_adopted(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    FeatureCache(root).put(make_key(), torch.ones(2, 2, 2))
    (root / cache_module.MARKER_NAME).unlink()
    cache = FeatureCache(root)
    assert cache.get(make_key()) is not None
    cache.put(make_key(frame_index=1), torch.ones(2, 2, 2))
    assert (root / cache_module.MARKER_NAME).is_file()
    assert cache.clear() == 2


def test_stale_temp_files_are_counted_and_removed_on_start(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "cache"
    cache = FeatureCache(root)
    cache.put(make_key(), torch.ones(2, 2, 2))
    shard = cache.path_for(make_key()).parent
    stale, fresh = shard / ".tmp-killed.part", shard / ".tmp-writing.part"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 10)
    old = time.time() - 2 * cache_module.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    info = cache.info()
    assert (info.temp_files, info.temp_bytes) == (2, 110)
    assert main(["cache", "info", "--dir", str(root)]) == 0
    assert "temporary files: 2 (110 B" in capsys.readouterr().out
    config = RunConfig().with_overrides({"cache.dir": str(root)})
    assert build_cache(config) is not None  # a run's start
    assert not stale.exists() and fresh.exists()
    assert cache.info().temp_files == 1


def test_cache_info_shows_the_configured_or_default_cap_and_a_breakdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    cache = FeatureCache(root)
    for timestep, layer, count in [(30, "6", 3), (50, "6", 1), (30, "4", 2)]:
        for index in range(count):
            cache.put(
                make_key(backbone="adm/x", timestep=timestep, layer=layer, frame_index=index),
                torch.ones(1, 2, 2),
            )
    size = cache.path_for(make_key(backbone="adm/x", timestep=30, layer="6", frame_index=0)).stat().st_size
    groups = {
        (g.backbone, g.timestep, g.layer): (g.entries, g.total_bytes)
        for g in cache.info(breakdown=True).groups
    }
    assert groups == {
        ("adm/x", 30, "4"): (2, 2 * size),
        ("adm/x", 30, "6"): (3, 3 * size),
        ("adm/x", 50, "6"): (1, size),
    }

    config = tmp_path / "run.yaml"
    config.write_text(f"cache: {{dir: {root}, max_gb: 2}}\n")
    assert main(["cache", "info", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "cap: 2.0 GiB" in out and "cache.max_gb" in out
    rows = [line.split() for line in out.splitlines()]
    assert ["adm/x", "30", "6", "3"] in [row[:4] for row in rows]

    usage = shutil.disk_usage(tmp_path)._replace(free=10 * 1024**3)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage)
    assert main(["cache", "info", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cap: 5.0 GiB" in out and "default" in out


def test_default_cap_is_half_of_cache_plus_free_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []
    free = 8 * 1024**3
    real = shutil.disk_usage(tmp_path)

    def usage(path: Path):
        seen.append(Path(path))
        return real._replace(free=free)

    monkeypatch.setattr(cache_module.shutil, "disk_usage", usage)
    root = tmp_path / "not" / "yet" / "there"
    assert default_max_bytes(root) == free // 2
    assert seen[-1] == tmp_path  # the nearest folder that exists
    cache = FeatureCache(root)
    cache.put(make_key(), torch.zeros(16, 8, 8))
    held = cache.info().total_bytes
    assert default_max_bytes(root) == (free + held) // 2
    config = RunConfig().with_overrides({"cache.dir": str(root)})
    built = build_cache(config)
    assert built is not None and built.max_bytes == (free + held) // 2


def test_files_and_folders_follow_the_umask(synth_root: Path, tmp_path: Path, umask_022: None) -> None:
    config = RunConfig().with_overrides(
        {
            "dataset.root": str(synth_root),
            "dataset.sequences": ["synth-reenter"],
            "input.short_side": 64,
            "cache.dir": str(tmp_path / "cache"),
            "output_dir": str(tmp_path / "run"),
            "progress": False,
        }
    )
    run(config)
    os.umask(0o027)
    run(config.with_overrides({"output_dir": str(tmp_path / "group")}))

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    run_dir = tmp_path / "run"
    for path in [run_dir / "predictions", run_dir / "predictions" / "synth-reenter"]:
        assert mode(path) == 0o755, path
    for path in [run_dir / "config.yaml", run_dir / "global_results-val.csv", *run_dir.rglob("*.png")]:
        assert mode(path) == 0o644, path
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert entries and all(mode(path) == 0o644 for path in entries)
    assert all(mode(path.parent) == 0o755 for path in entries)
    group = tmp_path / "group"
    assert mode(group / "predictions") == 0o750
    assert mode(group / "per-frame_results-val.csv") == 0o640
