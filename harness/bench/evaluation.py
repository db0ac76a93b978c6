"""Speed and memory of ``harness.evaluation`` on a dataset shaped like DAVIS-2017 val.

The real DAVIS images cannot be shipped, but the evaluator only looks at masks and frame sizes, so a
generated dataset with the same sequence names, frame counts, object counts and frame sizes costs the
same to evaluate. Each measurement runs in a fresh Python process, so the max-RSS delta belongs to the
evaluation alone. The ``vos-benchmark`` package, when installed, is timed on the same data as a baseline.

    python -m harness.bench.evaluation --out results/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from harness.data.masks import write_mask
from harness.errors import DataError, HarnessError
from harness.tracking.environment import load_average

DEFAULT_SHAPE_TABLE = Path(__file__).with_name("davis2017_val_shape.tsv")
SHAPE_COLUMNS = ("sequence", "frames", "objects", "width", "height")
MARKER_NAME = ".generated.json"
SPLIT = "val"
# Published for comparison (from ../shared/reference/README.md, measured on the same 2-core machines):
# the official davis2017-evaluation takes 49-58 s and 3.5 GB on this shape.
OFFICIAL_REFERENCE = {"seconds": "49-58", "memory_gb": 3.5}


@dataclass(frozen=True)
class ShapeRow:
    """One sequence of the shape table."""

    name: str
    frames: int
    objects: int
    width: int
    height: int


@dataclass(frozen=True)
class GeneratedDataset:
    """Where the generator put the DAVIS-layout dataset and the matching predictions."""

    root: Path
    predictions: Path
    split: str = SPLIT


def read_shape_table(path: Path = DEFAULT_SHAPE_TABLE) -> list[ShapeRow]:
    """Rows of a tab-separated ``sequence frames objects width height`` table (with that header)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shape table {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines or tuple(lines[0].split("\t")) != SHAPE_COLUMNS:
        raise DataError(f"shape table {path}: the header must be {' '.join(SHAPE_COLUMNS)} (tab-separated)")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        try:
            name, frames, objects, width, height = cells[0], *map(int, cells[1:])
        except ValueError as error:
            raise DataError(
                f"shape table {path}, line {number}: {line!r} is not 'name int int int int'"
            ) from error
        rows.append(ShapeRow(name, frames, objects, width, height))
    validate_shape_rows(rows, source=str(path))
    return rows


def validate_shape_rows(rows: Sequence[ShapeRow], source: str = "shape rows") -> None:
    if not rows:
        raise DataError(f"{source}: no sequences")
    for row in rows:
        if row.frames < 3 or not 1 <= row.objects <= 254 or row.width < 16 or row.height < 16:
            raise DataError(
                f"{source}: {row} is out of range (frames >= 3, objects 1..254, width and height >= 16)"
            )
    names = [row.name for row in rows]
    if len(set(names)) != len(names) or any(not name or "/" in name for name in names):
        raise DataError(f"{source}: sequence names must be unique, non-empty and contain no '/'")


@dataclass(frozen=True)
class _Blob:
    """An ellipse that drifts, breathes and turns: enough motion and deformation to look like an object."""

    centre: tuple[float, float]  # fractions of (width, height)
    drift: tuple[float, float]  # amplitude, fractions of (width, height)
    axes: tuple[float, float]  # semi-axes, fractions of the height
    phase: float
    speed: float
    turn: float  # degrees per frame

    def draw(self, canvas: np.ndarray, t: int, value: int) -> None:
        height, width = canvas.shape
        angle = self.phase + self.speed * t
        cx = width * (self.centre[0] + self.drift[0] * np.sin(angle))
        cy = height * (self.centre[1] + self.drift[1] * np.cos(0.7 * angle))
        breathe = 1.0 + 0.25 * np.sin(1.3 * angle)
        axes = (
            max(2, round(height * self.axes[0] * breathe)),
            max(2, round(height * self.axes[1] / breathe)),
        )
        cv2.ellipse(canvas, (round(cx), round(cy)), axes, self.turn * t, 0, 360, int(value), thickness=-1)


def _random_blob(rng: np.random.Generator) -> _Blob:
    return _Blob(
        centre=(rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)),
        drift=(rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.12)),
        axes=(rng.uniform(0.06, 0.2), rng.uniform(0.06, 0.2)),
        phase=rng.uniform(0, 2 * np.pi),
        speed=rng.uniform(0.03, 0.12),
        turn=rng.uniform(-3, 3),
    )


def _perturb(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong prediction of one object: shifted, eroded or dilated, sometimes a stray blob."""
    height, width = mask.shape
    dx, dy = (int(v) for v in rng.integers(-6, 7, size=2))
    shifted = np.zeros_like(mask)
    shifted[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = mask[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    size = int(rng.integers(0, 4)) * 2 + 1
    if size > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        operation = cv2.erode if rng.random() < 0.5 else cv2.dilate
        shifted = operation(shifted, kernel)
    if rng.random() < 0.03:
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(shifted, centre, int(rng.integers(3, 15)), 1, thickness=-1)
    return shifted


def _flat_jpeg(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def _generate_sequence(root: Path, predictions: Path, row: ShapeRow, seed: int, index: int) -> None:
    rng = np.random.default_rng([seed, index])
    frame_dir = root / "JPEGImages" / "480p" / row.name
    mask_dir = root / "Annotations" / "480p" / row.name
    prediction_dir = predictions / row.name
    for folder in (frame_dir, mask_dir, prediction_dir):
        folder.mkdir(parents=True, exist_ok=True)
    jpeg = _flat_jpeg(row.width, row.height, tuple(int(c) for c in rng.integers(0, 256, size=3)))
    blobs = [_random_blob(rng) for _ in range(row.objects)]
    for t in range(row.frames):
        name = f"{t:05d}"
        (frame_dir / f"{name}.jpg").write_bytes(jpeg)
        gt = np.zeros((row.height, row.width), dtype=np.uint8)
        for object_id, blob in enumerate(blobs, start=1):  # higher ids in front, so id K shows in frame 0
            blob.draw(gt, t, object_id)
        write_mask(mask_dir / f"{name}.png", gt)
        prediction = np.zeros_like(gt)
        for object_id in range(1, row.objects + 1):
            if rng.random() < 0.05:  # the tracker lost this object in this frame
                continue
            prediction[_perturb((gt == object_id).astype(np.uint8), rng).astype(bool)] = object_id
        write_mask(prediction_dir / f"{name}.png", prediction)


def generate_shaped_dataset(
    root: Path, shape_rows: Sequence[ShapeRow], seed: int = 0, workers: int = 2
) -> GeneratedDataset:
    """Write a DAVIS-2017-layout dataset of the given shape plus perturbed predictions under ``root``.

    ``root/dataset`` gets flat-colour JPEG frames, palette-PNG ground truth with moving, deforming blobs
    and ``ImageSets/2017/val.txt``; ``root/predictions/<seq>/<frame>.png`` gets the ground truth shifted,
    eroded or dilated, with objects dropped in some frames. A marker file records the shape and seed, so
    a second call with the same arguments reuses the files.
    """
    root = Path(root)
    shape_rows = list(shape_rows)
    validate_shape_rows(shape_rows)
    generated = GeneratedDataset(root=root / "dataset", predictions=root / "predictions")
    marker = root / MARKER_NAME
    wanted = {"seed": seed, "rows": [asdict(row) for row in shape_rows], "complete": True}
    if marker.is_file():
        if json.loads(marker.read_text()) == wanted:
            return generated
        # Ours, but for other arguments or left half-written by an interrupted run: start again.
        for folder in (generated.root, generated.predictions):
            shutil.rmtree(folder, ignore_errors=True)
    elif root.is_dir() and any(root.iterdir()):
        raise DataError(f"{root} is not empty and was not made by this generator; choose another folder")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**wanted, "complete": False}))
    (generated.root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [
            pool.submit(_generate_sequence, generated.root, generated.predictions, row, seed, index)
            for index, row in enumerate(shape_rows)
        ]
        for job in jobs:
            job.result()
    split_file = generated.root / "ImageSets" / "2017" / f"{SPLIT}.txt"
    split_file.write_text("".join(f"{row.name}\n" for row in shape_rows))
    marker.write_text(json.dumps(wanted))
    return generated


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _measure_in_subprocess(
    tool: str, generated: GeneratedDataset, workers: int, trace: bool = False
) -> dict[str, float]:
    """Run one measurement in a fresh interpreter and return what it printed (one JSON line)."""
    command = [sys.executable, "-m", "harness.bench.evaluation", "--measure", tool]
    command += ["--dataset", str(generated.root), "--predictions", str(generated.predictions)]
    command += ["--workers", str(workers)]
    if trace:
        command.append("--tracemalloc")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_project_root()), env.get("PYTHONPATH")]))
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{tool} measurement failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _max_rss_mb(who: int) -> float:
    import resource

    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux reports KiB


def _cpu_seconds(*whos: int) -> float:
    """User + system CPU time: unlike wall time, it hardly changes when other jobs share the cores."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime for who in whos)


def _measure_ours(dataset_root: Path, predictions: Path, workers: int, trace: bool) -> dict[str, object]:
    import resource
    import tracemalloc

    from harness.data.dataset import open_dataset
    from harness.evaluation import evaluate_dataset

    start = time.perf_counter()
    dataset = open_dataset(dataset_root, SPLIT)
    open_seconds = time.perf_counter() - start
    rss_before = _max_rss_mb(resource.RUSAGE_SELF)
    if trace:
        tracemalloc.start()
    cpu_start = _cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = evaluate_dataset(dataset, predictions, progress=False, workers=workers)
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds(resource.RUSAGE_SELF) - cpu_start
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    rss_after = _max_rss_mb(resource.RUSAGE_SELF)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "open_seconds": open_seconds,
        "max_rss_mb": rss_after,
        "rss_delta_mb": rss_after - rss_before,
        "traced_peak_mb": traced_peak,
        "global": result.global_metrics,
    }


def _measure_vos_benchmark(dataset_root: Path, predictions: Path, workers: int) -> dict[str, object]:
    """Time vos-benchmark; it writes results.csv into the prediction folder and reports J, F in percent."""
    import contextlib
    import gc
    import multiprocessing
    import resource

    from vos_benchmark.benchmark import benchmark

    rss_before = _max_rss_mb(resource.RUSAGE_SELF)
    cpu_start = _cpu_seconds(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        jf, j, f, _ = benchmark(
            [str(dataset_root / "Annotations" / "480p")],
            [str(predictions)],
            num_processes=workers,
            verbose=False,
        )
    seconds = time.perf_counter() - start
    gc.collect()  # benchmark() leaves its pool to the garbage collector; reap the workers to count their CPU
    multiprocessing.active_children()
    return {
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) - cpu_start,
        "max_rss_mb": _max_rss_mb(resource.RUSAGE_SELF),
        "rss_delta_mb": _max_rss_mb(resource.RUSAGE_SELF) - rss_before,
        "worker_max_rss_mb": _max_rss_mb(resource.RUSAGE_CHILDREN),
        "global": {"J&F-Mean": jf[0] / 100.0, "J-Mean": j[0] / 100.0, "F-Mean": f[0] / 100.0},
    }


def _summarise(runs: list[dict[str, object]], traced: dict[str, object] | None) -> dict[str, object]:
    seconds = [float(run["seconds"]) for run in runs]
    summary: dict[str, object] = {
        "median_seconds": statistics.median(seconds),
        "seconds": seconds,
        "median_cpu_seconds": statistics.median(float(run["cpu_seconds"]) for run in runs),
        "max_rss_mb": max(float(run["max_rss_mb"]) for run in runs),
        "rss_delta_mb": max(float(run["rss_delta_mb"]) for run in runs),
        "global": runs[0]["global"],
    }
    if "worker_max_rss_mb" in runs[0]:
        summary["worker_max_rss_mb"] = max(float(run["worker_max_rss_mb"]) for run in runs)
    if traced is not None:
        summary["traced_peak_mb"] = traced["traced_peak_mb"]
        summary["seconds_under_tracemalloc"] = traced["seconds"]
    return summary


def _vos_benchmark_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vos_benchmark") is not None


def run_benchmark(
    work_dir: Path,
    repeats: int = 3,
    shape_rows: Sequence[ShapeRow] | None = None,
    seed: int = 0,
    baseline: bool = True,
    workers: int = 2,
    json_path: Path | None = None,
) -> dict[str, object]:
    """Generate (or reuse) the shaped dataset under ``work_dir``, time the evaluator and the baseline.

    Returns the report (median wall time over ``repeats`` fresh processes, RSS, tracemalloc peak, the
    global metrics of both tools and their differences) and writes it as JSON to ``json_path`` if given.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    load_at_start = load_average()
    rows = list(shape_rows) if shape_rows is not None else read_shape_table()
    generated = generate_shaped_dataset(Path(work_dir) / "davis2017-shaped", rows, seed=seed, workers=workers)
    with_baseline = baseline and _vos_benchmark_available()
    ours_runs, vos_runs = [], []
    for _ in range(repeats):  # interleaved, so that a burst of load from other jobs hits both tools
        ours_runs.append(_measure_in_subprocess("ours", generated, workers))
        if with_baseline:
            vos_runs.append(_measure_in_subprocess("vos_benchmark", generated, workers))
    traced = _measure_in_subprocess("ours", generated, workers, trace=True)
    ours = _summarise(ours_runs, traced)
    report: dict[str, object] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": load_average(),
        },
        "dataset": {
            "sequences": len(rows),
            "frames": sum(row.frames for row in rows),
            "scored_frames": sum(row.frames - 2 for row in rows),
            "objects": sum(row.objects for row in rows),
            "sizes": sorted({f"{row.width}x{row.height}" for row in rows}),
            "seed": seed,
        },
        "workers": workers,
        "repeats": repeats,
        "harness.evaluation": ours,
        "official_davis2017_evaluation_reference": OFFICIAL_REFERENCE,
    }
    if with_baseline:
        vos = _summarise(vos_runs, None)
        report["vos_benchmark"] = vos
        report["speedup_vs_vos_benchmark"] = vos["median_seconds"] / ours["median_seconds"]
        report["cpu_ratio_vs_vos_benchmark"] = vos["median_cpu_seconds"] / ours["median_cpu_seconds"]
        report["abs_difference_vs_vos_benchmark"] = {
            key: abs(float(ours["global"][key]) - float(value)) for key, value in vos["global"].items()
        }
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _format_load(load: list[float] | None) -> str:
    return "/".join(f"{value:.1f}" for value in load) if load else "n/a"


def format_table(report: dict[str, object]) -> str:
    """A short human-readable summary of ``run_benchmark``'s report."""
    data = report["dataset"]
    lines = [
        f"DAVIS-shaped data: {data['sequences']} sequences, {data['frames']} frames "
        f"({data['scored_frames']} scored), {data['objects']} objects, sizes {', '.join(data['sizes'])}; "
        f"{report['machine']['usable_cores']} usable cores, {report['workers']} workers; load average "
        f"{_format_load(report['machine']['load_average_at_start'])} at start, "
        f"{_format_load(report['machine']['load_average_at_end'])} at end",
        f"{'tool':<20} {'median s':>9} {'runs s':>22} {'CPU s':>7} {'maxRSS MB':>10} {'dRSS MB':>8} "
        f"{'traced MB':>10} {'J&F-Mean':>12}",
    ]
    for tool in ("harness.evaluation", "vos_benchmark"):
        if tool not in report:
            continue
        entry = report[tool]
        runs = " ".join(f"{s:.2f}" for s in entry["seconds"])
        traced = entry.get("traced_peak_mb")
        traced_text = f"{traced:.1f}" if traced is not None else "-"
        lines.append(
            f"{tool:<20} {entry['median_seconds']:>9.2f} {runs:>22} {entry['median_cpu_seconds']:>7.2f} "
            f"{entry['max_rss_mb']:>10.1f} "
            f"{entry['rss_delta_mb']:>8.1f} {traced_text:>10} {entry['global']['J&F-Mean']:>12.9f}"
        )
    if "speedup_vs_vos_benchmark" in report:
        differences = ", ".join(f"{k} {v:.2e}" for k, v in report["abs_difference_vs_vos_benchmark"].items())
        speedup, cpu_ratio = report["speedup_vs_vos_benchmark"], report["cpu_ratio_vs_vos_benchmark"]
        lines.append(
            f"speed-up over vos_benchmark: {speedup:.2f}x wall, {cpu_ratio:.2f}x CPU; "
            f"|difference|: {differences}"
        )
    reference = report["official_davis2017_evaluation_reference"]
    lines.append(
        f"official davis2017-evaluation on this shape (reference README): {reference['seconds']} s, "
        f"{reference['memory_gb']} GB"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.bench.evaluation", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/benchmarks"),
        help="folder for evaluation.json, or a path ending in .json",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("cache/bench/evaluation"),
        help="where the generated dataset lives (reused between runs)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape-table", type=Path, default=DEFAULT_SHAPE_TABLE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="do not time vos_benchmark")
    # Internal: one measurement in this process, printed as a JSON line (used by run_benchmark).
    parser.add_argument("--measure", choices=("ours", "vos_benchmark"), help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--predictions", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure is not None:
        if args.measure == "ours":
            measured = _measure_ours(args.dataset, args.predictions, args.workers, args.tracemalloc)
        else:
            measured = _measure_vos_benchmark(args.dataset, args.predictions, args.workers)
        print(json.dumps(measured))
        return 0

    json_path = args.out if args.out.suffix == ".json" else args.out / "evaluation.json"
    try:
        report = run_benchmark(
            args.work_dir,
            repeats=args.repeats,
            shape_rows=read_shape_table(args.shape_table),
            seed=args.seed,
            baseline=not args.no_baseline,
            workers=args.workers,
            json_path=json_path,
        )
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(report))
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
