"""One run, end to end: dataset -> frames -> backbone features (cached) -> method (harness.methods, label
propagation by default) -> masks -> evaluation.

Predictions are written into a staging folder and moved into place only when the run succeeds, so a
failed or killed run never leaves a half-written prediction folder that looks complete.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from backbones import Backbone, LayerKey, load_backbone
from harness.config import RunConfig
from harness.data import Dataset, Sequence, open_dataset, write_mask
from harness.data.masks import VOID_ID
from harness.errors import ConfigError, HarnessError
from harness.evaluation import EvaluationResult, ObjectScores, evaluate_sequence, write_results
from harness.features import (
    CacheStats,
    FeatureCache,
    default_cache_dir,
    extract_sequence_features,
)
from harness.frames import frame_cache_id, load_network_inputs, network_input_size
from harness.memory_check import check_run_memory
from harness.methods import SequenceContext, get_method


@dataclass(frozen=True)
class SequenceOutcome:
    """What a finished sequence reports (used for per-sequence pruning and logging)."""

    index: int
    name: str
    num_frames: int
    object_ids: list[int]
    #: None when the sequence has no full ground truth
    scores: list[ObjectScores] | None
    seconds: dict[str, float]
    #: the method's per-sequence diagnostics (SequenceContext.metrics)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def jf(self) -> float | None:
        """Mean of (J + F) / 2 over the sequence's objects."""
        if not self.scores:
            return None
        return float(np.mean([(s.j_statistics.mean + s.f_statistics.mean) / 2 for s in self.scores]))


@dataclass
class RunResult:
    config: RunConfig
    output_dir: Path
    predictions_dir: Path
    timestep: int
    layer: LayerKey
    #: global metrics (J&F-Mean, J-Mean, ...) when the dataset has ground truth
    metrics: dict[str, float] | None
    evaluation: EvaluationResult | None
    sequences: list[SequenceOutcome]
    timings: dict[str, float] = field(default_factory=dict)
    cache_stats: CacheStats | None = None
    submission_zip: Path | None = None
    #: the method's per-sequence diagnostics summed over the sequences (also in ``metrics`` when scored)
    method_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def per_sequence_jf(self) -> dict[str, float]:
        return {o.name: o.jf for o in self.sequences if o.jf is not None}


def build_cache(config: RunConfig) -> FeatureCache | None:
    if not config.cache.enabled:
        return None
    root = Path(config.cache.dir) if config.cache.dir else default_cache_dir()
    max_bytes = int(config.cache.max_gb * 1024**3) if config.cache.max_gb else None
    return FeatureCache(root, max_bytes=max_bytes, fp16=config.cache.fp16)


def build_backbone(config: RunConfig) -> Backbone:
    spec = config.backbone
    options = dict(spec.options)
    if spec.dtype != "fp32":
        options.setdefault("dtype", spec.dtype)
    return load_backbone(spec.name, weights=spec.weights, device=spec.device, **options)


def _id_lookup(object_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Tables mapping dataset ids -> channels (1..K, void and unknown -> 0) and channels -> ids."""
    to_channel = np.zeros(256, dtype=np.int64)
    for channel, object_id in enumerate(object_ids, start=1):
        to_channel[object_id] = channel
    to_id = np.array([0, *object_ids], dtype=np.uint8)
    return to_channel, to_id


#: prefetched layers are held in memory for a whole sequence; skip those that would exceed this
PREFETCH_BUDGET_BYTES = 2 * 1024**3


def _layers_to_extract(
    backbone: Backbone,
    layer: LayerKey,
    prefetch: list[int | str] | None,
    *,
    num_frames: int,
    input_size: tuple[int, int],
) -> list[LayerKey]:
    """The requested layer first, then the prefetched ones (one forward pass fills the cache for all).

    Fine layers (e.g. ADM's stride-1 blocks) are too large to hold for a whole sequence; prefetched layers
    are added only while their float32 features stay within :data:`PREFETCH_BUDGET_BYTES`.
    """
    table = backbone.layers()
    layers = [layer]
    budget = PREFETCH_BUDGET_BYTES
    for extra in prefetch or []:
        key = backbone.resolve_layer(extra)
        info = table[key]
        size = (
            num_frames * info.channels * (input_size[0] // info.stride) * (input_size[1] // info.stride) * 4
        )
        if key not in layers and size <= budget:
            layers.append(key)
            budget -= size
    return layers


def predict_sequence(
    sequence: Sequence,
    backbone: Backbone,
    config: RunConfig,
    *,
    timestep: int,
    layer: LayerKey,
    out_dir: Path,
    palette: list[int],
    cache: FeatureCache | None,
    layout: str = "davis",
    metrics: dict[str, float] | None = None,
) -> dict[str, float]:
    """Write the predicted masks of one sequence into ``out_dir`` with the configured method; returns
    timings in seconds. The method's diagnostics are added to ``metrics`` when a dict is passed."""
    width, height = sequence.frame_size()
    input_size = network_input_size(
        width, height, config.input.short_side, backbone.size_multiple, layout=layout
    )
    spec = config.backbone
    method = get_method(config.method.name)

    started = time.perf_counter()
    frame_ids = [frame_cache_id(path, layout) for path in sequence.frames]
    device = backbone.device if backbone.device.type != "meta" else torch.device("cpu")

    def load_frames(indices: list[int]) -> torch.Tensor:
        return load_network_inputs([sequence.frames[i] for i in indices], input_size, layout)

    def extract(
        *,
        layer: LayerKey = layer,
        timestep: int = timestep,
        ensemble_size: int | None = spec.ensemble_size,
        condition: dict | None = None,
        prefetch: list[int | str] | None = None,
    ) -> Callable[[int], torch.Tensor]:
        """Features of every frame through the cache, as a frame -> (C, h, w) reader on the run's device."""
        if condition is not None:
            raise ConfigError(
                "conditioned feature extraction (condition=...) is not supported by the feature cache yet"
            )
        resolved = backbone.resolve_layer(layer)
        stacked = extract_sequence_features(
            backbone,
            sequence=sequence.name,
            frame_ids=frame_ids,
            load_frames=load_frames,
            input_size=input_size,
            timestep=timestep,
            layers=_layers_to_extract(
                backbone, resolved, prefetch, num_frames=len(sequence.frames), input_size=input_size
            ),
            ensemble_size=backbone.resolve_ensemble_size(ensemble_size),
            seed=spec.seed,
            batch_size=spec.batch_size,
            dtype=spec.dtype,
            cache=cache,
            progress=config.progress,
        )[resolved].to(device)
        return stacked.__getitem__

    features = extract(prefetch=spec.prefetch_layers)
    extracted = time.perf_counter()

    first_mask = sequence.first_mask()
    object_ids = sequence.object_ids()
    to_channel, to_id = _id_lookup(object_ids)
    seq_dir = out_dir / sequence.name
    names = sequence.frame_names
    first = first_mask.copy()
    first[first == VOID_ID] = 0
    write_mask(seq_dir / f"{names[0]}.png", first, palette)

    def ground_truth(index: int) -> np.ndarray:
        return to_channel[sequence.load_mask(names[index])]

    ctx = SequenceContext(
        name=sequence.name,
        num_frames=len(sequence.frames),
        features=features,
        first_labels=to_channel[first_mask],
        num_classes=len(object_ids) + 1,
        input_size=input_size,
        output_size=(height, width),
        ground_truth=ground_truth if sequence.fully_annotated else None,
        device=device,
        progress=config.progress,
        layout=layout,
        extract_features=extract,
        backbone=backbone,
        load_frames=load_frames,
    )
    written = 0
    for index, labels in method.segment_sequence(ctx, config.method.settings):
        write_mask(seq_dir / f"{names[index]}.png", to_id[labels], palette)
        written += 1
    if written != len(names) - 1:
        raise HarnessError(
            f"method {config.method.name!r} yielded {written} masks for sequence {sequence.name!r}, "
            f"expected {len(names) - 1} (frames 1..{len(names) - 1})"
        )
    if metrics is not None:
        metrics.update(ctx.metrics)
    return {"extraction": extracted - started, "propagation": time.perf_counter() - extracted}


def _write_submission_zip(predictions: Path, out_dir: Path, dataset: Dataset) -> Path:
    """The archive the DAVIS test-dev / MOSE evaluation servers expect (PNG folders per sequence)."""
    prefix = "Annotations/" if dataset.layout == "mose" else ""
    target = out_dir / f"submission-{dataset.split}.zip"
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".zip.tmp", delete=False) as handle:
        tmp = Path(handle.name)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for png in sorted(predictions.rglob("*.png")):
                archive.write(png, prefix + png.relative_to(predictions).as_posix())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def run(
    config: RunConfig,
    *,
    backbone: Backbone | None = None,
    cache: FeatureCache | None = None,
    on_sequence: Callable[[SequenceOutcome], None] | None = None,
) -> RunResult:
    """Run the whole pipeline for ``config``.

    ``backbone`` and ``cache`` may be passed in so that a sweep reuses a loaded model across trials.
    ``on_sequence`` is called after every sequence (with its scores when ground truth exists); it may
    raise to stop the run early (e.g. Optuna pruning).
    """
    started = time.perf_counter()
    dataset = open_dataset(
        config.dataset.root, config.dataset.split, config.dataset.sequences, config.dataset.resolution
    )
    if backbone is None:
        backbone = build_backbone(config)
    timestep = backbone.check_timestep(
        config.backbone.timestep if config.backbone.timestep is not None else backbone.default_timestep
    )
    layer = backbone.resolve_layer(
        config.backbone.layer if config.backbone.layer is not None else backbone.default_layer
    )
    check_run_memory(config, dataset, backbone, layer)
    if cache is None:
        cache = build_cache(config)
    loaded = time.perf_counter()

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".predictions-", dir=output_dir))
    evaluate = config.evaluate and all(seq.fully_annotated for seq in dataset.sequences)
    outcomes: list[SequenceOutcome] = []
    timings = {"setup": loaded - started, "extraction": 0.0, "propagation": 0.0, "evaluation": 0.0}
    try:
        for index, sequence in enumerate(dataset.sequences):
            method_metrics: dict[str, float] = {}
            seconds = predict_sequence(
                sequence,
                backbone,
                config,
                timestep=timestep,
                layer=layer,
                out_dir=staging,
                palette=dataset.palette,
                cache=cache,
                layout=dataset.layout,
                metrics=method_metrics,
            )
            scores = None
            if evaluate:
                eval_start = time.perf_counter()
                scores = evaluate_sequence(sequence, staging)
                seconds["evaluation"] = time.perf_counter() - eval_start
            for key, value in seconds.items():
                timings[key] += value
            outcome = SequenceOutcome(
                index,
                sequence.name,
                len(sequence.frames),
                sequence.object_ids(),
                scores,
                seconds,
                metrics=method_metrics,
            )
            outcomes.append(outcome)
            if on_sequence is not None:
                on_sequence(outcome)
        predictions = output_dir / "predictions"
        if predictions.exists():
            shutil.rmtree(predictions)
        staging.replace(predictions)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    evaluation = None
    metrics = None
    if evaluate:
        evaluation = EvaluationResult.from_objects([s for o in outcomes for s in (o.scores or [])])
        write_results(evaluation, output_dir, dataset.split)
        metrics = dict(evaluation.global_metrics)
    method_metrics: dict[str, float] = {}
    for outcome in outcomes:
        for name, value in outcome.metrics.items():
            method_metrics[name] = method_metrics.get(name, 0.0) + float(value)
    if metrics is not None:
        metrics.update(method_metrics)  # logged with the run (e.g. the oracle's unfiltered query count)
    submission = None if evaluate else _write_submission_zip(predictions, output_dir, dataset)
    resolved = config.to_dict() | {
        "resolved": {
            "timestep": timestep,
            "layer": layer,
            "ensemble_size": backbone.resolve_ensemble_size(config.backbone.ensemble_size),
            "backbone": backbone.identity(),
        }
    }
    (output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    timings["total"] = time.perf_counter() - started
    return RunResult(
        config=config,
        output_dir=output_dir,
        predictions_dir=predictions,
        timestep=timestep,
        layer=layer,
        metrics=metrics,
        evaluation=evaluation,
        sequences=outcomes,
        timings=timings,
        cache_stats=cache.stats if cache is not None else None,
        submission_zip=submission,
        method_metrics=method_metrics,
    )
