"""One run, end to end: dataset -> frames -> backbone features (cached) -> method (harness.methods, label
propagation by default) -> masks -> evaluation.

Every output (predictions, CSVs, config, submission zip) is written into a staging folder and moved into
place together only when the run succeeds, so a failed or killed run never leaves a half-written or mixed
output folder.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from backbones import Backbone, LayerKey, load_backbone
from harness.config import RunConfig
from harness.data import Dataset, Sequence, open_dataset, write_mask
from harness.data.masks import VOID_ID
from harness.errors import ConfigError, DataError, HarnessError, HarnessWarning
from harness.evaluation import EvaluationResult, ObjectScores, ScoringPlan, evaluate_sequence, write_results
from harness.features import (
    CacheNotWritableError,
    CacheStats,
    FeatureCache,
    default_cache_dir,
    default_max_bytes,
    extract_sequence_features,
)
from harness.files import mkdtemp_shared
from harness.frames import frame_cache_id, load_network_inputs, network_input_size
from harness.memory_check import check_run_memory
from harness.methods import SequenceContext, get_method
from harness.methods.base import METHOD_ARTIFACTS, aggregate_sequence_metrics


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
    def skipped(self) -> bool:
        """Scored split, but the first-frame mask has no object: left out of J&F."""
        return self.scores is not None and not self.scores

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

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
    #: the method's per-sequence diagnostics over the sequences: counts summed, rates averaged
    #: (corr_*, *_fraction; harness.methods.base.aggregate_sequence_metrics; also in ``metrics`` when scored)
    method_metrics: dict[str, float] = field(default_factory=dict)
    #: which frames were scored (None when the split has no ground truth or evaluation is off)
    scoring: ScoringPlan | None = None
    #: noise draws averaged per frame, resolved (``backbone.ensemble_size: null`` = the backbone's default)
    ensemble_size: int | None = None

    @property
    def sequence_table(self) -> str:
        """Per-sequence J&F, frames and seconds as a plain-text table."""
        return _sequence_table(self.sequences)

    @property
    def per_sequence_jf(self) -> dict[str, float]:
        return {o.name: o.jf for o in self.sequences if o.jf is not None}


def build_cache(config: RunConfig) -> FeatureCache | None:
    """The run's feature cache, or None when disabled or when its folder cannot be written (warned)."""
    if not config.cache.enabled:
        return None
    root = Path(config.cache.dir).expanduser() if config.cache.dir else default_cache_dir()
    max_gb = config.cache.max_gb
    if max_gb is not None and max_gb <= 0:
        raise ConfigError(f"cache.max_gb must be > 0 (or null for the default cap), got {max_gb}")
    max_bytes = int(max_gb * 1024**3) if max_gb is not None else default_max_bytes(root)
    cache = FeatureCache(root, max_bytes=max_bytes, fp16=config.cache.fp16)
    try:
        cache.prepare()
    except CacheNotWritableError as error:
        warnings.warn(f"{error}; running without a feature cache", HarnessWarning, stacklevel=2)
        return None
    return cache


def build_backbone(config: RunConfig) -> Backbone:
    """The configured backbone; a bad device or an option the backbone does not take is a ConfigError."""
    spec = config.backbone
    options = dict(spec.options)
    if spec.dtype != "fp32":
        options.setdefault("dtype", spec.dtype)
    if spec.device is not None:
        _check_device(spec.device)
    try:
        return load_backbone(spec.name, weights=spec.weights, device=spec.device, **options)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise ConfigError(
            f"backbone {spec.name!r} does not take option(s) {', '.join(map(repr, spec.options))}: {error}"
        ) from error


def _check_device(device: str) -> None:
    """Fail with one line before any model is built, instead of torch's traceback deep inside it."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"backbone.device {device!r} is not a device; use cpu, cuda or cuda:N") from error
    available = {
        "cpu": True,
        "meta": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if kind not in available:
        raise ConfigError(f"backbone.device {device!r} is not supported; use cpu, cuda or cuda:N")
    if not available[kind]:
        raise ConfigError(f"backbone.device is {device!r} but this machine has no {kind} device")


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
    artifact_dir: Path | None = None,
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
        """Features of every frame through the cache, as a frame -> (C, h, w) reader on the run's device.

        ``condition`` (e.g. ``{"prompt_vector": v}``, see backbones.sd_prompt.condition_backbone) extracts
        with a conditioned backbone whose identity, hence every cache key, includes the condition.
        """
        source = backbone
        if condition:
            from backbones.sd_prompt import condition_backbone

            source = condition_backbone(backbone, condition)
        resolved = backbone.resolve_layer(layer)
        stacked = extract_sequence_features(
            source,
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
        cache_root=cache.root if cache is not None else None,
        artifact_dir=artifact_dir / sequence.name if artifact_dir is not None else None,
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
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for png in sorted(predictions.rglob("*.png")):
            archive.write(png, prefix + png.relative_to(predictions).as_posix())
    return target


#: names in an output folder that a run writes (and replaces as a whole on the next run there)
RUN_OUTPUT_PATTERNS = (
    "predictions",
    "config.yaml",
    "global_results-*.csv",
    "per-sequence_results-*.csv",
    "per-frame_results-*.csv",
    "submission-*.zip",
    METHOD_ARTIFACTS,
)
STAGING_PREFIX = ".predictions-"
PREVIOUS_PREFIX = ".previous-"
#: staging folders older than this were left by killed runs; the next run in that folder removes them
STALE_STAGING_SECONDS = 6 * 3600.0


def prepare_output_dir(output_dir: Path) -> Path:
    """Check that ``output_dir`` can hold a run and return a new staging folder inside it.

    Runs before the backbone is built, so a bad ``output_dir`` costs nothing. Staging folders of killed
    runs older than :data:`STALE_STAGING_SECONDS` are removed (warned).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} exists and is not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = mkdtemp_shared(output_dir, STAGING_PREFIX)
    except OSError as error:
        raise ConfigError(f"output_dir {output_dir} cannot be written: {error.strerror or error}") from error
    now = time.time()
    stale = []
    for leftover in output_dir.iterdir():
        if leftover == staging or not leftover.name.startswith((STAGING_PREFIX, PREVIOUS_PREFIX)):
            continue
        try:
            if now - leftover.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(leftover)
                stale.append(leftover.name)
        except OSError:
            continue  # another run removed it, or we may not: leave it
    if stale:
        warnings.warn(
            f"removed {len(stale)} staging folder(s) of killed runs from {output_dir}: {', '.join(stale)}",
            HarnessWarning,
            stacklevel=2,
        )
    return staging


def _commit_outputs(staging: Path, output_dir: Path) -> None:
    """Replace the previous run's outputs in ``output_dir`` by everything in ``staging``, together.

    The previous outputs are first moved aside into one hidden folder, then the new ones are moved in (a
    rename each), then the old ones are deleted: the folder never mixes files of two runs, and files that
    are not a run's outputs (e.g. the user's notes) stay.
    """
    previous = mkdtemp_shared(output_dir, PREVIOUS_PREFIX)
    for pattern in RUN_OUTPUT_PATTERNS:
        for old in output_dir.glob(pattern):
            os.replace(old, previous / old.name)
    for new in staging.iterdir():
        os.replace(new, output_dir / new.name)
    staging.rmdir()
    shutil.rmtree(previous, ignore_errors=True)


def _sequence_table(outcomes: list[SequenceOutcome]) -> str:
    """A plain-text table of per-sequence J&F, frames and seconds, for the end of a run."""
    width = max([len("sequence"), *(len(o.name) for o in outcomes)])
    lines = [f"{'sequence':<{width}}  {'J&F':>6}  {'frames':>6}  {'seconds':>8}"]
    for outcome in outcomes:
        if outcome.skipped:
            jf = "skip"
        else:
            jf = "-" if outcome.jf is None else f"{outcome.jf:.4f}"
        lines.append(
            f"{outcome.name:<{width}}  {jf:>6}  {outcome.num_frames:>6}  {outcome.total_seconds:>8.1f}"
        )
    return "\n".join(lines)


def _plan_scoring(dataset: Dataset, evaluate: bool) -> ScoringPlan | None:
    """Whether the run scores its predictions, checked before any work.

    A split with ground truth (any sequence annotated past its first frame) is always scored, never
    silently turned into a submission: a sequence of it that cannot be scored stops the run, naming it.
    Frames without a mask are left out of scoring as the official evaluation does, with a warning.
    """
    if not evaluate or not any(sequence.has_ground_truth for sequence in dataset.sequences):
        return None
    plan = ScoringPlan.of(dataset)
    if plan.unannotated:
        missing = [
            f"{dataset.sequence(name).first_mask_path.parent / (frames[0] + '.png')}"
            + (f" (+{len(frames) - 1} more)" if len(frames) > 1 else "")
            for name, frames in plan.unannotated.items()
        ]
        warnings.warn(
            f"split {dataset.split!r} has ground truth but these masks are missing, so their frames are not "
            f"scored: {'; '.join(missing)}",
            HarnessWarning,
            stacklevel=3,
        )
    return plan


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

    Everything the run writes (predictions, CSVs, config.yaml, submission zip) is staged in a hidden
    folder of ``output_dir`` and moved into place together at the end; a failed run leaves the previous
    outputs as they were. Data, output folder and cache are checked before the backbone is built.
    """
    started = time.perf_counter()
    dataset = open_dataset(
        config.dataset.root, config.dataset.split, config.dataset.sequences, config.dataset.resolution
    )
    for sequence in dataset.sequences:
        sequence.check_frame_sizes()
    plan = _plan_scoring(dataset, config.evaluate)
    empty = [sequence.name for sequence in dataset.sequences if not sequence.object_ids()]
    if plan is not None and len(empty) == len(dataset):
        raise DataError(f"nothing to evaluate: no object in the first-frame mask of {', '.join(empty)}")
    if empty:
        warnings.warn(
            f"no object in the first-frame mask of {', '.join(empty)}: "
            + ("skipped in the scores (per-sequence CSV says so)" if plan else "its masks stay background"),
            HarnessWarning,
            stacklevel=2,
        )
    output_dir = Path(config.output_dir).expanduser()
    staging = prepare_output_dir(output_dir)
    try:
        return _run_staged(config, dataset, plan, staging, output_dir, started, backbone, cache, on_sequence)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_staged(
    config: RunConfig,
    dataset: Dataset,
    plan: ScoringPlan | None,
    staging: Path,
    output_dir: Path,
    started: float,
    backbone: Backbone | None,
    cache: FeatureCache | None,
    on_sequence: Callable[[SequenceOutcome], None] | None,
) -> RunResult:
    if cache is None:
        cache = build_cache(config)
    if backbone is None:
        backbone = build_backbone(config)
    timestep = backbone.check_timestep(
        config.backbone.timestep if config.backbone.timestep is not None else backbone.default_timestep
    )
    layer = backbone.resolve_layer(
        config.backbone.layer if config.backbone.layer is not None else backbone.default_layer
    )
    check_run_memory(config, dataset, backbone, layer)
    loaded = time.perf_counter()

    staged_predictions = staging / "predictions"
    staged_predictions.mkdir()
    outcomes: list[SequenceOutcome] = []
    timings = {"setup": loaded - started, "extraction": 0.0, "propagation": 0.0, "evaluation": 0.0}
    total_frames = sum(len(sequence.frames) for sequence in dataset.sequences)
    with tqdm(total=total_frames, desc="run", unit="frame", disable=not config.progress) as overall:
        for index, sequence in enumerate(dataset.sequences):
            overall.set_postfix_str(f"{sequence.name} ({index + 1}/{len(dataset)})")
            sequence_metrics: dict[str, float] = {}
            seconds = predict_sequence(
                sequence,
                backbone,
                config,
                timestep=timestep,
                layer=layer,
                out_dir=staged_predictions,
                palette=dataset.palette,
                cache=cache,
                layout=dataset.layout,
                metrics=sequence_metrics,
                artifact_dir=staging / METHOD_ARTIFACTS,
            )
            scores = None
            if plan is not None:
                eval_start = time.perf_counter()
                scores = evaluate_sequence(sequence, staged_predictions)
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
                metrics=sequence_metrics,
            )
            outcomes.append(outcome)
            overall.update(len(sequence.frames))
            if on_sequence is not None:
                on_sequence(outcome)

    evaluation = None
    metrics = None
    submission = None
    if plan is not None:
        evaluation = EvaluationResult.from_objects(
            [s for o in outcomes for s in (o.scores or [])], skipped=[o.name for o in outcomes if o.skipped]
        )
        write_results(evaluation, staging, dataset.split)
        metrics = dict(evaluation.global_metrics)
    else:
        submission = output_dir / _write_submission_zip(staged_predictions, staging, dataset).name
    method_metrics = aggregate_sequence_metrics([outcome.metrics for outcome in outcomes])
    if metrics is not None:
        metrics.update(method_metrics)  # logged with the run (e.g. the oracle's unfiltered query count)
    ensemble_size = backbone.resolve_ensemble_size(config.backbone.ensemble_size)
    resolved = config.to_dict() | {
        "resolved": {
            "timestep": timestep,
            "layer": layer,
            "ensemble_size": ensemble_size,
            "backbone": backbone.identity(),
        }
    }
    (staging / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    _commit_outputs(staging, output_dir)
    timings["total"] = time.perf_counter() - started
    return RunResult(
        config=config,
        output_dir=output_dir,
        predictions_dir=output_dir / "predictions",
        timestep=timestep,
        layer=layer,
        metrics=metrics,
        evaluation=evaluation,
        sequences=outcomes,
        timings=timings,
        cache_stats=cache.stats if cache is not None else None,
        submission_zip=submission,
        method_metrics=method_metrics,
        scoring=plan,
        ensemble_size=ensemble_size,
    )
