"""`harness reproduce <system>`: run one published configuration with exactly the released settings and
print our J&F beside the published one.

The systems are the rows of :data:`harness.published.PUBLISHED` (new rows just work). For the paper's and
DIFT's systems, :data:`RELEASED` keeps every released setting once, with the file and line of the released
code it comes from; the tests check that each system's run configuration resolves to those values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.published import PUBLISHED, PublishedSystem

#: where `harness reproduce` reads DAVIS-2017 from unless --dataset says otherwise
DEFAULT_DATASET = "data/DAVIS"
#: metric compared with the published number (0-1 in our results, 0-100 in papers)
METRIC = "J&F-Mean"


@dataclass(frozen=True)
class ReleasedValue:
    """One setting of a released evaluation, and where the released code or its README sets it."""

    value: Any
    source: str


def _released(source_prefix: str, **values: tuple[Any, str]) -> dict[str, ReleasedValue]:
    return {
        key.replace("__", "."): ReleasedValue(v, f"{source_prefix}{where}")
        for key, (v, where) in values.items()
    }


_ZVOS = "github thanosDelatolas/diff-zvos "
_DIFT = "github Tsingularity/dift "

#: what both of the paper's plain settings take from src/config/eval.yaml (and its frame reader)
_EVAL_YAML: dict[str, tuple[Any, str]] = dict(
    backbone__ensemble_size=(8, "src/config/eval.yaml:12"),
    method__temperature=(0.2, "src/config/eval.yaml:13"),
    method__n_last_frames=(28, "src/config/eval.yaml:14"),
    method__radius=(15, "src/config/eval.yaml:15 (size_mask_neighborhood)"),
    method__topk=(15, "src/config/eval.yaml:16"),
    method__similarity=("cosine", "src/config/eval.yaml:17 (func)"),
    method__memory_caps=(None, "src/eval_vos.py:80 (one memory length for every sequence)"),
    input__short_side=(480, "src/utils/read_util.py:17 (scale_size=[480])"),
    dataset__split=("val", "src/config/eval.yaml:29"),
    dataset__resolution=("480p", "src/config/eval.yaml:27"),
)

#: The released settings of each system, with their sources (the one table the tests compare with).
#: diff-zvos: the documented commands (docs/EVALUATION.md:29 for SD 2.1, :36 for ADM, which overrides only
#: t and layer) on top of src/config/eval.yaml; frames at short side 480 (src/utils/read_util.py:17).
#: Prompt learning: docs/EVALUATION.md:48,55 on src/config/eval_prompt_learning.yaml.
#: DIFT: the commands of its README (DAVIS section) for eval_davis.py, frames at short side 480
#: (eval_davis.py:207), and its one per-sequence exception (the memory of "shooting") as method.memory_caps.
RELEASED: dict[str, dict[str, ReleasedValue]] = {
    "paper-adm": _released(
        _ZVOS,
        backbone__name=("adm", "docs/EVALUATION.md:36 (model=adm)"),
        backbone__timestep=(30, "docs/EVALUATION.md:36 (propagation_params.t=30)"),
        backbone__layer=(6, "docs/EVALUATION.md:36 (propagation_params.layer=6)"),
        **_EVAL_YAML,
    ),
    "paper-sd21": _released(
        _ZVOS,
        backbone__name=("sd2.1", "docs/EVALUATION.md:29 (model=sd2.1); src/config/eval.yaml:20"),
        backbone__timestep=(100, "src/config/eval.yaml:11"),
        backbone__layer=(9, "src/config/eval.yaml:18"),
        **_EVAL_YAML,
    ),
    # learn_prompts.py and eval_vos_prompts.py both read src/config/eval_prompt_learning.yaml (their
    # hydra config_name); the learning uses its propagation t and ensemble (learn_prompts.py:19-20)
    "paper-sd21-prompt": _released(
        _ZVOS,
        backbone__name=(
            "sd2.1",
            "src/config/eval_prompt_learning.yaml:25; docs/EVALUATION.md:48,55 (model=sd2.1)",
        ),
        backbone__timestep=(100, "src/config/eval_prompt_learning.yaml:11"),
        backbone__layer=(9, "src/config/eval_prompt_learning.yaml:18"),
        backbone__ensemble_size=(4, "src/config/eval_prompt_learning.yaml:12"),
        method__name=("prompt-learning", "docs/EVALUATION.md:48,55 (learn_prompts.py, eval_vos_prompts.py)"),
        method__per_object=(True, "src/eval_vos_prompts.py:61 (video_reader_type='per_object')"),
        method__temperature=(0.2, "src/config/eval_prompt_learning.yaml:13"),
        method__n_last_frames=(28, "src/config/eval_prompt_learning.yaml:14"),
        method__radius=(15, "src/config/eval_prompt_learning.yaml:15 (size_mask_neighborhood)"),
        method__topk=(15, "src/config/eval_prompt_learning.yaml:16"),
        method__similarity=("cosine", "src/config/eval_prompt_learning.yaml:17 (func)"),
        method__prompt_lr=(0.01, "src/config/eval_prompt_learning.yaml:21"),
        method__prompt_steps=(100, "src/config/eval_prompt_learning.yaml:22 (n_epochs)"),
        method__prompt_timestep=(100, "src/learn_prompts.py:19 (propagation_params.t)"),
        method__prompt_ensemble_size=(4, "src/learn_prompts.py:20 (propagation_params.ensemble_size)"),
        method__prompt_init_value=(1e-4, "src/learn_prompts.py:88 (torch.full((1024,), 1e-4))"),
        method__memory_caps=(None, "src/eval_vos_prompts.py:104 (one memory length for every sequence)"),
        input__short_side=(480, "src/utils/read_util.py:17 (scale_size=[480])"),
        dataset__split=("val", "src/config/eval_prompt_learning.yaml:34"),
        dataset__resolution=("480p", "src/config/eval_prompt_learning.yaml:32"),
    ),
    "dift-adm": _released(
        _DIFT,
        backbone__name=("adm", "README.md:185 (--dift_model adm)"),
        backbone__timestep=(51, "README.md:186 (--t 51)"),
        # up_ft_index 7 is output block 7, stride 8 (eval_davis.py:289), our ADM layer 7
        backbone__layer=(7, "README.md:187 (--up_ft_index 7)"),
        method__temperature=(0.1, "README.md:188"),
        method__topk=(10, "README.md:189"),
        method__n_last_frames=(28, "README.md:190"),
        backbone__ensemble_size=(4, "README.md:191"),
        method__radius=(15, "README.md:192 (--size_mask_neighborhood 15)"),
        method__similarity=("cosine", "eval_davis.py:129-133 (normalised features, bmm)"),
        method__memory_caps=("shooting=10", "eval_davis.py:300-304 (n_last_frames at most 10 for shooting)"),
        input__short_side=(480, "eval_davis.py:207 (scale_size=[480])"),
        dataset__split=("val", "eval_davis.py:285 (ImageSets/2017/val.txt)"),
        dataset__resolution=("480p", "eval_davis.py:307 (JPEGImages/480p)"),
    ),
    "dift-sd21": _released(
        _DIFT,
        backbone__name=("sd2.1", "README.md:170 (--dift_model sd); src/models/dift_sd.py:191 (SD 2.1)"),
        backbone__timestep=(51, "README.md:171 (--t 51)"),
        # up_ft_index 2 is the output of up block 2, stride 8 (eval_davis.py:293), our SD layer up_ft2
        backbone__layer=("up_ft2", "README.md:172 (--up_ft_index 2)"),
        method__temperature=(0.2, "README.md:173"),
        method__topk=(15, "README.md:174"),
        method__n_last_frames=(28, "README.md:175"),
        backbone__ensemble_size=(8, "README.md:176"),
        method__radius=(15, "README.md:177 (--size_mask_neighborhood 15)"),
        method__similarity=("cosine", "eval_davis.py:129-133 (normalised features, bmm)"),
        method__memory_caps=("shooting=10", "eval_davis.py:300-304 (n_last_frames at most 10 for shooting)"),
        input__short_side=(480, "eval_davis.py:207 (scale_size=[480])"),
        dataset__split=("val", "eval_davis.py:285 (ImageSets/2017/val.txt)"),
        dataset__resolution=("480p", "eval_davis.py:307 (JPEGImages/480p)"),
    ),
}


def system(name: str) -> PublishedSystem:
    if name not in PUBLISHED:
        known = ", ".join(sorted(PUBLISHED)) or "none"
        raise ConfigError(f"unknown published system {name!r}; known: {known} (harness reproduce --list)")
    return PUBLISHED[name]


def system_config(
    name: str, dataset: str | None = None, output_dir: str | None = None, progress: bool = True
) -> RunConfig:
    """The run configuration of a published system: its overrides on the run defaults."""
    entry = system(name)
    overrides: dict[str, Any] = {"dataset.root": dataset or DEFAULT_DATASET}
    overrides |= dict(entry.overrides)
    overrides["output_dir"] = output_dir or f"runs/reproduce/{name}"
    overrides["progress"] = progress
    return RunConfig().with_overrides(overrides)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "options":
            flat |= _flatten(value, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat


def resolved_settings(config: RunConfig) -> dict[str, Any]:
    """The configuration as dotted keys, with the backbone's defaults filled in where it says null.

    Defaults come from the backbone's static description, so no weights are loaded or downloaded.
    """
    from backbones import describe_backbone

    flat = _flatten(config.to_dict())
    described = describe_backbone(config.backbone.name)
    for key, default in (
        ("backbone.timestep", "default_timestep"),
        ("backbone.layer", "default_layer"),
        ("backbone.ensemble_size", "default_ensemble_size"),
    ):
        if flat.get(key) is None and default in described:
            flat[key] = described[default]
    return flat


def weights_status(backbone_name: str) -> str:
    """Whether the weights a backbone needs are on this machine, as `harness backbones list` says it."""
    from backbones.status import weights_summary

    return weights_summary(backbone_name)


def format_listing() -> str:
    rows = [("system", "published J&F", "weights", "source")]
    for name, entry in sorted(PUBLISHED.items()):
        weights = ", ".join(f"{w} ({weights_status(w)})" for w in entry.weights) or "none"
        published = "-" if entry.jf is None else f"{entry.jf:.1f}"
        rows.append((name, published, weights, entry.source))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    )


def format_dry_run(name: str, config: RunConfig) -> str:
    settings = resolved_settings(config)
    released = RELEASED.get(name, {})
    lines = [f"{name}: {system(name).description}"]
    for key, value in settings.items():
        source = f"  # {released[key].source}" if key in released else ""
        lines.append(f"{key}: {value!r}{source}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Comparison:
    system: str
    ours: float
    published: float | None

    @property
    def difference(self) -> float | None:
        return None if self.published is None else self.ours - self.published

    def describe(self) -> str:
        if self.published is None:
            return f"{self.system}: ours {self.ours:.1f} J&F; no published number for this setting"
        return (
            f"{self.system}: ours {self.ours:.1f} J&F, published {self.published:.1f}, "
            f"difference {self.difference:+.1f}"
        )


#: the study tracked reproductions join (their MLflow parent run)
REPRODUCE_STUDY = "reproduce"


def reproduce(
    name: str,
    dataset: str | None = None,
    output_dir: str | None = None,
    progress: bool = True,
    tracking: Any = None,
) -> Comparison:
    """Run the system on its dataset and compare J&F-Mean (0-100) with the published number.

    With a :class:`harness.tracking.TrackingConfig` the run is logged to MLflow like a sweep trial, in the
    study "reproduce", tagged ``diffvos.system`` = the system (the leaderboard's published column reads it).
    """
    from harness.pipeline import run

    config = system_config(name, dataset, output_dir, progress)
    if tracking is None:
        result = run(config)
    else:
        from harness.tracking import TAG_SYSTEM, track_run

        result, _ = track_run(config, tracking, study=REPRODUCE_STUDY, tags={TAG_SYSTEM: name})
    if result.metrics is None or METRIC not in result.metrics:
        raise ConfigError(
            f"{config.dataset.root} split {config.dataset.split!r} has no full ground truth, so there is no "
            f"J&F to compare (predictions are in {result.predictions_dir})"
        )
    return Comparison(name, 100.0 * float(result.metrics[METRIC]), system(name).jf)


def main_from_args(args: Any) -> int:
    """The `harness reproduce` subcommand."""
    if args.list:
        print(format_listing())
        return 0
    if not args.system:
        raise ConfigError("name a system (harness reproduce --list shows them)")
    config = system_config(args.system, args.dataset, args.output)
    if args.dry_run:
        print(format_dry_run(args.system, config))
        return 0
    tracking = None
    if not args.no_track:
        from harness.study.preflight import check_tracking_store
        from harness.tracking import TrackingConfig, resolve_tracking_uri

        check_tracking_store(resolve_tracking_uri(args.tracking_uri))  # before the run, as a sweep does
        tracking = TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment)
    comparison = reproduce(args.system, args.dataset, args.output, not args.quiet, tracking)
    print(comparison.describe())
    return 0
