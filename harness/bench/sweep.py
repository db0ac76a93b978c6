"""What the feature cache buys a study: many trials for little more than the cost of one.

(a) Affinity study: 20 trials that vary only the propagation settings, run through
:func:`harness.pipeline.run` against a warm feature cache, compared with independent runs that extract
every feature again (as the released code does in every trial). The target is a warm sweep that costs at
most twice one uncached trial.

(b) Layer sweep: every decoder layer of the backbone. Our path computes all layers in one forward pass per
frame (:func:`harness.features.extract_sequence_features` with every layer), then each trial reads its
layer from the cache; the baseline is one uncached run per layer.

Both use the synthetic dataset and "adm-tiny" (the ADM architecture at toy size, random weights) with an
ensemble of noise draws, so that feature extraction dominates a trial as it does for the real models. Both
arms share one loaded backbone (no arm pays for loading weights), and every warm trial must give the same
J&F as the uncached run with the same settings, or the benchmark fails.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from backbones import Backbone, load_backbone
from harness.bench.common import BenchOptions, format_table, synchronize
from harness.config import BackboneConfig, CacheConfig, DatasetConfig, InputConfig, MethodConfig, RunConfig
from harness.data import open_dataset
from harness.data.synth import SynthSpec, make_synthetic_dataset
from harness.features import FeatureCache, extract_sequence_features
from harness.frames import frame_cache_id, load_network_inputs, network_input_size
from harness.methods.labelprop import PropagationSettings
from harness.pipeline import RunResult
from harness.pipeline import run as run_pipeline

BACKBONE = "adm-tiny"
TIMESTEP = 30
TARGET_RATIO = 2.0
#: the affinity settings the study draws from (the paper's defaults are cosine, 0.2, 15, 15, 28)
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "similarity": ("cosine", "l2"),
    "temperature": (0.05, 0.1, 0.2, 0.5),
    "topk": (5, 10, 15, 20, 30),
    "radius": (8, 12, 15, 20),
    "n_last_frames": (4, 8, 28),
}


@dataclass(frozen=True)
class SweepSettings:
    """Sizes of both sweeps; see :func:`settings_for` for the presets."""

    synth: SynthSpec
    #: how many val sequences of the synthetic dataset to use
    sequences: int
    short_side: int
    ensemble_size: int
    batch_size: int
    #: the layer of the affinity study (adm-tiny's stride-4 layer keeps propagation cheap on a CPU)
    layer: int
    trials: int
    #: uncached runs actually measured; the 20-run baseline is projected from their median when fewer
    uncached_runs: int
    layer_sweep_sequences: int
    layer_sweep_short_side: int
    layer_sweep_ensemble: int
    #: None: every layer of the backbone
    layer_sweep_layers: tuple[int, ...] | None


def settings_for(options: BenchOptions) -> tuple[SweepSettings, list[str]]:
    if options.quick:
        settings = SweepSettings(
            synth=SynthSpec(sizes=((96, 64),), val_frames=8, test_dev_frames=2),
            sequences=1,
            short_side=32,
            ensemble_size=1,
            batch_size=4,
            layer=6,
            trials=2,
            uncached_runs=1,
            layer_sweep_sequences=1,
            layer_sweep_short_side=32,
            layer_sweep_ensemble=1,
            layer_sweep_layers=(0, 1),
        )
        return settings, ["--quick: toy sizes, 2 trials, layers 0 and 1; the numbers mean nothing"]
    if options.scale == "reduced":
        settings = SweepSettings(
            synth=SynthSpec(),
            sequences=2,
            short_side=64,
            ensemble_size=4,
            batch_size=2,
            layer=6,
            trials=20,
            uncached_runs=2,
            layer_sweep_sequences=1,
            layer_sweep_short_side=48,
            layer_sweep_ensemble=2,
            layer_sweep_layers=None,
        )
        return settings, [
            "reduced sizes on CPU: 2 of the 4 synthetic val sequences, short side 64, ensemble 4; "
            f"{settings.uncached_runs} uncached runs measured and their median projected to 20; the layer "
            "sweep uses 1 sequence, short side 48, ensemble 2"
        ]
    settings = SweepSettings(
        synth=SynthSpec(),
        sequences=4,
        short_side=96,
        ensemble_size=8,
        batch_size=2,
        layer=6,
        trials=20,
        uncached_runs=20,
        layer_sweep_sequences=4,
        layer_sweep_short_side=96,
        layer_sweep_ensemble=8,
        layer_sweep_layers=None,
    )
    return settings, []


def draw_trials(count: int, seed: int = 0) -> list[PropagationSettings]:
    """``count`` distinct propagation settings from :data:`SEARCH_SPACE`, the paper's defaults first."""
    rng = random.Random(seed)
    trials = [PropagationSettings()]
    seen = {repr(trials[0])}
    total = 1
    for values in SEARCH_SPACE.values():
        total *= len(values)
    if count > total:
        raise ValueError(f"the search space has only {total} settings, {count} asked for")
    while len(trials) < count:
        candidate = PropagationSettings(**{name: rng.choice(values) for name, values in SEARCH_SPACE.items()})
        key = repr(candidate)
        if key not in seen:
            seen.add(key)
            trials.append(candidate)
    return trials


# -- data and runs -----------------------------------------------------------------------------------


def synthetic_dataset(work_dir: Path, spec: SynthSpec) -> Path:
    """The synthetic dataset for ``spec`` under ``work_dir``, generated once and reused afterwards."""
    root = Path(work_dir) / "synth"
    marker = root / ".bench-spec.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if marker.is_file() and marker.read_text() == wanted:
        return root
    make_synthetic_dataset(root, spec, overwrite=True)
    marker.write_text(wanted)
    return root


@dataclass(frozen=True)
class _Arm:
    """What differs between the runs of one sweep."""

    root: Path
    sequences: list[str]
    short_side: int
    ensemble_size: int
    batch_size: int
    device: str
    output_dir: Path


def _config(arm: _Arm, layer: int, propagation: PropagationSettings, cached: bool) -> RunConfig:
    return RunConfig(
        dataset=DatasetConfig(root=str(arm.root), split="val", sequences=list(arm.sequences)),
        backbone=BackboneConfig(
            name=BACKBONE,
            timestep=TIMESTEP,
            layer=layer,
            ensemble_size=arm.ensemble_size,
            batch_size=arm.batch_size,
            device=arm.device,
        ),
        input=InputConfig(short_side=arm.short_side),
        method=MethodConfig(settings=propagation),
        cache=CacheConfig(enabled=cached),
        output_dir=str(arm.output_dir),
        evaluate=True,
        progress=False,
    )


def _trial(
    arm: _Arm,
    backbone: Backbone,
    layer: int,
    propagation: PropagationSettings,
    cache: FeatureCache | None,
) -> dict[str, Any]:
    """One pipeline run; wall time around it, the pipeline's own split, J&F and cache counters."""
    config = _config(arm, layer, propagation, cache is not None)
    synchronize(arm.device)
    start = time.perf_counter()
    result: RunResult = run_pipeline(config, backbone=backbone, cache=cache)
    synchronize(arm.device)
    seconds = time.perf_counter() - start
    assert result.metrics is not None, "the synthetic val split is fully annotated"
    stats = result.cache_stats
    return {
        "seconds": seconds,
        "split": {key: value for key, value in result.timings.items() if key != "total"},
        "jf": result.metrics["J&F-Mean"],
        "cache_hits": stats.hits if stats is not None else None,
        "cache_misses": stats.misses if stats is not None else None,
        "layer": layer,
        "propagation": asdict(propagation),
    }


def fill_cache_all_layers(arm: _Arm, backbone: Backbone, layers: list[int], cache: FeatureCache) -> float:
    """Features of every frame for all ``layers`` in one pass per batch, under the keys the pipeline uses."""
    dataset = open_dataset(arm.root, "val", arm.sequences)
    start = time.perf_counter()
    for sequence in dataset.sequences:
        width, height = sequence.frame_size()
        input_size = network_input_size(width, height, arm.short_side, backbone.size_multiple)
        paths = sequence.frames

        def load(indices: list[int], paths: list[Path] = paths, size: tuple[int, int] = input_size) -> Any:
            return load_network_inputs([paths[i] for i in indices], size)

        extract_sequence_features(
            backbone,
            sequence=sequence.name,
            frame_ids=[frame_cache_id(path) for path in paths],
            load_frames=load,
            input_size=input_size,
            timestep=TIMESTEP,
            layers=list(layers),
            ensemble_size=arm.ensemble_size,
            batch_size=arm.batch_size,
            cache=cache,
            progress=False,
        )
    synchronize(arm.device)
    return time.perf_counter() - start


def warm_up(backbone: Backbone, arm: _Arm, layers: list[int]) -> None:
    """One untimed forward pass per input size at the runs' batch shape: the first pass at a new shape
    pays one-off kernel set-up (oneDNN primitives on a CPU, cuDNN autotuning on a GPU), which would
    otherwise land on whichever arm happened to run first."""
    dataset = open_dataset(arm.root, "val", arm.sequences)
    sizes = {sequence.frame_size() for sequence in dataset.sequences}
    for width, height in sorted(sizes):
        input_size = network_input_size(width, height, arm.short_side, backbone.size_multiple)
        frames = torch.zeros((arm.batch_size, 3, *input_size))  # the batch shape the runs will use
        backbone.extract(
            frames,
            timestep=TIMESTEP,
            layers=list(layers),
            ensemble_size=arm.ensemble_size,
            seed=0,
            sequence="warm-up",
            frame_indices=list(range(arm.batch_size)),
        )


def _check_warm(trials: list[dict[str, Any]], what: str) -> None:
    for trial in trials:
        if trial["cache_misses"]:
            raise RuntimeError(
                f"{what}: a warm trial missed the cache {trial['cache_misses']} times; the fill and the "
                "pipeline disagree on the cache key, so the comparison would be meaningless"
            )


def _check_same_scores(warm: list[dict[str, Any]], uncached: list[dict[str, Any]], what: str) -> None:
    for ours, theirs in zip(warm, uncached, strict=False):
        if ours["jf"] != theirs["jf"]:
            raise RuntimeError(
                f"{what}: J&F {ours['jf']} from the cache but {theirs['jf']} uncached for the same settings"
            )


def affinity_study(
    settings: SweepSettings, options: BenchOptions, root: Path, backbone: Backbone, sequences: list[str]
) -> dict[str, Any]:
    work = Path(options.work_dir) / "sweep"
    cache_root = work / "cache-affinity"
    shutil.rmtree(cache_root, ignore_errors=True)
    arm = _Arm(
        root,
        sequences[: settings.sequences],
        settings.short_side,
        settings.ensemble_size,
        settings.batch_size,
        options.device,
        work / "runs-affinity",
    )
    trials = draw_trials(settings.trials)
    warm_up(backbone, arm, [settings.layer])
    cold = _trial(arm, backbone, settings.layer, trials[0], FeatureCache(cache_root))
    # the uncached runs are spread evenly among the warm trials, so that a burst of load from other jobs
    # on a shared machine does not fall on one arm only
    spacing = max(1, settings.trials // settings.uncached_runs)
    warm, uncached = [], []
    for index, trial in enumerate(trials):
        warm.append(_trial(arm, backbone, settings.layer, trial, FeatureCache(cache_root)))
        if index % spacing == 0 and len(uncached) < settings.uncached_runs:
            uncached.append(_trial(arm, backbone, settings.layer, trials[len(uncached)], None))
    _check_warm(warm, "affinity study")
    _check_same_scores(warm, uncached, "affinity study")
    uncached_median = statistics.median(run["seconds"] for run in uncached)
    warm_total = sum(run["seconds"] for run in warm)
    baseline_total = (
        sum(run["seconds"] for run in uncached)
        if len(uncached) == settings.trials
        else uncached_median * settings.trials
    )
    return {
        "sequences": arm.sequences,
        "frames": sum(len(s.frames) for s in open_dataset(root, "val", arm.sequences).sequences),
        "cold_fill": cold,
        "warm_trials": warm,
        "uncached_runs": uncached,
        "uncached_median_seconds": uncached_median,
        "warm_sweep_seconds": warm_total,
        "warm_ratio": warm_total / uncached_median,
        # robust to a burst of load from other jobs during a few trials: trials x the median warm trial
        "warm_ratio_from_median_trial": settings.trials
        * statistics.median(run["seconds"] for run in warm)
        / uncached_median,
        "study_with_fill_ratio": (cold["seconds"] + warm_total) / uncached_median,
        "baseline_total_seconds": baseline_total,
        "baseline_projected": len(uncached) != settings.trials,
        "speedup_vs_uncached": baseline_total / (cold["seconds"] + warm_total),
        "target_met": warm_total / uncached_median <= TARGET_RATIO,
    }


def layer_sweep(
    settings: SweepSettings, options: BenchOptions, root: Path, backbone: Backbone, sequences: list[str]
) -> dict[str, Any]:
    work = Path(options.work_dir) / "sweep"
    cache_root = work / "cache-layers"
    shutil.rmtree(cache_root, ignore_errors=True)
    layers = list(settings.layer_sweep_layers or [int(key) for key in backbone.layers()])
    arm = _Arm(
        root,
        sequences[: settings.layer_sweep_sequences],
        settings.layer_sweep_short_side,
        settings.layer_sweep_ensemble,
        settings.batch_size,
        options.device,
        work / "runs-layers",
    )
    propagation = PropagationSettings()
    warm_up(backbone, arm, layers)
    fill_seconds = fill_cache_all_layers(arm, backbone, layers, FeatureCache(cache_root))
    warm, uncached = [], []
    for layer in layers:  # alternating, for the same reason as in the affinity study
        warm.append(_trial(arm, backbone, layer, propagation, FeatureCache(cache_root)))
        uncached.append(_trial(arm, backbone, layer, propagation, None))
    _check_warm(warm, "layer sweep")
    _check_same_scores(warm, uncached, "layer sweep")
    ours_total = fill_seconds + sum(run["seconds"] for run in warm)
    baseline_total = sum(run["seconds"] for run in uncached)
    ours_extraction = fill_seconds + sum(run["split"]["extraction"] for run in warm)
    baseline_extraction = sum(run["split"]["extraction"] for run in uncached)
    return {
        "sequences": arm.sequences,
        "layers": layers,
        "fill_seconds": fill_seconds,
        "warm_trials": warm,
        "uncached_runs": uncached,
        "ours_total_seconds": ours_total,
        "baseline_total_seconds": baseline_total,
        "speedup": baseline_total / ours_total,
        "ours_extraction_seconds": ours_extraction,
        "baseline_extraction_seconds": baseline_extraction,
        "extraction_speedup": baseline_extraction / ours_extraction,
    }


def run(options: BenchOptions) -> dict[str, Any]:
    settings, notes = settings_for(options)
    root = synthetic_dataset(
        Path(options.work_dir) / ("sweep-quick" if options.quick else "sweep"), settings.synth
    )
    sequences = [sequence.name for sequence in open_dataset(root, "val").sequences]
    backbone = load_backbone(BACKBONE, device=options.device)
    load = getattr(backbone, "load", None)
    if callable(load):
        load()  # weights are built before any timing, for both arms
    affinity = affinity_study(settings, options, root, backbone, sequences)
    layers = layer_sweep(settings, options, root, backbone, sequences)
    notes = [
        *notes,
        f"backbone {BACKBONE} (random weights), time step {TIMESTEP}; both arms share the loaded model",
        f"warm ratio = {settings.trials} warm trials (cache filled beforehand by one cold run) / one "
        "uncached trial",
        "one untimed forward pass per input size and layer set warms the kernels up before any timing",
        "every warm trial's J&F equals the uncached run's with the same settings (checked)",
    ]
    return {
        "settings": asdict(settings) | {"scale": options.scale, "device": options.device},
        "notes": notes,
        "affinity_study": affinity,
        "layer_sweep": layers,
        "targets": {"warm_ratio_at_most": TARGET_RATIO, "met": affinity["target_met"]},
    }


def format_report(report: dict[str, Any]) -> str:
    study = report["affinity_study"]
    trials = len(study["warm_trials"])
    baseline_label = f"{trials} uncached runs" + (" (projected)" if study["baseline_projected"] else "")
    rows = [
        ["one uncached trial (median)", study["uncached_median_seconds"], 1.0],
        [
            "cold run filling the cache",
            study["cold_fill"]["seconds"],
            study["cold_fill"]["seconds"] / study["uncached_median_seconds"],
        ],
        [f"{trials} warm trials", study["warm_sweep_seconds"], study["warm_ratio"]],
        [
            f"{baseline_label}",
            study["baseline_total_seconds"],
            study["baseline_total_seconds"] / study["uncached_median_seconds"],
        ],
    ]
    lines = [
        f"(a) affinity study: {len(study['sequences'])} sequences, {study['frames']} frames",
        format_table(["what", "seconds", "x one uncached trial"], rows),
        f"warm sweep / one uncached trial = {study['warm_ratio']:.2f} (target <= {TARGET_RATIO:g}: "
        f"{'met' if study['target_met'] else 'MISSED'}); with the cache-filling run "
        f"{study['study_with_fill_ratio']:.2f}; speed-up of the whole study "
        f"{study['speedup_vs_uncached']:.1f}x; {trials} x the median warm trial / one uncached trial = "
        f"{study['warm_ratio_from_median_trial']:.2f}",
    ]
    sweep = report["layer_sweep"]
    layer_rows = [
        [
            f"layer {ours['layer']}",
            ours["seconds"],
            ours["split"]["extraction"],
            theirs["seconds"],
            theirs["split"]["extraction"],
            ours["jf"],
        ]
        for ours, theirs in zip(sweep["warm_trials"], sweep["uncached_runs"], strict=True)
    ]
    layer_rows.append(["fill (all layers)", sweep["fill_seconds"], sweep["fill_seconds"], None, None, None])
    layer_rows.append(
        [
            "total",
            sweep["ours_total_seconds"],
            sweep["ours_extraction_seconds"],
            sweep["baseline_total_seconds"],
            sweep["baseline_extraction_seconds"],
            None,
        ]
    )
    lines += [
        f"(b) layer sweep over {len(sweep['layers'])} layers, {len(sweep['sequences'])} sequence(s)",
        format_table(
            ["trial", "cached s", "cached extract s", "uncached s", "uncached extract s", "J&F"], layer_rows
        ),
        f"layer sweep speed-up {sweep['speedup']:.2f}x overall, "
        f"{sweep['extraction_speedup']:.2f}x in extraction",
    ]
    return "\n".join(lines)
