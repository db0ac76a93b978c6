"""Command line of the study runner: ``python -m harness.study STUDY ...`` and ``harness sweep STUDY ...``.

``add_sweep_arguments`` and ``sweep_from_args`` let ``harness/cli.py`` offer the same options; the
``worker`` form is internal (started by a sweep with ``--workers N``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import HarnessError, interrupted_exit_status


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", type=Path, help="study file (YAML), e.g. studies/quickstart.yaml")
    parser.add_argument(
        "--storage",
        help="Optuna storage: a journal file path (default studies-storage/<study>.journal) or an RDB URL "
        "such as postgresql://user@host/db for several machines",
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default diffvos)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    parser.add_argument(
        "--n-trials", type=int, default=None, help="trial budget of the whole study (overrides the file)"
    )
    parser.add_argument(
        "--output-root", type=Path, default=Path("runs"), help="trial outputs go to ROOT/<study>/trial-<n>"
    )
    parser.add_argument(
        "--storage-dir", type=Path, default=Path("studies-storage"), help="folder of default journal files"
    )
    parser.add_argument(
        "--heartbeat-interval", type=int, default=10, help="seconds between heartbeats (RDB storage)"
    )
    parser.add_argument(
        "--grace-period", type=int, default=None, help="seconds before a silent trial is failed"
    )
    parser.add_argument(
        "--fail-running",
        action="store_true",
        help="first mark RUNNING trials failed and retry them (after a crash, when no other worker runs)",
    )
    parser.add_argument(
        "--validate", action="store_true", help="only check the study file and print its size"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines (only failures and the summary), for logs"
    )
    parser.add_argument(
        "--skip-checks",
        action="store_true",
        help="skip the pre-flight checks of dataset, weights and disk (e.g. weights downloaded on first use)",
    )


def _tracking_config(
    tracking_uri: str | None, experiment: str | None, artifact_location: str | None = None
) -> object:
    from harness.tracking import DEFAULT_EXPERIMENT, TrackingConfig

    return TrackingConfig(
        tracking_uri=tracking_uri,
        experiment=experiment or DEFAULT_EXPERIMENT,
        artifact_location=artifact_location,
    )


def sweep_from_args(args: argparse.Namespace) -> int:
    """Run (or validate) the sweep the parsed arguments describe; prints the summary."""
    from harness.study.spec import load_study_spec
    from harness.study.storage import HeartbeatSettings
    from harness.study.sweep import run_sweep

    if args.validate:
        spec = load_study_spec(args.study)
        grid = spec.grid_size()
        print(
            f"{args.study}: study {spec.name!r} is valid; {len(spec.search_space)} searched setting(s), "
            f"sampler {spec.sampler.type}"
            + (f", {grid} grid points" if grid is not None else "")
            + f", budget {spec.target_trials(args.n_trials)} trials"
        )
        return 0
    summary = run_sweep(
        args.study,
        storage=args.storage,
        tracking=_tracking_config(args.tracking_uri, args.experiment),
        workers=args.workers,
        n_trials=args.n_trials,
        output_root=args.output_root,
        storage_dir=args.storage_dir,
        heartbeat=HeartbeatSettings(interval=args.heartbeat_interval, grace_period=args.grace_period),
        fail_running=args.fail_running,
        quiet=getattr(args, "quiet", False),
        check=not getattr(args, "skip_checks", False),
    )
    print(summary.format())
    return 0 if summary.ok else 1


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.study worker", description="one worker of a sweep"
    )
    parser.add_argument("study", type=Path)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--artifact-location", default=None)
    parser.add_argument("--parent-run-id", required=True)
    parser.add_argument("--target", type=int, required=True, help="trial budget of the whole study")
    parser.add_argument(
        "--max-trials", type=int, default=None, help="at most this many trials in this worker"
    )
    parser.add_argument("--output-root", type=Path, required=True)
    parser.add_argument("--heartbeat-interval", type=int, default=10)
    parser.add_argument("--grace-period", type=int, default=None)
    parser.add_argument("--max-retry", type=int, default=1)
    parser.add_argument("--worker-index", type=int, default=0)
    parser.add_argument("--stream", default="0", help="the sweep process's sampler seed stream")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--n-workers", type=int, default=1, help="workers sharing the budget (for the ETA)")
    return parser


def worker_main(argv: list[str]) -> int:
    from harness.study.progress import SweepProgress
    from harness.study.spec import load_study_spec
    from harness.study.storage import HeartbeatSettings, resolve_storage
    from harness.study.sweep import WORKER_STOPPED_EXIT, run_worker
    from harness.tracking import StudyTracker

    args = _worker_parser().parse_args(argv)
    spec = load_study_spec(args.study)
    tracker = StudyTracker(
        _tracking_config(args.tracking_uri, args.experiment, args.artifact_location), spec.name
    )
    progress = SweepProgress(
        spec.name,
        args.target,
        spec.objective.metric,
        workers=args.n_workers,
        quiet=args.quiet,
        label=f"worker {args.worker_index}",
    )
    outcome = run_worker(
        spec,
        resolve_storage(args.storage, spec.name),
        tracker=tracker,
        parent_run_id=args.parent_run_id,
        target=args.target,
        max_trials=args.max_trials,
        output_root=args.output_root,
        heartbeat=HeartbeatSettings(args.heartbeat_interval, args.grace_period, args.max_retry),
        worker_index=args.worker_index,
        final_update=False,  # the sweep that started this worker summarises the study once at the end
        stream=args.stream,
        progress=progress,
    )
    return WORKER_STOPPED_EXIT if outcome.stop_reason else 0


def dashboard_main(argv: list[str]) -> int:
    from harness.study.dashboard import serve

    parser = argparse.ArgumentParser(
        prog="python -m harness.study dashboard", description="optuna-dashboard over every local study"
    )
    parser.add_argument("--storage-dir", type=Path, default=Path("studies-storage"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    serve(args.storage_dir, args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "worker":
            return worker_main(argv[1:])
        if argv and argv[0] == "dashboard":
            return dashboard_main(argv[1:])
        parser = argparse.ArgumentParser(
            prog="python -m harness.study", description="run an Optuna study of the VOS pipeline"
        )
        add_sweep_arguments(parser)
        return sweep_from_args(parser.parse_args(argv))
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return interrupted_exit_status()
