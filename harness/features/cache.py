"""An on-disk cache of backbone features, one safetensors file per (frame, layer) entry.

Features depend only on what :class:`FeatureKey` records, so a sweep that changes only propagation settings
never runs the network twice, and a layer sweep reuses every layer that one forward pass produced.

Several worker processes may share one cache folder: every entry is written to a temporary file in its
final folder and moved into place with ``os.replace``, so a reader sees either no entry or a whole one, and
concurrent writers of the same key (identical content) simply replace each other. Eviction and scans
tolerate files that another process deletes under them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_tensors

from harness.errors import ConfigError, DataError

DTYPES = ("fp32", "bf16", "fp16")
#: version tag stored in every entry; bump it when the entry layout changes
ENTRY_FORMAT = "diffvos-features/1"
TENSOR_NAME = "features"
ENTRY_SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
#: re-count the folder after this many puts even if the running estimate stays under the cap, because
#: other processes sharing the folder add entries this process does not see
SCAN_EVERY_PUTS = 64
#: eviction frees space down to this fraction of the cap so that the next puts do not each trigger a scan
EVICT_TO_FRACTION = 0.9
#: temporary files older than this are left over from killed writers and are removed by scans
STALE_TEMP_SECONDS = 3600.0
ENV_CACHE_DIR = "DIFFVOS_CACHE_DIR"

_STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def default_cache_dir() -> Path:
    """``$DIFFVOS_CACHE_DIR`` when set, else ``./cache/features`` (relative to the working directory)."""
    configured = os.environ.get(ENV_CACHE_DIR, "").strip()
    return Path(configured).expanduser() if configured else Path("cache") / "features"


def frame_identity(path: Path) -> str:
    """sha256 of a frame file's bytes: identifies its content whatever its name or folder.

    Hashing a JPEG costs far less than decoding it, let alone running a UNet on it.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise DataError(f"cannot read frame {path}: {error.strerror or error}") from error
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureKey:
    """Everything a cached feature map depends on.

    ``sequence`` and ``frame_index`` matter because backbones seed each frame's noise from
    (seed, sequence, frame index): two frames with the same content but different positions get different
    noise, so they must not share an entry.
    """

    backbone: str
    timestep: int
    layer: str
    ensemble_size: int
    seed: int
    input_size: tuple[int, int]
    dtype: str
    frame: str
    sequence: str = ""
    frame_index: int = -1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"feature dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "input_size", tuple(int(side) for side in self.input_size))
        if len(self.input_size) != 2:
            raise ConfigError(f"input size must be (height, width), got {self.input_size!r}")
        object.__setattr__(self, "layer", str(self.layer))

    def fields(self) -> dict[str, object]:
        """The key as JSON-ready values (input size as a list)."""
        values = asdict(self)
        values["input_size"] = list(self.input_size)
        return values

    def canonical_json(self) -> str:
        return json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """sha256 of the key's canonical JSON: the same in every process and Python version."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    """Counters for one process's use of a cache. A corrupt entry counts both as corrupt and as a miss."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evicted: int = 0


@dataclass(frozen=True)
class CacheInfo:
    root: Path
    entries: int
    total_bytes: int
    max_bytes: int | None


@dataclass(frozen=True)
class _EntryFile:
    path: Path
    size: int
    last_used: float


class _CorruptEntry(Exception):
    """Raised inside :meth:`FeatureCache.get` when an entry exists but cannot be trusted."""


class FeatureCache:
    """Feature maps on disk, keyed by :class:`FeatureKey`, with an optional least-recently-used size cap.

    ``fp16=True`` stores entries as float16 (half the disk and read time); they are returned as float32.
    Entries of the two precisions have different file names, so an fp32 cache never serves rounded values.
    """

    def __init__(self, root: Path, *, max_bytes: int | None = None, fp16: bool = False) -> None:
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"feature cache folder {root} exists and is not a folder")
        if max_bytes is not None and max_bytes <= 0:
            raise ConfigError(f"feature cache size cap must be positive, got {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        self.fp16 = fp16
        self.stats = CacheStats()
        self._storage = "fp16" if fp16 else "fp32"
        self._estimated_bytes: int | None = None
        self._puts_since_scan = 0

    # -- entries ---------------------------------------------------------------------------------------

    def path_for(self, key: FeatureKey) -> Path:
        """Where the entry for ``key`` lives: ``root/<2 hex>/<digest>.<fp32|fp16>.safetensors``."""
        digest = key.digest()
        return self.root / digest[:2] / f"{digest}.{self._storage}{ENTRY_SUFFIX}"

    def get(self, key: FeatureKey) -> torch.Tensor | None:
        """(C, h, w) float32 features of ``key``; None when absent or corrupt (a corrupt file is deleted)."""
        path = self.path_for(key)
        try:
            features = self._read_entry(path, key)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except _CorruptEntry:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # e.g. a read-only shared cache: still a miss, and put will report the real problem
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        try:
            os.utime(path)  # mark as recently used for LRU eviction; atime is unreliable (noatime mounts)
        except FileNotFoundError:
            pass  # evicted by another process after we read it; the data we hold is still valid
        return features

    def put(self, key: FeatureKey, features: torch.Tensor) -> None:
        """Store (C, h, w) features atomically, then evict least-recently-used entries if over the cap."""
        if features.ndim != 3:
            raise ValueError(f"cache entries are (C, h, w) feature maps, got shape {tuple(features.shape)}")
        tensor = features.detach().to("cpu", _STORAGE_DTYPES[self._storage]).contiguous()
        metadata = {
            "format": ENTRY_FORMAT,
            "key": key.canonical_json(),
            "storage": self._storage,
            "crc32": str(_checksum(tensor)),
        }
        data = serialize_tensors({TENSOR_NAME: tensor}, metadata=metadata)
        path = self.path_for(key)
        _write_atomically(path, data)
        self._after_put(path, len(data))

    def _read_entry(self, path: Path, key: FeatureKey) -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = list(handle.keys())
                if names != [TENSOR_NAME]:
                    raise _CorruptEntry(f"{path}: unexpected tensors {names}")
                tensor = handle.get_tensor(TENSOR_NAME)
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise _CorruptEntry(f"{path}: {error}") from error
        if metadata.get("format") != ENTRY_FORMAT or metadata.get("storage") != self._storage:
            raise _CorruptEntry(f"{path}: unknown entry format")
        if metadata.get("key") != key.canonical_json():
            raise _CorruptEntry(f"{path}: entry belongs to another key")
        if tensor.ndim != 3 or tensor.dtype != _STORAGE_DTYPES[self._storage]:
            raise _CorruptEntry(f"{path}: bad tensor {tensor.dtype} {tuple(tensor.shape)}")
        if metadata.get("crc32") != str(_checksum(tensor)):
            raise _CorruptEntry(f"{path}: checksum mismatch")
        return tensor.float()

    # -- size cap --------------------------------------------------------------------------------------

    def _after_put(self, path: Path, size: int) -> None:
        if self.max_bytes is None:
            return
        if self._estimated_bytes is None:
            self._estimated_bytes = sum(entry.size for entry in self._scan())
        else:
            self._estimated_bytes += size
        self._puts_since_scan += 1
        if self._estimated_bytes > self.max_bytes or self._puts_since_scan >= SCAN_EVERY_PUTS:
            self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        """Delete least-recently-used entries until under the cap; never ``keep``, the entry just written."""
        assert self.max_bytes is not None
        entries = self._scan(remove_stale_temps=True)
        total = sum(entry.size for entry in entries)
        if total > self.max_bytes:
            target = int(self.max_bytes * EVICT_TO_FRACTION)
            for entry in sorted(entries, key=lambda e: (e.last_used, str(e.path))):
                if total <= target:
                    break
                if entry.path == keep:
                    continue
                try:
                    entry.path.unlink()
                    self.stats.evicted += 1
                except FileNotFoundError:
                    pass  # another process evicted it first; its bytes are gone either way
                total -= entry.size
        self._estimated_bytes = total
        self._puts_since_scan = 0

    def _scan(self, *, remove_stale_temps: bool = False) -> list[_EntryFile]:
        """All entry files with size and last use; files that vanish during the scan are skipped."""
        entries: list[_EntryFile] = []
        if not self.root.is_dir():
            return entries
        now = time.time()
        for shard in _scandir(self.root):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for item in _scandir(Path(shard.path)):
                try:
                    stat = item.stat()
                except FileNotFoundError:
                    continue
                if item.name.startswith(TEMP_PREFIX):
                    if remove_stale_temps and now - stat.st_mtime > STALE_TEMP_SECONDS:
                        Path(item.path).unlink(missing_ok=True)
                    continue
                if item.name.endswith(ENTRY_SUFFIX):
                    entries.append(_EntryFile(Path(item.path), stat.st_size, stat.st_mtime))
        return entries

    # -- maintenance -----------------------------------------------------------------------------------

    def info(self) -> CacheInfo:
        entries = self._scan()
        total = sum(entry.size for entry in entries)
        self._estimated_bytes = total
        return CacheInfo(root=self.root, entries=len(entries), total_bytes=total, max_bytes=self.max_bytes)

    def clear(self) -> int:
        """Delete every entry (and leftover temporary files); returns the number of entries removed."""
        removed = 0
        if self.root.is_dir():
            for shard in _scandir(self.root):
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for item in _scandir(Path(shard.path)):
                    is_entry = item.name.endswith(ENTRY_SUFFIX) and not item.name.startswith(TEMP_PREFIX)
                    if not (is_entry or item.name.startswith(TEMP_PREFIX)):
                        continue
                    try:
                        os.unlink(item.path)
                    except FileNotFoundError:
                        continue
                    removed += is_entry
                try:
                    os.rmdir(shard.path)
                except OSError:
                    pass  # not empty (foreign files, or another process just wrote into it)
        self._estimated_bytes = 0
        self._puts_since_scan = 0
        return removed


def format_bytes(count: int) -> str:
    """Binary units with one decimal: 1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_cache_info(info: CacheInfo) -> str:
    """A few lines for ``harness cache info``."""
    if info.max_bytes is None:
        cap = "none"
    else:
        cap = f"{format_bytes(info.max_bytes)} ({100 * info.total_bytes / info.max_bytes:.0f}% used)"
    return "\n".join(
        [
            f"feature cache: {info.root}",
            f"entries: {info.entries}",
            f"size: {format_bytes(info.total_bytes)}",
            f"cap: {cap}",
        ]
    )


def _checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of the raw tensor bytes: catches bit rot and overwritten data that the format cannot see."""
    raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
    return zlib.crc32(memoryview(raw))


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, ``os.replace``: the final name only ever holds whole files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".part")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as iterator:
            return list(iterator)
    except (FileNotFoundError, NotADirectoryError):
        return []


__all__ = [
    "DTYPES",
    "CacheInfo",
    "CacheStats",
    "FeatureCache",
    "FeatureKey",
    "default_cache_dir",
    "format_bytes",
    "format_cache_info",
    "frame_identity",
]
