"""Shared plumbing of the benchmarks: timing, machine and software description, tables, JSON reports.

Every sub-benchmark returns a plain dict (settings, results, notes); the helpers here time calls, describe
the machine and the software, print the tables and write ``<out>/<name>.json``. Wall times on a shared
machine are noisy, so every figure is a median over repeats, every ratio compares two things measured in
the same run, and the load average at start and end is recorded next to them. The sub-benchmarks import
this module and :mod:`harness.bench.runner` imports them, never the other way round.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from harness.errors import ConfigError
from harness.tracking.environment import process_peak_rss_bytes

SUB_BENCHMARKS = ("propagation", "sweep", "evaluation", "extraction", "smoke")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: ../shared beside the checkout (developer machines only); benchmarks that need it skip without it
SHARED_REFERENCE = PROJECT_ROOT.parent / "shared" / "reference"
#: five real DAVIS-2017 sequences in ../shared (developer machines only)
SHARED_REAL_DAVIS = PROJECT_ROOT.parent / "shared" / "data" / "davis2017-real"


@dataclass(frozen=True)
class BenchOptions:
    """What the command line asked for; every sub-benchmark derives its sizes from these."""

    device: str = "cpu"
    #: tiny sizes that only exercise the code paths (tests, smoke runs); numbers mean nothing
    quick: bool = False
    #: DAVIS-scale settings even on a CPU (slow); always on for CUDA
    full: bool = False
    out_dir: Path = Path("results/benchmarks")
    work_dir: Path = Path("cache/bench")
    #: None: each benchmark's default for the device
    repeats: int | None = None
    sd21_config: Path | None = None
    #: a DAVIS-layout folder of real footage for the propagation benchmark's screening check
    real_data: Path | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was given but torch sees no CUDA device")
        if self.repeats is not None and self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {self.repeats}")
        if self.quick and self.full:
            raise ConfigError("--quick and --full contradict each other; pass one of them")

    @property
    def scale(self) -> str:
        """'quick', 'reduced' (CPU default: sizes cut so a 2-core machine finishes) or 'full'."""
        if self.quick:
            return "quick"
        return "full" if self.full or self.device == "cuda" else "reduced"

    def repeats_or(self, default: int) -> int:
        return self.repeats if self.repeats is not None else default


# -- timing ------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls; the median is what tables and ratios use."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"median_seconds": self.median, "seconds": list(self.seconds)}


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(
    function: Callable[[], object], *, repeats: int, warmup: int = 0, device: torch.device | str = "cpu"
) -> Timing:
    """Run ``function`` ``warmup`` times untimed, then ``repeats`` times timed (device synchronised)."""
    for _ in range(warmup):
        function()
    synchronize(device)
    timing = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        timing.seconds.append(time.perf_counter() - start)
    return timing


def time_interleaved(
    functions: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Time several functions in turns (a, b, a, b, ...), so that a burst of load from other jobs on a
    shared machine hits all of them rather than whichever happened to run then."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    timings = {name: Timing() for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            timings[name].seconds.append(time.perf_counter() - start)
    return timings


def cuda_peak_bytes(function: Callable[[], object], device: torch.device | str) -> tuple[object, int]:
    """(result, bytes allocated at the peak of the call above what was allocated before it)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = function()
    synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def _status_bytes(field_name: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_increase(function: Callable[[], object]) -> tuple[int, str]:
    """(bytes by which ``function`` raised this process's resident memory at its peak, method used).

    The high-water mark is first reset to the current RSS (writing 5 to /proc/self/clear_refs, Linux
    4.0+), so the figure is the call's own peak above what was resident before it. Where that is not
    possible it falls back to the growth of ru_maxrss, which misses a call whose peak stays below an
    earlier one (a process spawned by a big parent inherits the parent's RSS in it).
    """
    before = _status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = before is not None
    except OSError:
        reset = False
    if reset:
        before = _status_bytes("VmRSS")
        function()
        after = _status_bytes("VmHWM")
        if before is not None and after is not None:
            return max(0, after - before), "VmHWM after resetting it (clear_refs 5) minus VmRSS before"
    start = process_peak_rss_bytes()
    function()
    return max(0, process_peak_rss_bytes() - start), "growth of ru_maxrss (may under-count)"


def run_in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function(*args)`` in a new interpreter and return its (picklable) result.

    The peak RSS of a process only grows, so a figure taken in a process that already ran other
    measurements would hide the smaller of two; a fresh "spawn" process starts from nothing.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def matmul_rate(
    device: torch.device | str, dtype: torch.dtype, size: int, repeats: int = 5
) -> dict[str, Any]:
    """Measured FLOP/s of one square matrix product (fastest of ``repeats``): the ceiling that a
    convolutional UNet can approach on this device."""
    device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device, dtype)
    right = torch.randn(size, size, generator=generator).to(device, dtype)
    timing = time_calls(lambda: torch.mm(left, right), repeats=repeats, warmup=1, device=device)
    flops = 2.0 * size**3
    # the fastest repeat is the ceiling: on a shared machine the slower ones measure the other jobs
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
        "median_seconds": timing.median,
        "best_seconds": min(timing.seconds),
        "median_tflops": flops / timing.median / 1e12,
        "tflops": flops / min(timing.seconds) / 1e12,
    }


# -- machine and versions: harness.tracking.environment (shared with run tracking) --------------------


# -- output ------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain left/right aligned text table: numbers right, text left."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def format_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_report(name: str, report: dict[str, Any], options: BenchOptions, envelope: dict[str, Any]) -> Path:
    """``<out>/<name>.json``: the sub-benchmark's report inside the common envelope."""
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    document = {"benchmark": name, **envelope, **report}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    temporary.replace(path)
    return path
