"""Checks made before a sweep creates its study or runs a trial: anything that would make every trial fail
(or fill the disk) stops the sweep at once, with the fix, instead of after hours of failed trials.

* the dataset: the root exists and the split opens (with the download command when it does not);
* the weights of every backbone the study can pick (fixed, searched, per choice), found without loading;
* the disk: an estimate of the feature cache the study will write, against the free space where it goes;
* the MLflow tracking store: reachable within a few seconds.

:func:`preflight` returns a :class:`PreflightReport` whose ``format()`` also says what the trials cost
(frames per trial, distinct feature sets, the cache estimate).
"""

from __future__ import annotations

import heapq
import itertools
import os
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, DataError, HarnessError, WeightsNotFoundError
from harness.study.spec import StudySpec

#: test hook: pretend the disk holding the feature cache has this many free bytes
FREE_DISK_ENV = "DIFFVOS_FREE_DISK_BYTES"
TRACKING_TIMEOUT_S = 5.0
DAVIS_DOWNLOAD = "harness data download davis2017 --root {root}"
FEATURE_SETTINGS = ("backbone.name", "backbone.timestep", "backbone.layer", "backbone.ensemble_size")


@dataclass(frozen=True)
class Problem:
    kind: str  # "data", "weights", "disk"
    message: str


@dataclass
class PreflightReport:
    sequences: int = 0
    frames: int = 0
    trials: int = 0
    feature_sets: int = 0
    cache_bytes: int = 0
    cache_dir: Path | None = None
    free_bytes: int | None = None
    cap_bytes: int | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"pre-flight: {self.sequences} sequences, {self.frames} frames per trial, "
            f"{self.trials} trials to run ({self.trials * self.frames} frame propagations)"
        ]
        if self.cache_dir is not None:
            free = "unknown" if self.free_bytes is None else _gb(self.free_bytes)
            lines.append(
                f"  feature cache: about {_gb(self.cache_bytes)} for {self.feature_sets} distinct feature "
                f"set(s) (each extracted once) in {self.cache_dir}, {free} free"
                + (f", cap {_gb(self.cap_bytes)}" if self.cap_bytes is not None else "")
            )
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  PROBLEM ({p.kind}): {p.message}" for p in self.problems]
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        if not self.problems:
            return
        kinds = {p.kind for p in self.problems}
        error: type[HarnessError] = (
            DataError if "data" in kinds else WeightsNotFoundError if "weights" in kinds else ConfigError
        )
        details = "\n".join(f"  - {p.message}" for p in self.problems)
        raise error(f"the sweep cannot start; fix these first (no trial was run):\n{details}")


def _gb(size: int) -> str:
    return f"{size / 1024**3:.1f} GB" if size >= 1024**3 * 0.1 else f"{size / 1024**2:.1f} MB"


def preflight(
    spec: StudySpec, trials: int, *, free_disk: Callable[[Path], int] | None = None
) -> PreflightReport:
    """Check the dataset, the weights and the disk for ``trials`` more trials of ``spec``."""
    report = PreflightReport(trials=trials)
    sizes = _check_dataset(spec, report)
    _check_weights(spec, report)
    _check_disk(spec, trials, sizes, report, free_disk or free_disk_bytes)
    return report


# -- dataset -----------------------------------------------------------------------------------------------


def _check_dataset(spec: StudySpec, report: PreflightReport) -> list[tuple[int, int, int]]:
    """(frames, width, height) per sequence; a problem when the dataset cannot be opened."""
    from PIL import Image

    from harness.data import open_dataset

    root = Path(spec.dataset.root).expanduser()
    sequences = list(spec.dataset.sequences) if spec.dataset.sequences is not None else None
    try:
        dataset = open_dataset(root, spec.dataset.split, sequences, spec.dataset.resolution)
    except DataError as error:
        # a missing root's error already names the command that creates it (open_dataset's hint)
        message = str(error)
        if root.is_dir():
            download = DAVIS_DOWNLOAD.format(root=spec.dataset.root)
            message += f"; check that {root} holds the split {spec.dataset.split!r} (or run `{download}`)"
        report.problems.append(Problem("data", message))
        return []
    sizes = []
    for sequence in dataset.sequences:
        if not sequence.frames:
            continue
        try:
            with Image.open(sequence.frames[0]) as image:
                width, height = image.size
        except OSError as error:
            report.problems.append(Problem("data", f"cannot read {sequence.frames[0]}: {error}"))
            continue
        sizes.append((len(sequence.frames), width, height))
    report.sequences = len(dataset.sequences)
    report.frames = sum(frames for frames, _, _ in sizes)
    return sizes


# -- weights -----------------------------------------------------------------------------------------------


def backbone_choices(spec: StudySpec) -> list[dict[str, Any]]:
    """The backbone settings (name, weights, options) of every backbone the study can pick."""
    from harness.config import BackboneConfig

    defaults = BackboneConfig()
    param = spec.search_space.get("backbone.name")
    if param is not None:
        settings = [spec.trial_overrides({"backbone.name": c}) for c in param.choices if c is not None]
    else:
        settings = [dict(spec.fixed)]
    chosen = []
    for overrides in settings:
        chosen.append(
            {
                "name": overrides.get("backbone.name") or defaults.name,
                "weights": overrides.get("backbone.weights", defaults.weights),
                "options": overrides.get("backbone.options") or {},
            }
        )
    return chosen


def _check_weights(spec: StudySpec, report: PreflightReport) -> None:
    from backbones.status import weights_status

    for backbone in backbone_choices(spec):
        status = weights_status(backbone["name"], backbone["weights"], backbone["options"])
        if not status.present:
            report.problems.append(
                Problem(
                    "weights",
                    f"backbone {status.backbone!r}: weights not found at {status.location}; {status.fix}",
                )
            )


# -- disk --------------------------------------------------------------------------------------------------


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (its nearest existing parent).

    ``$DIFFVOS_FREE_DISK_BYTES`` overrides it (tests simulate a full disk with it)."""
    override = os.environ.get(FREE_DISK_ENV, "").strip()
    if override:
        return int(float(override))
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _values(spec: StudySpec, key: str, default: Any) -> list[Any] | None:
    """Values a feature setting takes in the study (None: a continuous axis, any number of values)."""
    param = spec.search_space.get(key)
    if param is None:
        return [spec.fixed.get(key, default)]
    values = param.grid_values()
    if values is None:
        return None
    return [default if value is None else value for value in values]


def feature_set_bytes(
    sizes: list[tuple[int, int, int]], channels: int, stride: int, short_side: int, bytes_per_value: int
) -> int:
    """Bytes of one layer's features for every frame: channels x grid cells x bytes, per frame."""
    from harness.frames import network_input_size

    total = 0
    for frames, width, height in sizes:
        try:
            net_w, net_h = network_input_size(width, height, short_side, multiple=stride)
        except HarnessError:
            net_w, net_h = stride, stride
        total += frames * channels * (net_w // stride) * (net_h // stride) * bytes_per_value
    return total


def _check_disk(
    spec: StudySpec,
    trials: int,
    sizes: list[tuple[int, int, int]],
    report: PreflightReport,
    free_disk: Callable[[Path], int],
) -> None:
    from backbones import describe_backbone
    from harness.config import RunConfig
    from harness.features.cache import default_cache_dir

    defaults = RunConfig()
    cache = spec.fixed
    if not cache.get("cache.enabled", defaults.cache.enabled) or not sizes:
        return
    folder = Path(str(cache.get("cache.dir") or default_cache_dir())).expanduser()
    bytes_per_value = 2 if cache.get("cache.fp16", defaults.cache.fp16) else 4
    short_sides = _values(spec, "input.short_side", defaults.input.short_side) or [defaults.input.short_side]

    set_sizes: list[int] = []
    unbounded = False
    for backbone in backbone_choices(spec):
        try:
            info = describe_backbone(backbone["name"])
        except Exception as error:  # noqa: BLE001 - the estimate is best effort; the trial checks again
            report.notes.append(f"no cache estimate for {backbone['name']!r} ({error})")
            continue
        layers = {str(entry["layer"]): entry for entry in info.get("layers", [])}  # type: ignore[union-attr]
        timesteps = _values(spec, "backbone.timestep", info.get("default_timestep"))
        wanted_layers = _values(spec, "backbone.layer", info.get("default_layer"))
        ensembles = _values(spec, "backbone.ensemble_size", defaults.backbone.ensemble_size)
        if timesteps is None or ensembles is None:
            unbounded = True
            timesteps, ensembles = timesteps or [None], ensembles or [1]
        for layer, _, _, short_side in itertools.product(
            wanted_layers or list(layers), timesteps, ensembles, short_sides
        ):
            entry = layers.get(str(layer))
            if entry is None:
                continue
            channels, stride = int(entry["channels"]), int(entry["stride"])
            set_sizes.append(feature_set_bytes(sizes, channels, stride, int(short_side), bytes_per_value))
    if not set_sizes:
        return
    # a study runs at most `trials` distinct feature sets: the largest ones bound the estimate
    count = trials if unbounded else min(trials, len(set_sizes))
    report.feature_sets = count
    report.cache_bytes = sum(heapq.nlargest(count, set_sizes)) if not unbounded else count * max(set_sizes)
    report.cache_dir = folder
    report.free_bytes = free_disk(folder)
    _check_space(report, folder, cache, defaults, set_sizes)


def _check_space(
    report: PreflightReport, folder: Path, cache: Any, defaults: Any, set_sizes: list[int]
) -> None:
    """Stop when one trial's features cannot fit; note when the whole estimate exceeds the cache cap."""
    from harness.features.cache import DEFAULT_CAP_FRACTION

    assert report.free_bytes is not None
    free = report.free_bytes
    cap_gb = cache.get("cache.max_gb", defaults.cache.max_gb)
    if cap_gb:
        cap, cap_name = int(float(cap_gb) * 1024**3), f"cache.max_gb ({cap_gb} GB)"
    else:  # the feature cache's own default (harness.features.cache.default_max_bytes)
        cap, cap_name = (
            int(DEFAULT_CAP_FRACTION * free),
            f"the default cache cap ({_gb(int(DEFAULT_CAP_FRACTION * free))})",
        )
    report.cap_bytes = cap
    largest = max(set_sizes)
    fixes = (
        "free space, point cache.dir (or $DIFFVOS_CACHE_DIR) at a larger disk, set cache.fp16: true "
        "(half the size), or turn the cache off with cache.enabled: false"
    )
    if largest > min(cap, free):
        report.problems.append(
            Problem(
                "disk",
                f"one trial's features take about {_gb(largest)} in {folder}, more than "
                f"{cap_name if cap <= free else 'the free disk'} ({_gb(free)} free there); {fixes}",
            )
        )
    elif min(report.cache_bytes, cap) > free:
        report.problems.append(
            Problem(
                "disk",
                f"the feature cache needs about {_gb(min(report.cache_bytes, cap))} in {folder} (the "
                f"estimate, at most {cap_name}) but only {_gb(free)} is free; lower cache.max_gb or {fixes}",
            )
        )
    elif report.cache_bytes > cap:
        report.notes.append(
            f"the cache estimate exceeds {cap_name}: older features are evicted and recomputed if a later "
            "trial needs them again (no loss for trials that never share features, e.g. one time step each); "
            "cache.fp16: true halves the size"
        )


# -- tracking store ------------------------------------------------------------------------------------------


def check_tracking_store(tracking_uri: str, timeout: float = TRACKING_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when the MLflow tracking store cannot be reached.

    An HTTP server must answer, but not 404 (a 401 from an authenticating proxy proves it is there);
    a database server must accept a TCP connection; a local SQLite file needs a folder to live in.
    """
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in tracking_uri else ""
    if scheme in ("http", "https"):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - the user's own server
                return
        except urllib.error.HTTPError as error:
            if error.code != 404:
                return  # it answered (401/403 from an authenticating proxy included)
            # every MLflow server answers /health; a 404 is another service, and the client's first
            # request would end the sweep with a traceback after the study was created
            raise ConfigError(
                f"{tracking_uri} answered but is not an MLflow tracking server (HTTP 404 for {url}); "
                "fix --tracking-uri / $MLFLOW_TRACKING_URI (host, port and path prefix)"
            ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(
                f"MLflow tracking server {tracking_uri} did not answer within {timeout:g} s ({reason}); "
                "start it, fix --tracking-uri / $MLFLOW_TRACKING_URI, or leave both unset for the local "
                "sqlite:///mlflow.db"
            ) from None
    elif scheme in ("postgresql", "mysql", "mssql"):
        from sqlalchemy.engine import make_url

        url = make_url(tracking_uri)
        port = url.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[scheme]
        try:
            socket.create_connection((url.host or "localhost", port), timeout=timeout).close()
        except OSError as error:
            raise ConfigError(
                f"MLflow tracking database {url.render_as_string(hide_password=True)} is not reachable "
                f"within {timeout:g} s ({error})"
            ) from None
    elif scheme == "sqlite":
        path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).expanduser().absolute().parent.is_dir():
            raise ConfigError(f"MLflow tracking store {tracking_uri}: the folder of {path} does not exist")
