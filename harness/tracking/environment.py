"""What a run or a benchmark ran on: device, CPU, memory, GPU, git commit, package versions.

The one place where the harness probes its environment; tracking tags runs with it and the benchmarks
write it into their reports. Nothing here imports MLflow, and torch only inside the functions that need
it, so benchmark processes that measure memory stay light.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRACKED_PACKAGES = ("torch", "diffusers", "optuna", "mlflow")


# -- git -----------------------------------------------------------------------------------------------


def git_output(*args: str, root: Path = PROJECT_ROOT) -> str | None:
    """``git <args>`` in ``root``; None when git is missing, fails, or ``root`` is no repository."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def project_git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The commit checked out in ``root``, or None when it is not a git repository (or has no commit)."""
    return git_output("rev-parse", "--verify", "HEAD", root=root) or None


# -- packages ------------------------------------------------------------------------------------------


def package_versions(packages: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def versions() -> dict[str, Any]:
    """Python, torch, numpy, diffusers, transformers and the project commit (with an uncommitted-changes
    flag): what a benchmark report records."""
    import numpy
    import torch

    status = git_output("status", "--porcelain", "--untracked-files=no")
    found: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "project_commit": git_output("rev-parse", "HEAD"),
        "project_dirty": bool(status) if status is not None else None,
    }
    for package in ("diffusers", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # the benchmark that needs it says so itself
            found[package] = None
    return found


# -- CPU, memory, load ---------------------------------------------------------------------------------


def _proc_field(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (``platform.processor()`` is empty on most Linuxes)."""
    return _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine() or "cpu"


def _meminfo_bytes(field: str) -> int | None:
    text = _proc_field("/proc/meminfo", f"{field}:")
    try:
        return int(text.split()[0]) * 1024 if text else None
    except (ValueError, IndexError):
        return None


def memory_total_bytes() -> int | None:
    return _meminfo_bytes("MemTotal")


def memory_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo: whether a memory-hungry job can run without swapping."""
    return _meminfo_bytes("MemAvailable")


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: wall times mean little when other jobs share the cores."""
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def process_peak_rss_bytes() -> int:
    """The peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# -- accelerators --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceDescription:
    """The device a run used: ``kind`` is ``cpu`` or ``cuda``; ``name`` the CPU model or GPU name."""

    kind: str
    name: str
    index: int | None = None

    def __str__(self) -> str:
        where = self.kind if self.index is None else f"{self.kind}:{self.index}"
        return f"{where} ({self.name})"


def _cuda_available() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "no CUDA" here
        return False


def uses_cuda(requested: str | None = None) -> bool:
    """Whether a run with ``backbone.device = requested`` runs on CUDA (None/auto = when available)."""
    requested = str(requested or "").strip().lower()
    wants_cuda = requested in ("", "auto", "cuda") or requested.startswith("cuda:")
    return wants_cuda and _cuda_available()


def describe_device(requested: str | None = None) -> DeviceDescription:
    """Which device a run with ``backbone.device = requested`` uses (None/auto = CUDA when available),
    named: the GPU's name for CUDA, the CPU model otherwise."""
    requested = str(requested or "").strip().lower()
    if uses_cuda(requested):
        import torch

        index = int(requested.split(":", 1)[1]) if requested.startswith("cuda:") else 0
        try:
            return DeviceDescription("cuda", torch.cuda.get_device_name(index), index)
        except Exception:  # noqa: BLE001 - a bad index or driver: still say it was CUDA
            return DeviceDescription("cuda", "unknown GPU", index)
    return DeviceDescription("cpu", cpu_model())


def reset_peak_gpu_memory() -> None:
    """Start a fresh peak-memory count on every visible GPU (no-op without CUDA)."""
    if not _cuda_available():
        return
    import torch

    for index in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(index)


def peak_gpu_memory_bytes() -> int | None:
    """The peak memory torch allocated on the GPUs since the last reset (summed); None without CUDA."""
    if not _cuda_available():
        return None
    import torch

    return int(sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())))


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        completed = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = completed.stdout.strip().splitlines()
    return lines[0].strip() if completed.returncode == 0 and lines else None


def machine_info(device: str) -> dict[str, Any]:
    """CPU model and cores, memory, GPU name and driver: what benchmark numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": memory_total_bytes(),
        "platform": platform.platform(),
        "device": device,
        "gpu": None,
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": properties.name,
            "memory_bytes": properties.total_memory,
            "driver": nvidia_driver(),
            "cuda_runtime": torch.version.cuda,
            "count": torch.cuda.device_count(),
        }
    return info


__all__ = [
    "DeviceDescription",
    "describe_device",
    "load_average",
    "machine_info",
    "memory_available_bytes",
    "package_versions",
    "peak_gpu_memory_bytes",
    "process_peak_rss_bytes",
    "project_git_commit",
    "reset_peak_gpu_memory",
    "uses_cuda",
    "versions",
]
