"""The `harness` command line. Each subcommand imports its module lazily so `harness --help` is quick."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError, HarnessError, HarnessWarning, interrupted_exit_status


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem})") from error


def cmd_data_synth(args: argparse.Namespace) -> int:
    from harness.data.synth import make_synthetic_dataset

    root = make_synthetic_dataset(Path(args.out), overwrite=args.overwrite)
    print(f"synthetic dataset written to {root}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from harness.data.download import download_davis2017

    root = download_davis2017(Path(args.root))
    print(f"DAVIS-2017 is ready in {root}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from harness.data import open_dataset
    from harness.evaluation import ScoringPlan, evaluate_dataset, write_results

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    dataset = open_dataset(args.root, args.split)
    plan = ScoringPlan.of(dataset)
    result = evaluate_dataset(dataset, Path(args.predictions), progress=not args.quiet)
    if result.skipped:
        warnings.warn(
            f"no object in the first-frame mask of {', '.join(result.skipped)}: skipped in the scores",
            HarnessWarning,
            stacklevel=1,
        )
    write_results(result, out, args.split)
    _print_metrics(result.global_metrics)
    print(plan.summary())
    return 0


def _print_metrics(metrics: dict[str, float]) -> None:
    print("  ".join(f"{name} {value:.4f}" for name, value in metrics.items()))


def cmd_run(args: argparse.Namespace) -> int:
    from harness.config import RunConfig
    from harness.pipeline import run

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    overrides = dict(_parse_override(item) for item in args.set or [])
    if overrides:
        config = config.with_overrides(overrides)
    if args.quiet:
        config = config.with_overrides({"progress": False})
    result = _run_tracked(config, args) if args.track else run(config)
    print(result.sequence_table)
    print(f"predictions: {result.predictions_dir}")
    if result.metrics is not None:
        _print_metrics(result.metrics)
    if result.scoring is not None:
        print(result.scoring.summary())
    if result.submission_zip is not None:
        print(f"submission archive: {result.submission_zip}")
    if args.overlays:
        _write_run_overlays(result, args.overlays)
    return 0


def _run_tracked(config: Any, args: argparse.Namespace) -> Any:
    """``harness run --track``: the run logged to MLflow like a sweep trial, beside that study's trials."""
    from harness.study.preflight import check_tracking_store
    from harness.tracking import TrackingConfig, resolve_tracking_uri, track_run

    # as a sweep does: an unreachable or wrong tracking store is one line before the run, not a traceback
    # (or a long hang) after it
    check_tracking_store(resolve_tracking_uri(args.tracking_uri))
    tracking = TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment)
    result, run_id = track_run(config, tracking, study=args.study, worst_sequences=args.overlays or 3)
    print(f"tracked: MLflow run {run_id} (experiment {args.experiment}, study {args.study})")
    return result


def _write_run_overlays(result: Any, count: int) -> None:
    """``harness run --overlays [N]``: GIFs of the N lowest-J&F sequences into ``<output_dir>/overlays``."""
    from harness.tracking.artifacts import write_worst_sequence_gifs

    written = write_worst_sequence_gifs(result, Path(result.output_dir) / "overlays", count)
    for path in written:
        print(f"overlay: {path}")


def cmd_backbones_list(args: argparse.Namespace) -> int:
    from backbones import available_backbones, describe_backbone
    from backbones.status import weights_summary

    if args.layers:
        info = describe_backbone(args.layers)
        print(f"{args.layers}: default t {info['default_timestep']}, default layer {info['default_layer']}")
        if info.get("weights"):
            print(f"weights: {info['weights']}")
        print(f"{'layer':>8}  {'channels':>8}  {'stride':>6}")
        for layer in info["layers"]:
            print(f"{layer['layer']!s:>8}  {layer['channels']:>8}  {layer['stride']:>6}")
        return 0
    rows = [("name", "default t", "default layer", "ensemble", "weights here")]
    for name in available_backbones():
        info = describe_backbone(name)
        ensemble = str(info.get("default_ensemble_size", 1))
        default_t, default_layer = str(info["default_timestep"]), str(info["default_layer"])
        rows.append((name, default_t, default_layer, ensemble, weights_summary(name)))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        )
    print("layers of one backbone: harness backbones list --layers NAME")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from harness.features import FeatureCache, default_cache_dir, default_max_bytes, format_cache_info

    configured_dir, max_gb = None, None
    if args.config:
        from harness.config import RunConfig

        config = RunConfig.from_yaml(args.config)
        configured_dir, max_gb = config.cache.dir, config.cache.max_gb
    root = Path(args.dir or configured_dir or default_cache_dir()).expanduser()
    cache = FeatureCache(root)
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed} entries from {root}")
        return 0
    if max_gb is not None:
        cache.max_bytes, source = int(max_gb * 1024**3), f"cache.max_gb in {args.config}"
    else:
        cache.max_bytes, source = default_max_bytes(root), "the default: half of (cache size + free disk)"
    print(format_cache_info(cache.info(breakdown=True, cap_source=source)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from harness.study.cli import sweep_from_args

    return sweep_from_args(args)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness.tracking import resolve_tracking_uri
    from harness.tracking.leaderboard import export_leaderboards

    paths = export_leaderboards(
        resolve_tracking_uri(args.tracking_uri), args.experiment, Path(args.out), args.study
    )
    if not paths:
        print("no finished trials in the tracking store yet")
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from harness.reproduce import main_from_args

    return main_from_args(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench.runner import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", description="Zero-shot video object segmentation with diffusion features."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="create or download datasets").add_subparsers(
        dest="action", required=True
    )
    synth = data.add_parser("synth", help="write the built-in synthetic dataset (DAVIS-2017 layout)")
    synth.add_argument("--out", default="data/synth")
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(func=cmd_data_synth)
    download = data.add_parser("download", help="download an official dataset")
    download.add_argument("dataset", choices=["davis2017"])
    download.add_argument("--root", default="data/DAVIS")
    download.set_defaults(func=cmd_data_download)

    evaluate = sub.add_parser("evaluate", help="DAVIS-2017 semi-supervised evaluation of a prediction folder")
    evaluate.add_argument("--root", required=True, help="dataset root (DAVIS-2017 layout)")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--predictions", required=True, help="folder with <sequence>/<frame>.png")
    evaluate.add_argument("--out", required=True, help="folder for the result CSVs")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    run = sub.add_parser("run", help="extract features, propagate masks, evaluate")
    run.add_argument("--config", help="YAML run configuration (defaults: built-in synthetic data)")
    run.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. backbone.timestep=50"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--track",
        action="store_true",
        help="log the run to MLflow like a sweep trial (params, metrics, artifacts)",
    )
    run.add_argument("--study", default="runs", help="with --track: the study the run joins (default: runs)")
    run.add_argument(
        "--tracking-uri", help="with --track: default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    run.add_argument("--experiment", default="diffvos", help="with --track: the MLflow experiment")
    run.add_argument(
        "--overlays",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="N",
        help="write GIFs of the N (default 3) lowest-J&F sequences to <output_dir>/overlays "
        "(misses yellow, false labels magenta)",
    )
    run.set_defaults(func=cmd_run)

    backbones = sub.add_parser("backbones", help="feature extractors").add_subparsers(
        dest="action", required=True
    )
    listing = backbones.add_parser("list", help="backbones, default t and layer, whether weights are here")
    listing.add_argument("--layers", metavar="NAME", help="the layer table of backbone NAME")
    listing.set_defaults(func=cmd_backbones_list)

    sweep = sub.add_parser("sweep", help="create or resume an Optuna study (studies/*.yaml)")
    from harness.study.cli import add_sweep_arguments

    add_sweep_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)

    leaderboard = sub.add_parser("leaderboard", help="export leaderboard CSV/Markdown files from MLflow")
    leaderboard.add_argument(
        "--study", help="only this study (default: every study, plus one across studies)"
    )
    leaderboard.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    leaderboard.add_argument("--experiment", default="diffvos")
    leaderboard.add_argument("--out", default="results/leaderboards", help="folder (ignored by git)")
    leaderboard.set_defaults(func=cmd_leaderboard)

    reproduce = sub.add_parser(
        "reproduce", help="run a published system with its released settings; compare J&F with the paper"
    )
    reproduce.add_argument("system", nargs="?", help="e.g. paper-adm, dift-sd21 (see --list)")
    reproduce.add_argument("--list", action="store_true", help="the systems, published J&F, weights needed")
    reproduce.add_argument("--dry-run", action="store_true", help="print the resolved configuration only")
    reproduce.add_argument("--dataset", help="DAVIS-2017 root (default data/DAVIS)")
    reproduce.add_argument("--output", help="output folder (default runs/reproduce/<system>)")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce.add_argument(
        "--no-track", action="store_true", help="do not log the run to MLflow (study 'reproduce')"
    )
    reproduce.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    reproduce.add_argument("--experiment", default="diffvos", help="the MLflow experiment")
    reproduce.set_defaults(func=cmd_reproduce)

    bench = sub.add_parser("bench", help="benchmarks (see results/benchmarks/README.md)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    cache = sub.add_parser("cache", help="the on-disk feature cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--dir", help="cache folder (default: $DIFFVOS_CACHE_DIR or ./cache/features)")
    cache.add_argument("--config", help="a run configuration whose cache.dir and cache.max_gb to use")
    cache.set_defaults(func=cmd_cache)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    """Harness warnings as one line on stderr (not Python's file:line + source form)."""
    if issubclass(category, HarnessWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _DEFAULT_SHOWWARNING(message, category, *args, **kwargs)  # type: ignore[arg-type]


_DEFAULT_SHOWWARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after `bench` (including --help) belongs to the benchmark runner's own parser.
        from harness.bench.runner import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", HarnessWarning)
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return interrupted_exit_status()


if __name__ == "__main__":
    sys.exit(main())
