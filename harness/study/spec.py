"""Study files: one YAML file per Optuna study, validated completely before any trial runs.

A study file names the dataset, the settings every trial shares (``fixed``), the settings Optuna
chooses (``search_space``), the sampler, the objective and the trial budget. Every problem is reported
as a :class:`~harness.errors.ConfigError` naming the file and the key, so a typo fails in a second
instead of after an hour of trials. The format::

    name: timestep                      # letters, digits, _ . - (names the study, its folder and runs)
    description: J&F vs time step       # optional; goes to the MLflow parent run
    dataset: {root: data/DAVIS, split: val, sequences: null, resolution: 480p, synthetic: false}
    fixed: {backbone.name: adm, backbone.layer: 6}     # RunConfig settings, dotted or nested
    search_space:
      backbone.timestep: {type: int, low: 0, high: 300, step: 25}          # also log: true, grid: [..]
      method.temperature: {type: float, low: 0.01, high: 1.0, log: true}
      backbone.name: {type: categorical, choices: [adm, sd2.1], per_choice: {sd2.1: {backbone.layer: 9}}}
    sampler: {type: grid, seed: 0}      # grid | tpe (n_startup_trials) | random
    objective: {metric: J&F-Mean, direction: maximize}
    n_trials: 20                        # required for tpe/random; grid: defaults to the grid size
    timeout: null                       # seconds per sweep command
    pruning: true                       # or {p_threshold: 0.1, n_startup_steps: 2}; WilcoxonPruner
    enqueue: [{backbone.timestep: 50}]  # parameter sets tried first (the grid sampler needs all parameters)

Conventions:

* ``dataset.synthetic: true`` writes the built-in synthetic dataset to ``root`` when it is missing.
* Grid points: an int axis gives ``range(low, high + 1, step)``, a categorical axis its choices, a float
  axis needs explicit ``grid`` values.
* Precedence per trial: RunConfig defaults < ``fixed`` < ``per_choice`` of a chosen categorical value <
  the suggested parameters.
* A categorical choice ``null`` means "do not override": the fixed setting or the default applies. This
  lets ``enqueue`` entries pin a parameter to "the default" (e.g. the paper's settings that name no
  temperature).
* Layers are checked against the backbone when it is fixed and can list its layers without weights;
  otherwise (and for time steps) a bad value fails its trial, which is recorded and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError, HarnessError

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "dataset",
    "fixed",
    "search_space",
    "sampler",
    "objective",
    "n_trials",
    "timeout",
    "pruning",
    "enqueue",
)
DATASET_KEYS = ("root", "split", "sequences", "resolution", "synthetic")
PARAM_TYPES = ("int", "float", "categorical")
PARAM_KEYS = {
    "int": ("type", "low", "high", "step", "log", "grid"),
    "float": ("type", "low", "high", "step", "log", "grid"),
    "categorical": ("type", "choices", "per_choice"),
}
SAMPLER_TYPES = ("grid", "tpe", "random")
SAMPLER_KEYS = ("type", "seed", "n_startup_trials")
OBJECTIVE_KEYS = ("metric", "direction")
DIRECTIONS = ("maximize", "minimize")
PRUNING_KEYS = ("enabled", "p_threshold", "n_startup_steps")
#: the metric per-sequence pruning compares; other objectives cannot be pruned on per-sequence J&F
PRUNABLE_METRIC = "J&F-Mean"
#: settings a study may not fix or search: they are set per trial or belong to the ``dataset`` section
RESERVED_SETTINGS = ("output_dir", "dataset")
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Scalar = None | bool | int | float | str


@dataclass(frozen=True)
class ParamSpec:
    """One searched setting and the Optuna distribution it is drawn from."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Scalar, ...] = ()
    #: explicit grid points (required for a float axis under the grid sampler)
    grid: tuple[float, ...] | None = None
    #: categorical value -> extra dotted settings applied when that value is chosen
    per_choice: Mapping[Scalar, Mapping[str, Any]] = field(default_factory=dict)

    def grid_values(self) -> list[Scalar] | None:
        """The points the grid sampler visits, or None when the axis is continuous without ``grid``."""
        if self.type == "categorical":
            return list(self.choices)
        if self.grid is not None:
            return list(self.grid)
        if self.type == "int":
            assert self.low is not None and self.high is not None
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        return None

    def distribution(self) -> Any:
        """The Optuna distribution (imported lazily: the spec is usable without touching Optuna)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))  # type: ignore[arg-type]
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)  # type: ignore[arg-type]

    def suggest(self, trial: Any) -> Scalar:
        """Ask ``trial`` for this parameter (enqueued values and the grid sampler are honoured by Optuna)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )  # type: ignore[arg-type]
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)  # type: ignore[arg-type]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return any(_same_choice(value, choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        assert self.low is not None and self.high is not None
        if self.step is not None:
            steps = (value - self.low) / self.step
            if abs(steps - round(steps)) > 1e-9:
                return False
        return self.low <= value <= self.high

    def overrides_for(self, value: Scalar) -> dict[str, Any]:
        """The dotted settings implied by choosing ``value`` (its own key plus any ``per_choice``)."""
        overrides: dict[str, Any] = {}
        for choice, extra in self.per_choice.items():
            if _same_choice(value, choice):
                overrides.update(extra)
        if value is not None:
            overrides[self.name] = value
        return overrides


@dataclass(frozen=True)
class DatasetSpec:
    root: str = "data/synth"
    split: str = "val"
    sequences: tuple[str, ...] | None = None
    resolution: str = "480p"
    #: write the built-in synthetic dataset to ``root`` when it does not exist yet
    synthetic: bool = False


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"
    seed: int = 0
    #: TPE/random only: random trials before TPE starts modelling
    n_startup_trials: int | None = None


@dataclass(frozen=True)
class ObjectiveSpec:
    metric: str = "J&F-Mean"
    direction: str = "maximize"


@dataclass(frozen=True)
class PruningSpec:
    """WilcoxonPruner settings; the pruner compares per-sequence J&F against the best trial's."""

    enabled: bool = False
    p_threshold: float = 0.1
    n_startup_steps: int = 2


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    dataset: DatasetSpec
    #: dotted RunConfig key -> value shared by every trial
    fixed: Mapping[str, Any]
    search_space: Mapping[str, ParamSpec]
    sampler: SamplerSpec
    objective: ObjectiveSpec
    n_trials: int | None
    timeout: float | None
    pruning: PruningSpec
    enqueue: tuple[Mapping[str, Any], ...]
    source: str = "<study>"

    def grid_space(self) -> dict[str, list[Scalar]]:
        """Grid points per parameter (only meaningful when every axis has grid values)."""
        space: dict[str, list[Scalar]] = {}
        for name, param in self.search_space.items():
            values = param.grid_values()
            if values is None:
                raise ConfigError(
                    f"{self.source}: search_space.{name}: a float axis needs `grid: [..]` values "
                    "for the grid sampler"
                )
            space[name] = values
        return space

    def grid_size(self) -> int | None:
        """Number of grid points for the grid sampler, None for the other samplers."""
        if self.sampler.type != "grid":
            return None
        return math.prod(len(values) for values in self.grid_space().values())

    def target_trials(self, n_trials: int | None = None) -> int:
        """How many finished trials the study aims for (a command-line ``n_trials`` wins, the grid caps)."""
        wanted = n_trials if n_trials is not None else self.n_trials
        grid = self.grid_size()
        if wanted is None:
            if grid is None:
                raise ConfigError(f"{self.source}: n_trials is required unless the sampler is grid")
            return grid
        if wanted < 1:
            raise ConfigError(f"n_trials must be at least 1, got {wanted}")
        return min(wanted, grid) if grid is not None else wanted

    def trial_overrides(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Dotted settings of one trial: fixed, then per-choice extras, then the parameters themselves."""
        overrides = dict(self.fixed)
        extras: dict[str, Any] = {}
        own: dict[str, Any] = {}
        for name, value in params.items():
            param = self.search_space.get(name)
            if param is None:
                raise ConfigError(f"{self.source}: parameter {name!r} is not in search_space")
            implied = param.overrides_for(value)
            own.update({k: v for k, v in implied.items() if k == name})
            extras.update({k: v for k, v in implied.items() if k != name})
        return overrides | extras | own

    def dataset_settings(self, sequences: list[str] | None = None) -> dict[str, Any]:
        chosen = (
            list(sequences)
            if sequences is not None
            else (list(self.dataset.sequences) if self.dataset.sequences is not None else None)
        )
        return {
            "root": self.dataset.root,
            "split": self.dataset.split,
            "sequences": chosen,
            "resolution": self.dataset.resolution,
        }

    def build_config(
        self, params: Mapping[str, Any], *, output_dir: str | Path, sequences: list[str] | None = None
    ) -> Any:
        """The RunConfig of one trial (``sequences`` fixes the order, e.g. the study's shuffled order)."""
        from harness.config import RunConfig

        data: dict[str, Any] = {"progress": False}
        for dotted, value in self.trial_overrides(params).items():
            _set_dotted(data, dotted, value)
        data["dataset"] = self.dataset_settings(sequences)
        data["output_dir"] = str(output_dir)
        return RunConfig.from_dict(data)

    def layer_choices(self) -> list[Scalar]:
        """Every layer a layer sweep visits (so one forward pass per frame can serve all of them)."""
        param = self.search_space.get("backbone.layer")
        if param is None:
            return []
        values = param.grid_values() or []
        return [value for value in values if value is not None]


# -- loading ----------------------------------------------------------------------------------------


def load_study_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file; every error names the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    return parse_study_spec(data, source=str(path))


def parse_study_spec(data: Any, *, source: str = "<study>") -> StudySpec:
    """Validate already-parsed study data (``source`` names it in error messages)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a study file must hold a mapping")
    _reject_unknown(data, TOP_LEVEL_KEYS, source, "")
    sections = run_config_sections()

    name = data.get("name")
    if not isinstance(name, str) or not STUDY_NAME.match(name):
        raise ConfigError(
            f"{source}: name must be letters, digits, '_', '.' or '-' (it names folders), got {name!r}"
        )
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{source}: description must be text")

    dataset = _parse_dataset(data.get("dataset"), source)
    fixed = _parse_fixed(data.get("fixed"), source, sections)
    search_space = _parse_search_space(data.get("search_space"), source, sections)
    clash = sorted(set(fixed) & set(search_space))
    if clash:
        raise ConfigError(f"{source}: {', '.join(clash)} is both fixed and searched; keep one")
    sampler = _parse_sampler(data.get("sampler"), source)
    objective = _parse_objective(data.get("objective"), source)
    pruning = _parse_pruning(data.get("pruning"), source)
    if pruning.enabled and objective.metric != PRUNABLE_METRIC:
        raise ConfigError(
            f"{source}: pruning compares per-sequence J&F, so objective.metric must be {PRUNABLE_METRIC!r} "
            f"(got {objective.metric!r}); set pruning: false"
        )
    if pruning.enabled and objective.direction != "maximize":
        raise ConfigError(f"{source}: pruning on J&F needs objective.direction: maximize")
    n_trials = _optional_int(data.get("n_trials"), source, "n_trials", minimum=1)
    timeout = data.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise ConfigError(f"{source}: timeout must be a positive number of seconds or null, got {timeout!r}")

    spec = StudySpec(
        name=name,
        description=description.strip(),
        dataset=dataset,
        fixed=fixed,
        search_space=search_space,
        sampler=sampler,
        objective=objective,
        n_trials=n_trials,
        timeout=float(timeout) if timeout is not None else None,
        pruning=pruning,
        enqueue=(),
        source=source,
    )
    spec = dataclasses.replace(spec, enqueue=_parse_enqueue(data.get("enqueue"), spec, sections))
    if sampler.type == "grid":
        spec.grid_space()  # every axis must be griddable
    elif n_trials is None:
        raise ConfigError(f"{source}: n_trials is required unless sampler.type is grid")
    _check_settings(spec, sections)
    return spec


def _reject_unknown(data: Mapping[str, Any], known: tuple[str, ...], source: str, where: str) -> None:
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(prefix + key for key in unknown)}; "
            f"known: {', '.join(known)}"
        )


def _parse_dataset(data: Any, source: str) -> DatasetSpec:
    if data is None:
        return DatasetSpec()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: dataset must be a mapping with keys {', '.join(DATASET_KEYS)}")
    _reject_unknown(data, DATASET_KEYS, source, "dataset")
    for key in ("root", "split", "resolution"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{source}: dataset.{key} must be text, got {data[key]!r}")
    sequences = data.get("sequences")
    if sequences is not None and (
        not isinstance(sequences, list) or not sequences or not all(isinstance(s, str) for s in sequences)
    ):
        raise ConfigError(f"{source}: dataset.sequences must be a non-empty list of names or null")
    synthetic = data.get("synthetic", False)
    if not isinstance(synthetic, bool):
        raise ConfigError(f"{source}: dataset.synthetic must be true or false")
    defaults = DatasetSpec()
    return DatasetSpec(
        root=data.get("root", defaults.root),
        split=data.get("split", defaults.split),
        sequences=tuple(sequences) if sequences is not None else None,
        resolution=data.get("resolution", defaults.resolution),
        synthetic=synthetic,
    )


def run_config_sections() -> frozenset[str]:
    """Dotted paths of RunConfig's sections (``backbone``, ``method``, ...), as opposed to settings.

    Only sections are flattened into dotted keys: a mapping-valued setting such as ``backbone.options``
    stays one value.
    """
    from harness.config import RunConfig

    sections: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            hint = hints[item.name]
            if dataclasses.is_dataclass(hint):
                sections.add(prefix + item.name)
                walk(hint, f"{prefix}{item.name}.")  # type: ignore[arg-type]

    walk(RunConfig, "")
    return frozenset(sections)


def _flatten(data: Mapping[str, Any], sections: frozenset[str], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys (``{backbone: {layer: 6}}`` -> ``{"backbone.layer": 6}``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in sections:
            flat.update(_flatten(value, sections, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _parse_fixed(data: Any, source: str, sections: frozenset[str]) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise ConfigError(f"{source}: fixed must be a mapping of settings")
    fixed = _flatten(data, sections)
    for key in fixed:
        _check_not_reserved(key, source, "fixed")
    return fixed


def _check_not_reserved(key: str, source: str, where: str) -> None:
    root = key.split(".")[0]
    if root in RESERVED_SETTINGS:
        hint = "use the dataset section" if root == "dataset" else "it is set per trial"
        raise ConfigError(f"{source}: {where}.{key} cannot be set here ({hint})")


def _parse_search_space(data: Any, source: str, sections: frozenset[str]) -> dict[str, ParamSpec]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: search_space must map setting names to parameter specs")
    return {str(name): _parse_param(str(name), spec, source, sections) for name, spec in data.items()}


def _number(value: Any, source: str, where: str, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {where} must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{source}: {where} must be an integer, got {value!r}")
    return int(value) if integer else float(value)


def _parse_param(name: str, data: Any, source: str, sections: frozenset[str]) -> ParamSpec:
    where = f"search_space.{name}"
    _check_not_reserved(name, source, "search_space")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping with a type ({', '.join(PARAM_TYPES)})")
    kind = data.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{source}: {where}.type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    _reject_unknown(data, PARAM_KEYS[kind], source, where)
    if kind == "categorical":
        return _parse_categorical(name, data, source, where, sections)

    integer = kind == "int"
    for key in ("low", "high"):
        if key not in data:
            raise ConfigError(f"{source}: {where}.{key} is required for a {kind} parameter")
    low = _number(data["low"], source, f"{where}.low", integer=integer)
    high = _number(data["high"], source, f"{where}.high", integer=integer)
    if low >= high:
        raise ConfigError(f"{source}: {where}: low ({low}) must be below high ({high})")
    step = data.get("step")
    if step is not None:
        step = _number(step, source, f"{where}.step", integer=integer)
        if step <= 0:
            raise ConfigError(f"{source}: {where}.step must be positive, got {step}")
    log = data.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{source}: {where}.log must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{source}: {where}: a log-scaled range needs low > 0, got {low}")
    if log and step is not None and (not integer or step != 1):
        raise ConfigError(f"{source}: {where}: step and log cannot be combined (Optuna does not support it)")
    grid = data.get("grid")
    if grid is not None:
        if not isinstance(grid, list) or not grid:
            raise ConfigError(f"{source}: {where}.grid must be a non-empty list of values")
        grid = tuple(_number(v, source, f"{where}.grid", integer=integer) for v in grid)
        outside = [v for v in grid if not low <= v <= high]
        if outside:
            raise ConfigError(f"{source}: {where}.grid values {outside} lie outside [{low}, {high}]")
        if len(set(grid)) != len(grid):
            raise ConfigError(f"{source}: {where}.grid repeats a value")
    return ParamSpec(name=name, type=kind, low=low, high=high, step=step, log=log, grid=grid)


def _parse_categorical(
    name: str, data: Mapping[str, Any], source: str, where: str, sections: frozenset[str]
) -> ParamSpec:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{source}: {where}.choices must be a non-empty list")
    for choice in choices:
        if choice is not None and not isinstance(choice, bool | int | float | str):
            raise ConfigError(f"{source}: {where}.choices: {choice!r} is not a number, text, bool or null")
    if len({(type(c), c) for c in choices}) != len(choices):
        raise ConfigError(f"{source}: {where}.choices repeats a value")
    per_choice_data = data.get("per_choice") or {}
    if not isinstance(per_choice_data, dict):
        raise ConfigError(f"{source}: {where}.per_choice must map choices to settings")
    per_choice: dict[Scalar, dict[str, Any]] = {}
    for choice, settings in per_choice_data.items():
        if not any(_same_choice(choice, c) for c in choices):
            raise ConfigError(f"{source}: {where}.per_choice: {choice!r} is not one of the choices {choices}")
        if not isinstance(settings, dict):
            raise ConfigError(f"{source}: {where}.per_choice.{choice} must be a mapping of settings")
        flat = _flatten(settings, sections)
        for key in flat:
            _check_not_reserved(key, source, f"{where}.per_choice.{choice}")
            if key == name:
                raise ConfigError(f"{source}: {where}.per_choice.{choice} cannot set {name} itself")
        per_choice[choice] = flat
    return ParamSpec(name=name, type="categorical", choices=tuple(choices), per_choice=per_choice)


def _same_choice(a: Any, b: Any) -> bool:
    """YAML mapping keys and list items may differ in type (``6`` vs ``"6"``); compare as written."""
    if a is None or b is None:
        return a is b
    return a == b or str(a) == str(b)


def _parse_sampler(data: Any, source: str) -> SamplerSpec:
    if data is None:
        return SamplerSpec()
    if isinstance(data, str):
        data = {"type": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: sampler must be a mapping such as {{type: tpe, seed: 0}}")
    _reject_unknown(data, SAMPLER_KEYS, source, "sampler")
    kind = data.get("type", "tpe")
    if kind not in SAMPLER_TYPES:
        raise ConfigError(f"{source}: sampler.type must be one of {', '.join(SAMPLER_TYPES)}, got {kind!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{source}: sampler.seed must be an integer, got {seed!r}")
    startup = _optional_int(data.get("n_startup_trials"), source, "sampler.n_startup_trials", minimum=0)
    if startup is not None and kind != "tpe":
        raise ConfigError(f"{source}: sampler.n_startup_trials only applies to the tpe sampler")
    return SamplerSpec(type=kind, seed=seed, n_startup_trials=startup)


def _parse_objective(data: Any, source: str) -> ObjectiveSpec:
    if data is None:
        return ObjectiveSpec()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: objective must be a mapping {{metric: J&F-Mean, direction: maximize}}")
    _reject_unknown(data, OBJECTIVE_KEYS, source, "objective")
    metric = data.get("metric", ObjectiveSpec.metric)
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{source}: objective.metric must be a metric name such as J&F-Mean")
    direction = data.get("direction", ObjectiveSpec.direction)
    if direction not in DIRECTIONS:
        raise ConfigError(f"{source}: objective.direction must be maximize or minimize, got {direction!r}")
    return ObjectiveSpec(metric=metric, direction=direction)


def _parse_pruning(data: Any, source: str) -> PruningSpec:
    if data is None:
        return PruningSpec()
    if isinstance(data, bool):
        return PruningSpec(enabled=data)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: pruning must be true, false or {{p_threshold: .., n_startup_steps: ..}}"
        )
    _reject_unknown(data, PRUNING_KEYS, source, "pruning")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{source}: pruning.enabled must be true or false")
    threshold = _number(data.get("p_threshold", 0.1), source, "pruning.p_threshold")
    if not 0 < threshold < 1:
        raise ConfigError(f"{source}: pruning.p_threshold must lie in (0, 1), got {threshold}")
    startup = _optional_int(data.get("n_startup_steps", 2), source, "pruning.n_startup_steps", minimum=0)
    return PruningSpec(enabled=enabled, p_threshold=threshold, n_startup_steps=startup or 0)


def _optional_int(value: Any, source: str, where: str, *, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{source}: {where} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_enqueue(data: Any, spec: StudySpec, sections: frozenset[str]) -> tuple[dict[str, Any], ...]:
    source = spec.source
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"{source}: enqueue must be a list of parameter mappings")
    entries = []
    for index, entry in enumerate(data):
        where = f"enqueue[{index}]"
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(f"{source}: {where} must be a non-empty mapping of search_space parameters")
        entry = _flatten(entry, sections)
        for key, value in entry.items():
            param = spec.search_space.get(key)
            if param is None:
                raise ConfigError(
                    f"{source}: {where}.{key} is not a search_space parameter (only those can be enqueued)"
                )
            if not param.contains(value):
                raise ConfigError(f"{source}: {where}.{key} = {value!r} lies outside its search space")
        missing = sorted(set(spec.search_space) - set(entry))
        if missing and spec.sampler.type == "grid":
            raise ConfigError(
                f"{source}: {where} must give every parameter under the grid sampler; missing {missing}"
            )
        # store the parameter's own spelling of categorical values (YAML may give "6" for 6)
        entries.append({key: _canonical(spec.search_space[key], value) for key, value in entry.items()})
    return tuple(entries)


def _canonical(param: ParamSpec, value: Any) -> Any:
    if param.type == "categorical":
        return next(c for c in param.choices if _same_choice(value, c))
    return int(value) if param.type == "int" else float(value)


# -- settings validation -----------------------------------------------------------------------------


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"setting {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def _check_settings(spec: StudySpec, sections: frozenset[str]) -> None:
    """Build a RunConfig for the fixed settings and for every single searched value.

    Checking each value on its own (not the cross product) keeps this fast while catching unknown keys,
    wrong types and values that RunConfig rejects (negative sizes, unknown similarity, ...).
    """
    from harness.config import RunConfig

    source = spec.source
    defaults = RunConfig().to_dict()
    for key in [*spec.fixed, *spec.search_space]:
        _check_known_key(key, defaults, sections, source)
    for param in spec.search_space.values():
        for extra in param.per_choice.values():
            for key in extra:
                _check_known_key(key, defaults, sections, source)

    def build(overrides: Mapping[str, Any], where: str) -> Any:
        data: dict[str, Any] = {}
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value)
        try:
            return RunConfig.from_dict(data)
        except HarnessError as error:
            raise ConfigError(f"{source}: {where}: {error}") from error

    build(spec.fixed, "fixed")
    for name, param in spec.search_space.items():
        for value in _sample_values(param):
            build(spec.trial_overrides({name: value}), f"search_space.{name} = {value!r}")
    for index, entry in enumerate(spec.enqueue):
        build(spec.trial_overrides(entry), f"enqueue[{index}]")
    _check_backbones(spec)


def _check_known_key(key: str, defaults: Mapping[str, Any], sections: frozenset[str], source: str) -> None:
    *parents, leaf = key.split(".")
    section = ".".join(parents)
    if parents and section not in sections:
        raise ConfigError(
            f"{source}: unknown setting {key!r}: {section!r} is not a section; "
            f"sections: {', '.join(sorted(sections))}"
        )
    node: Any = defaults
    for part in parents:
        node = node[part]
    if leaf not in node:
        where = section or "the top level"
        raise ConfigError(f"{source}: unknown setting {key!r}; {where} has: {', '.join(sorted(node))}")
    if key in sections:
        raise ConfigError(
            f"{source}: {key!r} is a section; name one of its settings ({', '.join(node[leaf])})"
        )


def _sample_values(param: ParamSpec) -> list[Any]:
    if param.type == "categorical":
        return list(param.choices)
    values = {param.low, param.high, *(param.grid or ())}
    if param.type == "int":
        return sorted(int(v) for v in values if v is not None)
    return sorted(v for v in values if v is not None)


def _check_backbones(spec: StudySpec) -> None:
    """Backbone names must be registered; layers are checked where a listing is available without weights."""
    from backbones import available_backbones

    source = spec.source
    known = available_backbones()
    candidates: list[tuple[str, str]] = []  # (backbone, where)
    fixed_name = spec.fixed.get("backbone.name")
    name_param = spec.search_space.get("backbone.name")
    if name_param is not None:
        candidates += [
            (str(c), f"search_space.backbone.name ({c!r})") for c in name_param.choices if c is not None
        ]
    elif fixed_name is not None:
        candidates.append((str(fixed_name), "fixed.backbone.name"))
    else:
        from harness.config import BackboneConfig

        candidates.append((BackboneConfig().name, "the default backbone"))
    for name, where in candidates:
        if name not in known:
            raise ConfigError(f"{source}: {where}: unknown backbone {name!r}; available: {', '.join(known)}")

    # Layers are checked only when the backbone is unambiguous and can list its layers cheaply.
    if name_param is not None:
        return
    layers = backbone_layers(candidates[0][0])
    if layers is None:
        return
    wanted: list[tuple[Any, str]] = []
    if "backbone.layer" in spec.fixed and spec.fixed["backbone.layer"] is not None:
        wanted.append((spec.fixed["backbone.layer"], "fixed.backbone.layer"))
    wanted += [(v, "search_space.backbone.layer") for v in spec.layer_choices()]
    for param in spec.search_space.values():
        for choice, extra in param.per_choice.items():
            if extra.get("backbone.layer") is not None:
                wanted.append((extra["backbone.layer"], f"search_space.{param.name}.per_choice.{choice}"))
    names = {str(layer) for layer in layers}
    for layer, where in wanted:
        if str(layer) not in names:
            raise ConfigError(
                f"{source}: {where}: backbone {candidates[0][0]!r} has no layer {layer!r}; "
                f"available layers: {', '.join(str(k) for k in layers)}"
            )


def backbone_layers(name: str) -> list[Any] | None:
    """The layer keys of a backbone if they can be listed without loading weights, else None."""
    try:
        from backbones import describe_backbone
    except ImportError:
        return None
    try:
        info = describe_backbone(name)
    except Exception:  # best effort: the layer is checked again when the trial runs
        return None
    layers = info.get("layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        return None
    return [entry["layer"] for entry in layers if isinstance(entry, dict) and "layer" in entry]


def grid_points(spec: StudySpec) -> list[dict[str, Scalar]]:
    """Every grid point as a parameter dict (for documentation and tests; Optuna shuffles the order)."""
    space = spec.grid_space()
    names = list(space)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]
