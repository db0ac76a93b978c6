"""The ``harness bench`` entry point: dispatch to the sub-benchmarks, print, write reports.

The shared helpers live in :mod:`harness.bench.common`; sub-benchmarks import those, and this module
imports the sub-benchmarks on demand, so there is no import cycle.

    python -m harness.bench propagation|sweep|evaluation|extraction|smoke|all [--device cpu|cuda] [--quick]
        [--full] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from harness.bench.common import SUB_BENCHMARKS, BenchOptions, write_report
from harness.errors import ConfigError, HarnessError
from harness.tracking.environment import load_average, machine_info, versions

# -- dispatch ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubBenchmark:
    """How to run one sub-benchmark and how to print its report."""

    run: Callable[[BenchOptions], dict[str, Any]]
    format: Callable[[dict[str, Any]], str]


def _sub_benchmark(name: str) -> SubBenchmark:
    """Imported on demand: the extraction benchmark pulls in diffusers, the sweep the whole pipeline."""
    if name == "propagation":
        from harness.bench import propagation

        return SubBenchmark(propagation.run, propagation.format_report)
    if name == "sweep":
        from harness.bench import sweep

        return SubBenchmark(sweep.run, sweep.format_report)
    if name == "extraction":
        from harness.bench import extraction

        return SubBenchmark(extraction.run, extraction.format_report)
    if name == "smoke":
        from harness.bench import smoke

        return SubBenchmark(smoke.run, smoke.format_report)
    if name == "evaluation":
        return SubBenchmark(run_evaluation, format_evaluation)
    raise ConfigError(f"unknown benchmark {name!r}; choose from {', '.join((*SUB_BENCHMARKS, 'all'))}")


def run_evaluation(options: BenchOptions) -> dict[str, Any]:
    """The evaluation benchmark (:mod:`harness.bench.evaluation`) inside the common report format.

    It is not reduced on a CPU: its target is stated for 2 cores at the full DAVIS-17 val shape.
    """
    from harness.bench import evaluation

    if options.quick:
        rows = [
            evaluation.ShapeRow("walk", frames=6, objects=2, width=96, height=64),
            evaluation.ShapeRow("jump", frames=4, objects=1, width=120, height=80),
        ]
        notes = ["--quick: a 2-sequence toy shape instead of DAVIS-17 val; numbers mean nothing"]
    else:
        rows = evaluation.read_shape_table()
        notes = ["DAVIS-17 val shape (30 sequences, 1999 frames, 61 objects), masks generated; full size"]
    repeats = options.repeats_or(1 if options.quick else 3)
    report = evaluation.run_benchmark(
        Path(options.work_dir) / ("evaluation-quick" if options.quick else "evaluation"),
        repeats=repeats,
        shape_rows=rows,
        json_path=None,
    )
    ours = report["harness.evaluation"]
    targets = {
        "seconds_below": 10.0,
        "memory_mb_below": 1024.0,
        "met_seconds": ours["median_seconds"] < 10.0,
        "met_memory": ours["max_rss_mb"] < 1024.0,
    }
    return {
        "settings": {"scale": options.scale, "repeats": repeats, "sequences": len(rows)},
        "notes": [*notes, "each measurement runs in a fresh process; max RSS is the whole process's"],
        "targets": targets,
        "results": report,
    }


def format_evaluation(report: dict[str, Any]) -> str:
    from harness.bench import evaluation

    targets = report["targets"]
    verdict = (
        f"target (< 10 s and < 1 GB on 2 cores): time {'met' if targets['met_seconds'] else 'MISSED'}, "
        f"memory {'met' if targets['met_memory'] else 'MISSED'}"
    )
    return evaluation.format_table(report["results"]) + "\n" + verdict


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="harness bench",
        description="Speed and memory of the harness against the released code's algorithms, measured "
        "in the same run. Prints median tables and writes <out>/<name>.json.",
    )
    parser.add_argument("benchmark", choices=(*SUB_BENCHMARKS, "all"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: only checks that everything runs")
    parser.add_argument("--full", action="store_true", help="DAVIS-scale sizes on a CPU too (slow, ~10 GB)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"), help="folder for <name>.json")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("cache/bench"), help="generated data and caches (reused)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: per benchmark)")
    parser.add_argument(
        "--sd21-config",
        type=Path,
        default=None,
        help="folder with the SD 2.1 diffusers configs (default: ../shared/reference/sd21)",
    )
    parser.add_argument(
        "--real-data",
        type=Path,
        default=None,
        help="DAVIS-layout folder of real footage for the propagation screening check "
        "(default: ../shared/data/davis2017-real; skipped when absent)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in extraction")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``harness bench`` / ``python -m harness.bench``; returns the exit status."""
    args = _parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        options = BenchOptions(
            device=device,
            quick=args.quick,
            full=args.full,
            out_dir=args.out,
            work_dir=args.work_dir,
            repeats=args.repeats,
            sd21_config=args.sd21_config,
            real_data=args.real_data,
            compile=args.compile,
        )
        names = list(SUB_BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
        for name in names:
            run_one(name, options, argv)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run_one(name: str, options: BenchOptions, argv: Sequence[str] | None = None) -> Path:
    """Run one sub-benchmark, print its table and write its JSON; returns the JSON path."""
    bench = _sub_benchmark(name)
    command = "python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"== {name} ({options.scale}, {options.device}) ==", flush=True)
    started = _dt.datetime.now(_dt.UTC)
    load_at_start = load_average()
    clock = time.perf_counter()
    report = bench.run(options)
    envelope = {
        "command": command.strip(),
        "started_utc": started.isoformat(timespec="seconds"),
        "benchmark_seconds": time.perf_counter() - clock,
        "machine": machine_info(options.device)
        | {"load_average_at_start": load_at_start, "load_average_at_end": load_average()},
        "versions": versions(),
        "options": asdict(options) | {"scale": options.scale},
    }
    print(bench.format(report))
    for note in report.get("notes", []):
        print(f"note: {note}")
    path = write_report(name, report, options, envelope)
    print(f"wrote {path}", flush=True)
    return path
