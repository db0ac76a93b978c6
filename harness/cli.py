"""The `harness` command line. Each subcommand imports its module lazily so `harness --help` is quick."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise HarnessError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


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
    from harness.evaluation import evaluate_dataset, write_results

    dataset = open_dataset(args.root, args.split)
    result = evaluate_dataset(dataset, Path(args.predictions), progress=not args.quiet)
    write_results(result, Path(args.out), args.split)
    _print_metrics(result.global_metrics)
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
    result = run(config)
    print(f"predictions: {result.predictions_dir}")
    if result.metrics is not None:
        _print_metrics(result.metrics)
    if result.submission_zip is not None:
        print(f"submission archive: {result.submission_zip}")
    return 0


def cmd_backbones_list(args: argparse.Namespace) -> int:
    from backbones import available_backbones, describe_backbone

    for name in available_backbones():
        info = describe_backbone(name)
        print(f"{name}: default t {info['default_timestep']}, default layer {info['default_layer']}")
        if info.get("weights"):
            print(f"  weights: {info['weights']}")
        for layer in info["layers"]:
            print(f"  layer {layer['layer']}: {layer['channels']} channels, stride {layer['stride']}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from harness.features import FeatureCache, default_cache_dir, format_cache_info

    cache = FeatureCache(Path(args.dir) if args.dir else default_cache_dir())
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed} entries from {cache.info().root}")
    else:
        print(format_cache_info(cache.info()))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from harness.study.cli import sweep_from_args

    return sweep_from_args(args)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness.leaderboard import export_leaderboards
    from harness.tracking import resolve_tracking_uri

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
    run.set_defaults(func=cmd_run)

    backbones = sub.add_parser("backbones", help="feature extractors").add_subparsers(
        dest="action", required=True
    )
    listing = backbones.add_parser("list", help="backbones, their layers and where weights are looked for")
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
    leaderboard.add_argument("--out", default="results")
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
    reproduce.set_defaults(func=cmd_reproduce)

    bench = sub.add_parser("bench", help="benchmarks (see results/benchmarks/README.md)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    cache = sub.add_parser("cache", help="the on-disk feature cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--dir", help="cache folder (default: $DIFFVOS_CACHE_DIR or ./cache/features)")
    cache.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
