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
import re
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_tensors

from harness.errors import ConfigError, DataError
from harness.files import mkstemp_shared

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
#: temporary files older than this are left over from killed writers; scans and prepare() remove them
STALE_TEMP_SECONDS = 3 * 3600.0
ENV_CACHE_DIR = "DIFFVOS_CACHE_DIR"
#: written at the root of every cache folder; clear() refuses folders without it
MARKER_NAME = ".diffvos-feature-cache"
MARKER_TEXT = "This folder is a diffvos-harness feature cache; `harness cache clear` may empty it.\n"
#: the only files the cache ever deletes: entries ``<2 hex>/<64 hex>.<fp32|fp16>.safetensors`` and temps
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.(fp32|fp16)\.safetensors")
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")
_TEMP_NAME = re.compile(r"\.tmp-[^/]*\.part")
#: the default cap is this fraction of what the cache could hold: its size now plus the free disk
DEFAULT_CAP_FRACTION = 0.5

_STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def default_cache_dir() -> Path:
    """``$DIFFVOS_CACHE_DIR`` when set, else ``./cache/features`` (relative to the working directory)."""
    configured = os.environ.get(ENV_CACHE_DIR, "").strip()
    return Path(configured).expanduser() if configured else Path("cache") / "features"


def default_max_bytes(root: Path) -> int:
    """The default size cap of a cache at ``root``: half of (its current size + the free disk space).

    Half, so that the cache never takes the last of the disk from the predictions, logs and other users
    of the file system; counting its current size keeps a full cache from shrinking its own cap. The
    free space is read on the nearest existing folder of ``root``. Sweep pre-flights call this too.
    """
    root = Path(root)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    current = sum(entry.size for entry in FeatureCache(root)._scan()) if root.is_dir() else 0
    return max(1, int(DEFAULT_CAP_FRACTION * (free + current)))


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
class CacheGroup:
    """The entries of one (backbone, time step, layer) in a cache."""

    backbone: str
    timestep: int
    layer: str
    entries: int
    total_bytes: int


@dataclass(frozen=True)
class CacheInfo:
    root: Path
    entries: int
    total_bytes: int
    max_bytes: int | None
    #: temporary files of writers (of killed ones when old), and their bytes
    temp_files: int = 0
    temp_bytes: int = 0
    #: size by backbone, time step and layer (only when asked for: it reads every entry's header)
    groups: tuple[CacheGroup, ...] = ()
    #: where ``max_bytes`` comes from, for display (e.g. "cache.max_gb", "default")
    cap_source: str = ""


class CacheNotWritableError(ConfigError):
    """The cache folder cannot be created or written (a run then goes on without a cache)."""


@dataclass(frozen=True)
class _EntryFile:
    path: Path
    size: int
    last_used: float


@dataclass(frozen=True)
class _TempFile:
    path: Path
    size: int
    modified: float


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
        self._claimed = False

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
        if not self._claimed:
            self._claim()
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

    # -- ownership -------------------------------------------------------------------------------------

    @property
    def marker(self) -> Path:
        return self.root / MARKER_NAME

    def prepare(self) -> int:
        """Make the folder a cache (marker) and remove temp files of killed writers; returns how many.

        Called once at the start of a run. CacheNotWritableError when the folder cannot be written.
        """
        self._claim()
        removed = 0
        for temp in self._scan_temps():
            if time.time() - temp.modified > STALE_TEMP_SECONDS:
                temp.path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _claim(self) -> None:
        """Write the marker into a new or empty folder, or into a cache written before markers existed.

        A folder that holds anything else (model weights, a dataset, ...) is refused: the cache deletes
        files there and must never touch ones it did not write.
        """
        if self.marker.is_file():
            self._claimed = True
            return
        if self.root.is_dir() and not self._holds_only_cache_files():
            raise ConfigError(
                f"feature cache folder {self.root} holds files the cache did not write and has no "
                f"{MARKER_NAME} marker; set cache.dir to an empty or new folder"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(MARKER_TEXT)
        except OSError as error:
            raise CacheNotWritableError(
                f"feature cache folder {self.root} cannot be written: {error.strerror or error}"
            ) from error
        self._claimed = True

    def _holds_only_cache_files(self) -> bool:
        for item in _scandir(self.root):
            if item.name == MARKER_NAME:
                continue
            if not (item.is_dir(follow_symlinks=False) and _SHARD_NAME.fullmatch(item.name)):
                return False
            for inner in _scandir(Path(item.path)):
                if not (_is_entry_name(inner.name, item.name) or _TEMP_NAME.fullmatch(inner.name)):
                    return False
        return True

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
        for shard in self._shards():
            for item in _scandir(Path(shard.path)):
                if _TEMP_NAME.fullmatch(item.name):
                    if remove_stale_temps:
                        try:
                            if now - item.stat().st_mtime > STALE_TEMP_SECONDS:
                                Path(item.path).unlink(missing_ok=True)
                        except FileNotFoundError:
                            pass
                    continue
                if not _is_entry_name(item.name, shard.name):
                    continue  # not a file the cache wrote: never counted, never deleted
                try:
                    stat = item.stat()
                except FileNotFoundError:
                    continue
                entries.append(_EntryFile(Path(item.path), stat.st_size, stat.st_mtime))
        return entries

    def _scan_temps(self) -> list[_TempFile]:
        temps = []
        for shard in self._shards():
            for item in _scandir(Path(shard.path)):
                if _TEMP_NAME.fullmatch(item.name):
                    try:
                        stat = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    temps.append(_TempFile(Path(item.path), stat.st_size, stat.st_mtime))
        return temps

    def _shards(self) -> list[os.DirEntry[str]]:
        return [
            shard
            for shard in _scandir(self.root)
            if _SHARD_NAME.fullmatch(shard.name) and shard.is_dir(follow_symlinks=False)
        ]

    # -- maintenance -----------------------------------------------------------------------------------

    def info(self, *, breakdown: bool = False, cap_source: str = "") -> CacheInfo:
        """Entries, bytes, temp files and the cap; ``breakdown`` adds the size per backbone/t/layer."""
        entries = self._scan()
        temps = self._scan_temps()
        total = sum(entry.size for entry in entries)
        self._estimated_bytes = total
        return CacheInfo(
            root=self.root,
            entries=len(entries),
            total_bytes=total,
            max_bytes=self.max_bytes,
            temp_files=len(temps),
            temp_bytes=sum(temp.size for temp in temps),
            groups=_group_entries(entries) if breakdown else (),
            cap_source=cap_source,
        )

    def clear(self) -> int:
        """Delete every entry and temp file the cache wrote; returns the number of entries removed.

        Refuses (ConfigError) a folder without the marker: it may be a model or dataset folder that
        ``cache.dir`` points at by mistake. Files that do not follow the entry naming scheme stay.
        """
        if not self.root.is_dir() or not any(True for _ in _scandir(self.root)):
            return 0
        if not self.marker.is_file():
            raise ConfigError(
                f"{self.root} is not a feature cache (no {MARKER_NAME} marker): refusing to clear it"
            )
        removed = 0
        for shard in self._shards():
            for item in _scandir(Path(shard.path)):
                is_entry = _is_entry_name(item.name, shard.name)
                if not (is_entry or _TEMP_NAME.fullmatch(item.name)):
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


def _is_entry_name(name: str, shard: str) -> bool:
    return bool(_ENTRY_NAME.fullmatch(name)) and name[:2] == shard


def _group_entries(entries: list[_EntryFile]) -> tuple[CacheGroup, ...]:
    """Entries and bytes per (backbone, time step, layer), read from each entry's stored key."""
    counts: dict[tuple[str, int, str], list[int]] = {}
    for entry in entries:
        try:
            with safe_open(str(entry.path), framework="pt") as handle:
                key = json.loads((handle.metadata() or {}).get("key", "{}"))
            group = (str(key["backbone"]), int(key["timestep"]), str(key["layer"]))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError):
            group = ("(unreadable)", -1, "")
        tally = counts.setdefault(group, [0, 0])
        tally[0] += 1
        tally[1] += entry.size
    return tuple(
        CacheGroup(backbone, timestep, layer, count, size)
        for (backbone, timestep, layer), (count, size) in sorted(counts.items())
    )


def format_bytes(count: int) -> str:
    """Binary units with one decimal: 1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_cache_info(info: CacheInfo) -> str:
    """A few lines for ``harness cache info``, then the size per backbone / time step / layer if known."""
    if info.max_bytes is None:
        cap = "none"
    else:
        cap = f"{format_bytes(info.max_bytes)} ({100 * info.total_bytes / info.max_bytes:.0f}% used)"
        if info.cap_source:
            cap += f", from {info.cap_source}"
    lines = [
        f"feature cache: {info.root}",
        f"entries: {info.entries}",
        f"size: {format_bytes(info.total_bytes)}",
        f"cap: {cap}",
        f"temporary files: {info.temp_files} ({format_bytes(info.temp_bytes)}; "
        f"those older than {STALE_TEMP_SECONDS / 3600:.0f} h are left by killed writers, removed on start)",
    ]
    if info.groups:
        width = max(len(group.backbone) for group in info.groups)
        lines.append(f"{'backbone':<{width}}  {'t':>5}  {'layer':>8}  {'entries':>8}  {'size':>10}")
        for group in info.groups:
            lines.append(
                f"{group.backbone:<{width}}  {group.timestep:>5}  {group.layer:>8}  {group.entries:>8}  "
                f"{format_bytes(group.total_bytes):>10}"
            )
    return "\n".join(lines)


def _checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of the raw tensor bytes: catches bit rot and overwritten data that the format cannot see."""
    raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
    return zlib.crc32(memoryview(raw))


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, ``os.replace``: the final name only ever holds whole files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = mkstemp_shared(path.parent, prefix=TEMP_PREFIX, suffix=".part")
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
    "CacheGroup",
    "CacheInfo",
    "CacheNotWritableError",
    "CacheStats",
    "FeatureCache",
    "FeatureKey",
    "default_cache_dir",
    "default_max_bytes",
    "format_bytes",
    "format_cache_info",
    "frame_identity",
]
