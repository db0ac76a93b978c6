"""The settings of one run, read from YAML and validated before any work starts."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError
from harness.methods import DEFAULT_METHOD, get_method

DTYPES = ("fp32", "bf16", "fp16")
#: a decimal number as text, e.g. "1e-3" (which YAML 1.1 does not read as a float); no nan/inf
_NUMERIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class DatasetConfig:
    root: str = "data/synth"
    split: str = "val"
    sequences: list[str] | None = None
    resolution: str = "480p"


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "random-conv"
    #: checkpoint file or model folder; None = the backbone's own lookup (and download when online)
    weights: str | None = None
    #: None = the backbone's default
    timestep: int | None = None
    layer: int | str | None = None
    #: more layers to extract in the same forward pass and cache (a layer sweep lists all its layers)
    prefetch_layers: list[int | str] | None = None
    #: noise draws averaged per frame; None = the backbone's published default (ADM and SD: 8)
    ensemble_size: int | None = None
    seed: int = 0
    batch_size: int = 8
    device: str | None = None
    dtype: str = "fp32"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ensemble_size is not None and self.ensemble_size < 1:
            raise ConfigError(f"backbone.ensemble_size must be >= 1, got {self.ensemble_size}")
        if self.batch_size < 1:
            raise ConfigError(f"backbone.batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"backbone.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


#: the largest accepted input.short_side: 4K frames (2160 rows); 100000 once ran a machine out of memory
MAX_SHORT_SIDE = 2160


@dataclass(frozen=True)
class InputConfig:
    #: frames are resized so that their short side is this long (the paper uses 480)
    short_side: int = 480

    def __post_init__(self) -> None:
        if self.short_side < 8:
            raise ConfigError(f"input.short_side must be >= 8, got {self.short_side}")
        if self.short_side > MAX_SHORT_SIDE:
            raise ConfigError(
                f"input.short_side {self.short_side} is above the largest supported {MAX_SHORT_SIDE} "
                "(the paper uses 480)"
            )


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    #: None = $DIFFVOS_CACHE_DIR or ./cache/features
    dir: str | None = None
    fp16: bool = False
    max_gb: float | None = None

    def __post_init__(self) -> None:
        # 0 used to mean "no cap" silently; every reader of the setting (run, cache info) gets this check
        if self.max_gb is not None and not self.max_gb > 0:
            raise ConfigError(f"cache.max_gb must be > 0 (or null for the default cap), got {self.max_gb}")


@dataclass(frozen=True)
class MethodConfig:
    """The ``method:`` section: a registered method's name and its settings dataclass.

    In YAML and in ``to_dict`` it is one flat mapping, ``{name: labelprop, temperature: 0.2, ...}``; the keys
    besides ``name`` are the method's settings, so studies address them as ``method.<setting>``.
    """

    name: str = DEFAULT_METHOD
    settings: Any = None

    def __post_init__(self) -> None:
        settings_class = get_method(self.name).settings_class
        if self.settings is None:
            object.__setattr__(self, "settings", settings_class())
        elif not isinstance(self.settings, settings_class):
            raise ConfigError(
                f"method {self.name!r} takes {settings_class.__name__} settings, "
                f"got {type(self.settings).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.settings)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "method") -> MethodConfig:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
        settings = dict(data)
        name = settings.pop("name", DEFAULT_METHOD)
        method = get_method(name)
        known = {item.name for item in dataclasses.fields(method.settings_class)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(f'{where}.{key}' for key in unknown)} for method {name!r}; "
                f"its settings: name, {', '.join(sorted(known))}"
            )
        try:
            built = _build(method.settings_class, settings, where)
        except ConfigError as error:
            raise ConfigError(f"method {name!r}: {error}") from error
        return cls(name, built)


@dataclass(frozen=True)
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    input: InputConfig = field(default_factory=InputConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output_dir: str = "runs/default"
    #: evaluate against the ground truth when every frame is annotated
    evaluate: bool = True
    progress: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of settings")
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            name: value.to_dict() if isinstance(value, MethodConfig) else _plain(value)
            for name, value in data.items()
        }

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with dotted-key overrides applied, e.g. {"backbone.timestep": 50}."""
        data = self.to_dict()
        new_method = overrides.get("method.name", self.method.name)
        if new_method != self.method.name:  # another method: its own defaults, then the method.* overrides
            data["method"] = {"name": new_method}
        for dotted, value in overrides.items():
            if dotted.split(".")[0] == "propagation":
                raise ConfigError(f"{dotted!r}: the 'propagation' section is now 'method' (method.<setting>)")
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown setting {dotted!r}")
                node = node[part]
            if leaf not in node and not (parents == ["method"] and leaf != "name"):
                raise ConfigError(f"unknown setting {dotted!r}")
            node[leaf] = value
        return RunConfig.from_dict(data)


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate a (nested) frozen dataclass from plain data, rejecting unknown keys and bad types."""
    if cls is MethodConfig:
        return MethodConfig.from_dict(data, where)
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    if cls is RunConfig and "propagation" in data:
        raise ConfigError(
            "the 'propagation:' section is now 'method:' (e.g. method: {name: labelprop, temperature: 0.2}); "
            "in studies and --set use method.<setting>"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, hint, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from error


def _check_type(value: Any, hint: Any, where: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return value
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str) and _NUMERIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        if origin is int and isinstance(value, bool):
            continue
        if isinstance(origin, type) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{where} must be {names}, got {value!r}")
