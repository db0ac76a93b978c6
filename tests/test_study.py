"""Study files, search spaces, storage selection, resume, failures, pruning and an end-to-end sweep.

Most sweeps here use a fake pipeline runner (a function with ``harness.pipeline.run``'s signature) and a
fake tracker, so that the Optuna plumbing is tested in milliseconds; the end-to-end test at the bottom
runs the real pipeline with the random-conv backbone and a real MLflow store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from harness.errors import ConfigError
from harness.study import load_study_spec, parse_study_spec, resolve_storage, run_sweep
from harness.study.spec import grid_points
from harness.study.storage import HeartbeatSettings, check_workers, open_storage
from harness.study.sweep import (
    SEQUENCE_ORDER_ATTR,
    budget_used,
    create_or_load_study,
    worker_seed,
)
from harness.tracking import TrackingConfig

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SHIPPED = sorted(STUDIES.glob("*.yaml"))


# -- helpers ---------------------------------------------------------------------------------------------


def base_study(**changes: Any) -> dict[str, Any]:
    """A small valid study on the random-conv backbone; ``changes`` replace top-level keys."""
    data: dict[str, Any] = {
        "name": "unit",
        "description": "test study",
        "dataset": {"root": "data/synth", "split": "val"},
        "fixed": {"backbone.name": "random-conv", "input.short_side": 64, "cache.enabled": False},
        "search_space": {
            "method.temperature": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
            "method.topk": {"type": "int", "low": 1, "high": 9, "step": 2},
            "method.similarity": {"type": "categorical", "choices": ["cosine", "l2"]},
        },
        "sampler": {"type": "tpe", "seed": 0},
        "objective": {"metric": "J&F-Mean", "direction": "maximize"},
        "n_trials": 4,
        "pruning": False,
    }
    data.update(changes)
    return data


def write_study(folder: Path, data: dict[str, Any], name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class FakeOutcome:
    index: int
    name: str
    jf: float | None


@dataclass
class FakeResult:
    metrics: dict[str, float] | None
    sequences: list[FakeOutcome]
    timestep: int = 0
    layer: int = 2


class FakeRunner:
    """Stands in for ``harness.pipeline.run``: per-sequence J&F from a function of the trial's config."""

    def __init__(self, score: Any, n_steps: int | None = None) -> None:
        self.score = score
        self.n_steps = n_steps
        self.configs: list[Any] = []

    def __call__(self, config: Any, *, backbone: Any, cache: Any, on_sequence: Any) -> FakeResult:
        self.configs.append(config)
        names = list(config.dataset.sequences)
        steps = self.n_steps or len(names)
        outcomes = []
        for index in range(steps):
            outcome = FakeOutcome(index, names[index % len(names)], self.score(config, index))
            outcomes.append(outcome)
            on_sequence(outcome)
        mean = sum(o.jf for o in outcomes) / len(outcomes)
        return FakeResult({"J&F-Mean": mean, "J-Mean": mean}, outcomes)


@dataclass
class FakeTrialRun:
    trial_number: int
    params: dict[str, Any]
    settings: dict[str, Any]
    sequences: list[str] = field(default_factory=list)
    results: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    status: str | None = None
    error: str | None = None
    run_id: str = ""

    def log_sequence(self, outcome: Any) -> None:
        self.sequences.append(outcome.name)

    def log_result(self, result: Any) -> None:
        self.results += 1

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        assert self.status is None, "a run is ended exactly once"
        self.status, self.error = status, error


class FakeTracker:
    """Records what the sweep tells MLflow, with StudyTracker's API."""

    def __init__(self, config: Any = None, study_name: str = "") -> None:
        self.study_name = study_name
        self.runs: list[FakeTrialRun] = []
        self.parent_calls = 0
        self.updates = 0
        self.closed_states: list[dict[int, str]] = []

    def ensure_parent_run(self, description: str = "", params: dict | None = None) -> str:
        self.parent_calls += 1
        return "parent-1"

    def start_trial(self, parent_run_id: str, trial_number: int, params: dict, config: Any) -> FakeTrialRun:
        assert parent_run_id == "parent-1"
        run = FakeTrialRun(trial_number, dict(params), config.to_dict(), run_id=f"run-{trial_number}")
        self.runs.append(run)
        return run

    def close_stale_trials(self, states: dict[int, str]) -> int:
        self.closed_states.append(dict(states))
        return 0

    def update_parent(self, parent_run_id: str, study: Any) -> None:
        self.updates += 1


def fake_sweep(
    study_file: Path, tmp_path: Path, runner: FakeRunner, tracker: FakeTracker, **kwargs: Any
) -> Any:
    return run_sweep(
        study_file,
        storage=None,
        tracking=TrackingConfig(),
        output_root=tmp_path / "runs",
        storage_dir=tmp_path / "storage",
        runner=runner,
        tracker_factory=lambda config, name: tracker,
        **kwargs,
    )


def load_trials(tmp_path: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    location = resolve_storage(None, name, tmp_path / "storage")
    return optuna.load_study(study_name=name, storage=open_storage(location)).get_trials()


@pytest.fixture()
def synth_study(tmp_path: Path, synth_root: Path):
    """A function writing a study on the synthetic dataset into tmp_path."""

    def make(**changes: Any) -> Path:
        data = base_study(dataset={"root": str(synth_root), "split": "val"})
        data.update(changes)
        return write_study(tmp_path, data)

    return make


# -- validation ------------------------------------------------------------------------------------------

BAD_CASES = {
    "unknown top-level key": ({"n_trails": 3}, "n_trails"),
    "unknown parameter key": (
        {"search_space": {"method.topk": {"type": "int", "low": 1, "high": 5, "stepp": 1}}},
        "search_space.method.topk.stepp",
    ),
    "low >= high": (
        {"search_space": {"method.topk": {"type": "int", "low": 5, "high": 5}}},
        "search_space.method.topk",
    ),
    "step <= 0": (
        {"search_space": {"method.topk": {"type": "int", "low": 1, "high": 5, "step": 0}}},
        "search_space.method.topk.step",
    ),
    "log with low <= 0": (
        {"search_space": {"method.temperature": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
        "search_space.method.temperature",
    ),
    "unknown parameter type": (
        {"search_space": {"method.topk": {"type": "integer", "low": 1, "high": 5}}},
        "search_space.method.topk.type",
    ),
    "unknown backbone": ({"fixed": {"backbone.name": "no-such-net"}}, "no-such-net"),
    "unknown backbone among choices": (
        {
            "fixed": {},
            "search_space": {"backbone.name": {"type": "categorical", "choices": ["random-conv", "nope"]}},
        },
        "nope",
    ),
    "unknown layer": ({"fixed": {"backbone.name": "random-conv", "backbone.layer": 7}}, "backbone.layer"),
    "unknown layer among choices": (
        {"search_space": {"backbone.layer": {"type": "categorical", "choices": [1, 5]}}},
        "search_space.backbone.layer",
    ),
    "bad sampler": ({"sampler": {"type": "annealing"}}, "sampler.type"),
    "unknown sampler key": ({"sampler": {"type": "tpe", "sed": 1}}, "sampler.sed"),
    "bad direction": ({"objective": {"metric": "J&F-Mean", "direction": "up"}}, "objective.direction"),
    "unknown objective key": ({"objective": {"metrik": "J-Mean"}}, "objective.metrik"),
    "unknown setting": ({"fixed": {"method.tempreature": 0.1}}, "method.tempreature"),
    "unknown section": ({"fixed": {"propagaton.temperature": 0.1}}, "propagaton.temperature"),
    "section instead of setting": (
        {"search_space": {"method": {"type": "categorical", "choices": [1]}}},
        "method",
    ),
    "setting rejected by RunConfig": (
        {"search_space": {"method.similarity": {"type": "categorical", "choices": ["cosine", "dot"]}}},
        "dot",
    ),
    "wrong type for a setting": ({"fixed": {"input.short_side": "big"}}, "short_side"),
    "fixed and searched": ({"fixed": {"method.topk": 3}}, "method.topk"),
    "output_dir is per trial": ({"fixed": {"output_dir": "x"}}, "output_dir"),
    "dataset only in its section": ({"fixed": {"dataset.root": "x"}}, "dataset.root"),
    "unknown dataset key": ({"dataset": {"root": "x", "splitt": "val"}}, "dataset.splitt"),
    "float axis in a grid": ({"sampler": {"type": "grid"}}, "method.temperature"),
    "tpe without n_trials": ({"n_trials": None}, "n_trials"),
    "bad name": ({"name": "has space"}, "name"),
    "enqueue of an unknown parameter": (
        {"enqueue": [{"method.radius": 3}]},
        "enqueue[0].method.radius",
    ),
    "enqueue outside the range": ({"enqueue": [{"method.topk": 11}]}, "enqueue[0].method.topk"),
    "enqueue off the step": ({"enqueue": [{"method.topk": 2}]}, "enqueue[0].method.topk"),
    "pruning on another metric": (
        {"pruning": True, "objective": {"metric": "J-Mean", "direction": "maximize"}},
        "objective.metric",
    ),
    "per_choice for a missing choice": (
        {
            "search_space": {
                "method.similarity": {
                    "type": "categorical",
                    "choices": ["cosine"],
                    "per_choice": {"l2": {"method.topk": 3}},
                }
            }
        },
        "per_choice",
    ),
    "grid value outside the range": (
        {"search_space": {"method.topk": {"type": "int", "low": 1, "high": 5, "grid": [1, 9]}}},
        "search_space.method.topk.grid",
    ),
    "negative timeout": ({"timeout": -5}, "timeout"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_study_file_names_file_and_key(tmp_path: Path, case: str) -> None:
    changes, key = BAD_CASES[case]
    path = write_study(tmp_path, base_study(**changes), name="bad-study.yaml")
    with pytest.raises(ConfigError) as raised:
        load_study_spec(path)
    message = str(raised.value)
    assert str(path) in message
    assert key in message


def test_base_study_is_valid(tmp_path: Path) -> None:
    spec = load_study_spec(write_study(tmp_path, base_study()))
    assert spec.name == "unit"
    assert list(spec.search_space) == [
        "method.temperature",
        "method.topk",
        "method.similarity",
    ]
    assert spec.fixed == {"backbone.name": "random-conv", "input.short_side": 64, "cache.enabled": False}


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_study_spec(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_study_spec(listing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_study_spec(tmp_path / "missing.yaml")


def test_nested_and_dotted_settings_are_equivalent() -> None:
    nested = base_study(
        fixed={"backbone": {"name": "random-conv", "options": {"width": 8}}, "input": {"short_side": 64}}
    )
    spec = parse_study_spec(nested)
    # sections are flattened, but a mapping-valued setting (backbone.options) stays one value
    assert spec.fixed == {
        "backbone.name": "random-conv",
        "backbone.options": {"width": 8},
        "input.short_side": 64,
    }


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_studies_validate(path: Path) -> None:
    """Real-model studies validate without weights: names and settings are checked, layers lazily."""
    spec = load_study_spec(path)
    assert spec.name == path.stem
    assert spec.target_trials() >= 1


def test_shipped_studies_are_all_there() -> None:
    shipped = {p.stem for p in SHIPPED}
    assert {"quickstart", "timestep", "layer", "model", "affinity", "paper", "filters"} <= shipped


def test_shipped_real_model_studies_use_davis_val() -> None:
    for name in ("timestep", "layer", "model", "affinity", "paper", "filters"):
        spec = load_study_spec(STUDIES / f"{name}.yaml")
        assert (spec.dataset.root, spec.dataset.split) == ("data/DAVIS", "val")


# -- search spaces and grids ------------------------------------------------------------------------------


def test_grid_sizes_of_shipped_one_factor_studies() -> None:
    timestep = load_study_spec(STUDIES / "timestep.yaml")
    points = [p["backbone.timestep"] for p in grid_points(timestep)]
    assert sorted(points) == sorted([*range(0, 401, 25), 30, 51])  # every 25 steps + published 30, 51
    assert timestep.grid_size() == 19
    layer = load_study_spec(STUDIES / "layer.yaml")
    assert layer.grid_size() == 18
    # one-factor curves run unpruned, so no point (a published one included) is left out
    assert not timestep.pruning.enabled and not layer.pruning.enabled
    assert load_study_spec(STUDIES / "model.yaml").grid_size() == 3
    assert load_study_spec(STUDIES / "filters.yaml").grid_size() == 8
    assert load_study_spec(STUDIES / "affinity.yaml").grid_size() is None  # TPE


def test_grid_points_cover_the_product() -> None:
    spec = parse_study_spec(
        base_study(
            sampler={"type": "grid"},
            n_trials=None,
            search_space={
                "method.topk": {"type": "int", "low": 5, "high": 15, "step": 5},
                "method.similarity": {"type": "categorical", "choices": ["cosine", "l2"]},
                "method.temperature": {
                    "type": "float",
                    "low": 0.1,
                    "high": 1.0,
                    "grid": [0.1, 0.5, 1.0],
                },
            },
        )
    )
    assert spec.grid_size() == 3 * 2 * 3
    points = grid_points(spec)
    assert len(points) == 18
    assert {p["method.topk"] for p in points} == {5, 10, 15}
    assert {p["method.temperature"] for p in points} == {0.1, 0.5, 1.0}
    assert len({tuple(sorted(p.items())) for p in points}) == 18
    # the budget defaults to the grid and is capped by it
    assert spec.target_trials() == 18
    assert spec.target_trials(5) == 5
    assert spec.target_trials(100) == 18


def test_trial_overrides_precedence_and_null_choice() -> None:
    spec = parse_study_spec(
        base_study(
            fixed={"backbone.name": "random-conv", "backbone.timestep": 7, "method.topk": 3},
            search_space={
                "backbone.layer": {
                    "type": "categorical",
                    "choices": [0, 1, None],
                    "per_choice": {0: {"backbone.timestep": 11, "method.radius": 2}},
                },
                "method.temperature": {"type": "categorical", "choices": [None, 0.3]},
            },
        )
    )
    assert spec.trial_overrides({"backbone.layer": 0, "method.temperature": 0.3}) == {
        "backbone.name": "random-conv",
        "backbone.timestep": 11,
        "method.topk": 3,
        "method.radius": 2,
        "backbone.layer": 0,
        "method.temperature": 0.3,
    }
    # null = keep the fixed value or the default: the key is simply not overridden
    assert spec.trial_overrides({"backbone.layer": None, "method.temperature": None}) == {
        "backbone.name": "random-conv",
        "backbone.timestep": 7,
        "method.topk": 3,
    }
    config = spec.build_config(
        {"backbone.layer": 1, "method.temperature": None}, output_dir="out/x", sequences=["b", "a"]
    )
    assert config.backbone.layer == 1
    assert config.backbone.timestep == 7
    assert config.method.settings.temperature == type(config.method.settings)().temperature  # the default
    assert config.dataset.sequences == ["b", "a"]
    assert config.output_dir == "out/x"
    assert config.progress is False


def test_suggest_honours_every_distribution() -> None:
    spec = parse_study_spec(base_study())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        trial = study.ask()
        params = {name: p.suggest(trial) for name, p in spec.search_space.items()}
        assert 0.05 <= params["method.temperature"] <= 0.5
        assert params["method.topk"] in {1, 3, 5, 7, 9}
        assert params["method.similarity"] in {"cosine", "l2"}
        study.tell(trial, 0.0)


def test_model_study_fixes_settings_per_model() -> None:
    spec = load_study_spec(STUDIES / "model.yaml")
    assert spec.trial_overrides({"backbone.name": "adm"}) == {
        "backbone.ensemble_size": 8,
        "backbone.timestep": 30,
        "backbone.layer": 6,
        "backbone.name": "adm",
    }
    assert spec.trial_overrides({"backbone.name": "sd2.1"})["backbone.timestep"] == 100


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_sets_the_ensemble_of_its_noisy_backbones(path: Path) -> None:
    """A diffusion backbone (default ensemble > 1) never runs a study on an implicit ensemble size."""
    import backbones

    spec = load_study_spec(path)
    if "backbone.ensemble_size" in spec.search_space:
        return
    named = spec.search_space.get("backbone.name")
    models = named.choices if named is not None else (spec.fixed.get("backbone.name", "random-conv"),)
    for model in models:
        if (backbones.describe_backbone(str(model)).get("default_ensemble_size") or 1) == 1:
            continue
        overrides = spec.trial_overrides({"backbone.name": model} if named is not None else {})
        assert overrides.get("backbone.ensemble_size") is not None, f"{path.name}: {model}"


# -- storage, budget and seeds -----------------------------------------------------------------------------


def test_storage_selection(tmp_path: Path) -> None:
    default = resolve_storage(None, "quickstart", tmp_path / "st")
    assert default.kind == "journal"
    assert default.path == (tmp_path / "st" / "quickstart.journal").absolute()
    assert default.has_heartbeat  # our heartbeats on the journal file (Optuna has none there)

    explicit = resolve_storage(f"journal:{tmp_path}/x.log", "s")
    assert (explicit.kind, explicit.path) == ("journal", tmp_path / "x.log")
    assert resolve_storage(str(tmp_path / "y.journal"), "s").path == tmp_path / "y.journal"

    postgres = resolve_storage("postgresql://alice:secret@db.example:5432/optuna", "s")
    assert postgres.kind == "rdb" and postgres.has_heartbeat
    assert "secret" not in postgres.display and "alice" in postgres.display
    assert postgres.url.endswith("/optuna")
    assert postgres.url.startswith("postgresql")  # possibly with the installed driver named
    named = resolve_storage("postgresql+psycopg2://u@h/db", "s")
    assert named.url == "postgresql+psycopg2://u@h/db"

    sqlite = resolve_storage(f"sqlite:///{tmp_path}/s.db", "s")
    check_workers(sqlite, 1)
    with pytest.raises(ConfigError, match="SQLite"):
        check_workers(sqlite, 2)
    with pytest.raises(ConfigError, match="redis"):
        resolve_storage("redis://localhost", "s")
    with pytest.raises(ConfigError, match="workers"):
        check_workers(default, 0)


def test_heartbeat_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="grace"):
        HeartbeatSettings(interval=5, grace_period=5)
    with pytest.raises(ConfigError, match="interval"):
        HeartbeatSettings(interval=0)


def test_rdb_storage_gets_heartbeat_and_retry(tmp_path: Path) -> None:
    location = resolve_storage(f"sqlite:///{tmp_path}/hb.db", "s")
    storage = open_storage(location, HeartbeatSettings(interval=3, grace_period=7))
    assert storage.heartbeat_interval == 3
    assert storage.grace_period == 7
    assert storage.get_heartbeat_stale_trial_callback() is not None


def test_worker_seeds_differ_per_worker_and_resumption() -> None:
    spec = parse_study_spec(base_study())
    seeds = {worker_seed(spec, worker, existing) for worker in range(3) for existing in (0, 5)}
    assert len(seeds) == 6
    assert worker_seed(spec, 1, 5) == worker_seed(spec, 1, 5)


def test_budget_ignores_retried_failures() -> None:
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    failed = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"x": 0.5}, distributions=dist
    )
    study.add_trial(failed)  # number 0
    study.add_trial(optuna.trial.create_trial(value=1.0, params={"x": 0.1}, distributions=dist))
    assert budget_used(study, count_running=False) == 2
    # a retry of trial 0 (what the heartbeat callback adds) makes trial 0 stop counting
    study.add_trial(
        optuna.trial.create_trial(
            value=2.0,
            params={"x": 0.5},
            distributions=dist,
            system_attrs={"failed_trial": 0, "retry_history": [0]},
        )
    )
    assert budget_used(study, count_running=False) == 2
    running = study.ask()
    assert budget_used(study, count_running=False) == 2
    assert budget_used(study, count_running=True) == 3
    study.tell(running, 0.0)


# -- sweeps with a fake pipeline ----------------------------------------------------------------------------


def temperature_score(config: Any, index: int) -> float:
    """Best at temperature 0.2; deterministic per trial."""
    return 1.0 - abs(math.log(config.method.settings.temperature / 0.2)) / 5


def test_resume_continues_to_n_trials(tmp_path: Path, synth_study: Any) -> None:
    study_file = synth_study(n_trials=5)
    tracker = FakeTracker()
    runner = FakeRunner(temperature_score)
    first = fake_sweep(study_file, tmp_path, runner, tracker, n_trials=2)
    assert (first.n_complete, first.target_trials) == (2, 2)
    assert len(runner.configs) == 2

    second = fake_sweep(study_file, tmp_path, runner, tracker)
    assert second.n_complete == 5
    assert len(runner.configs) == 5  # 3 more, not 5 more
    trials = load_trials(tmp_path, "unit")
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
    assert sorted(run.trial_number for run in tracker.runs) == [0, 1, 2, 3, 4]
    assert all(run.status == "FINISHED" and run.results == 1 for run in tracker.runs)

    third = fake_sweep(study_file, tmp_path, runner, tracker)  # the budget is used: nothing runs
    assert third.n_complete == 5 and len(runner.configs) == 5
    best = max(trials, key=lambda t: t.value)
    assert third.best_value == pytest.approx(best.value)
    assert third.best_params == best.params


def test_trial_settings_outputs_and_sequence_order(
    tmp_path: Path, synth_study: Any, synth_root: Path
) -> None:
    study_file = synth_study(n_trials=2)
    tracker, runner = FakeTracker(), FakeRunner(temperature_score)
    fake_sweep(study_file, tmp_path, runner, tracker)
    location = resolve_storage(None, "unit", tmp_path / "storage")
    study = optuna.load_study(study_name="unit", storage=open_storage(location))
    order = study.user_attrs[SEQUENCE_ORDER_ATTR]
    split = (synth_root / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert sorted(order) == sorted(split)
    for trial, config in zip(study.get_trials(), runner.configs, strict=True):
        assert config.dataset.sequences == order  # the same fixed order in every trial
        assert config.backbone.name == "random-conv" and config.input.short_side == 64
        assert config.method.settings.temperature == trial.params["method.temperature"]
        assert Path(config.output_dir) == tmp_path / "runs" / "unit" / f"trial-{trial.number}"
        # per-sequence J&F reported with the sequence's position as the step
        assert sorted(trial.intermediate_values) == list(range(len(order)))
    run = tracker.runs[0]
    assert run.sequences == order
    assert tracker.parent_calls == 1 and tracker.updates >= 1


def test_finished_grid_is_not_rerun(tmp_path: Path, synth_study: Any) -> None:
    study_file = synth_study(
        sampler={"type": "grid", "seed": 1},
        n_trials=None,
        search_space={"method.topk": {"type": "int", "low": 1, "high": 5, "step": 2}},
    )
    tracker, runner = FakeTracker(), FakeRunner(lambda config, index: config.method.settings.topk / 10)
    summary = fake_sweep(study_file, tmp_path, runner, tracker)
    assert summary.n_complete == 3
    assert sorted(c.method.settings.topk for c in runner.configs) == [1, 3, 5]  # every grid point once
    again = fake_sweep(study_file, tmp_path, runner, tracker, n_trials=10)
    assert again.n_complete == 3 and len(runner.configs) == 3
    assert again.best_params == {"method.topk": 5}


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path: Path, synth_study: Any) -> None:
    study_file = synth_study(
        sampler={"type": "grid"},
        n_trials=None,
        search_space={"method.topk": {"type": "categorical", "choices": [1, 2, 3]}},
    )

    def score(config: Any, index: int) -> float:
        if config.method.settings.topk == 2:
            raise ValueError("the method crashed on these settings (simulated)")
        return 0.5

    tracker = FakeTracker()
    summary = fake_sweep(study_file, tmp_path, FakeRunner(score), tracker)
    assert (summary.n_complete, summary.n_failed) == (2, 1)
    trials = load_trials(tmp_path, "unit")
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].params == {"method.topk": 2}
    assert "crashed" in failed[0].user_attrs["error"]
    assert failed[0].user_attrs["failure_kind"] == "setting"
    assert not [t for t in trials if t.state == optuna.trial.TrialState.WAITING]  # counted, not retried
    run = next(r for r in tracker.runs if r.trial_number == failed[0].number)
    assert run.status == "FAILED" and "crashed" in run.error
    assert sorted(r.status for r in tracker.runs) == ["FAILED", "FINISHED", "FINISHED"]
    assert summary.ok  # one setting failed, the others ran: the sweep did its job


def test_config_error_at_run_time_fails_only_that_trial(tmp_path: Path, synth_study: Any) -> None:
    """Settings the pipeline rejects when it runs (e.g. a layer the backbone lacks) fail one trial."""
    study_file = synth_study(
        sampler={"type": "grid"},
        n_trials=None,
        fixed={"backbone.name": "random-conv", "cache.enabled": False},
        search_space={"backbone.batch_size": {"type": "categorical", "choices": [2, 4]}},
    )
    tracker = FakeTracker()

    def runner(config: Any, **kwargs: Any) -> FakeResult:
        if config.backbone.batch_size == 4:
            raise ConfigError("backbone 'random-conv' has no layer 9")
        return FakeRunner(lambda c, i: 0.5)(config, **kwargs)

    summary = fake_sweep(study_file, tmp_path, runner, tracker)  # type: ignore[arg-type]
    assert (summary.n_complete, summary.n_failed) == (1, 1)
    statuses = {run.params["backbone.batch_size"]: (run.status, run.error) for run in tracker.runs}
    assert statuses[2] == ("FINISHED", None)
    assert statuses[4][0] == "FAILED" and "no layer 9" in statuses[4][1]


def test_clearly_worse_trial_is_pruned(tmp_path: Path, synth_study: Any) -> None:
    """WilcoxonPruner: once the best trial exists, a trial worse on every sequence stops early."""
    study_file = synth_study(
        pruning={"p_threshold": 0.1, "n_startup_steps": 2},
        search_space={"method.temperature": {"type": "categorical", "choices": [0.1, 0.2, 0.9]}},
        enqueue=[
            {"method.temperature": 0.2},
            {"method.temperature": 0.1},
            {"method.temperature": 0.9},
        ],
        n_trials=3,
    )
    quality = {0.2: 0.8, 0.1: 0.75, 0.9: 0.1}

    def score(config: Any, index: int) -> float:
        # a little per-sequence variation so the differences are not all tied
        return quality[config.method.settings.temperature] + 0.01 * (index % 3)

    tracker = FakeTracker()
    runner = FakeRunner(score, n_steps=12)
    summary = fake_sweep(study_file, tmp_path, runner, tracker)
    trials = {t.params["method.temperature"]: t for t in load_trials(tmp_path, "unit")}
    assert trials[0.2].state == optuna.trial.TrialState.COMPLETE
    assert trials[0.9].state == optuna.trial.TrialState.PRUNED
    assert len(trials[0.9].intermediate_values) < 12  # stopped before the last sequence
    assert summary.n_pruned >= 1
    pruned_run = next(r for r in tracker.runs if r.trial_number == trials[0.9].number)
    assert pruned_run.status == "KILLED" and pruned_run.tags.get("pruned") == "true"


def test_paper_settings_are_enqueued_unchanged(tmp_path: Path, synth_root: Path) -> None:
    """The paper study's trials are exactly the published settings (checked without running models)."""
    spec = load_study_spec(STUDIES / "paper.yaml")
    paper = {
        "method.temperature": 0.2,
        "method.topk": 15,
        "backbone.ensemble_size": 8,
    }  # and method.memory_caps null: "do not override", the default (no caps)
    expected = [
        {"backbone.name": "adm", "backbone.timestep": 30, "backbone.layer": 6} | paper,
        {"backbone.name": "sd2.1", "backbone.timestep": 100, "backbone.layer": 9} | paper,
        {
            "backbone.name": "adm",
            "backbone.timestep": 51,
            "backbone.layer": 7,
            "method.temperature": 0.1,
            "method.topk": 10,
            "backbone.ensemble_size": 4,
            "method.memory_caps": "shooting=10",
        },
        {
            "backbone.name": "sd2.1",
            "backbone.timestep": 51,
            "backbone.layer": "up_ft2",
            "method.temperature": 0.2,
            "method.topk": 15,
            "backbone.ensemble_size": 8,
            "method.memory_caps": "shooting=10",
        },
        {
            "backbone.name": "sd2.1",
            "backbone.timestep": 100,
            "backbone.layer": 9,
            "method.temperature": 0.2,
            "method.topk": 15,
            "backbone.ensemble_size": 8,
            "method.filter": "oracle",
            "method.per_object": True,
        },
        {
            "backbone.name": "sd2.1",
            "backbone.timestep": 100,
            "backbone.layer": 9,
            "method.temperature": 0.2,
            "method.topk": 15,
            "backbone.ensemble_size": 4,
            "method.name": "prompt-learning",
        },
    ]
    shared = {
        "method.n_last_frames": 28,
        "method.radius": 15,
        "method.similarity": "cosine",
        "input.short_side": 480,
    }
    assert spec.target_trials() == 6
    assert [spec.trial_overrides(entry) for entry in spec.enqueue] == [shared | e for e in expected]

    # through Optuna: the enqueued trials come first and suggest() returns exactly these values
    local = replace(spec, dataset=replace(spec.dataset, root=str(synth_root)))
    study = create_or_load_study(local, optuna.storages.InMemoryStorage())
    create_or_load_study(local, study._storage)  # again (a resumed sweep): no duplicates
    asked = []
    for _ in range(6):
        trial = study.ask()
        params = {name: p.suggest(trial) for name, p in local.search_space.items()}
        asked.append(local.trial_overrides(params))
        study.tell(trial, 0.5)
    assert asked == [shared | e for e in expected]
    assert study.get_trials(states=(optuna.trial.TrialState.WAITING,)) == []


def test_direction_mismatch_with_existing_study(tmp_path: Path, synth_study: Any) -> None:
    study_file = synth_study(n_trials=1)
    fake_sweep(study_file, tmp_path, FakeRunner(temperature_score), FakeTracker())
    data = yaml.safe_load(study_file.read_text())
    data["objective"]["direction"] = "minimize"
    study_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="direction"):
        fake_sweep(study_file, tmp_path, FakeRunner(temperature_score), FakeTracker())


# -- end to end: real pipeline, random-conv, MLflow ----------------------------------------------------------


def test_end_to_end_sweep_on_synthetic_data(tmp_path: Path, synth_root: Path) -> None:
    """quickstart-like: every trial is logged exactly once as a child run, with its outcome."""
    from mlflow import MlflowClient

    from harness.tracking import TAG_ROLE, TAG_STUDY, TAG_TRIAL

    quick = yaml.safe_load((STUDIES / "quickstart.yaml").read_text())
    quick.update(
        name="e2e",
        dataset={"root": str(synth_root), "split": "val", "sequences": ["synth-occlusion", "synth-crossing"]},
        sampler={"type": "grid", "seed": 0},
        n_trials=None,
        enqueue=[],
        search_space={
            "backbone.layer": {"type": "categorical", "choices": [1, 2]},
            # t = 5000 is outside random-conv's 1000 steps: that trial fails at run time
            "backbone.timestep": {"type": "categorical", "choices": [0, 5000]},
        },
    )
    quick["fixed"] = quick["fixed"] | {
        "input.short_side": 64,
        "method.radius": 3,
        "cache.dir": str(tmp_path / "cache"),
    }
    study_file = write_study(tmp_path, quick)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_sweep(
        study_file,
        storage=None,
        tracking=TrackingConfig(tracking_uri=tracking_uri, experiment="e2e-test"),
        output_root=tmp_path / "runs",
        storage_dir=tmp_path / "storage",
    )
    assert (summary.n_complete, summary.n_failed, summary.n_pruned) == (2, 2, 0)
    assert 0.0 <= summary.best_value <= 1.0
    assert summary.best_params["backbone.timestep"] == 0

    trials = load_trials(tmp_path, "e2e")
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("e2e-test")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`{TAG_STUDY}` = 'e2e' and tags.`{TAG_ROLE}` = 'trial'"
    )
    by_trial: dict[int, list[Any]] = {}
    for run in runs:
        by_trial.setdefault(int(run.data.tags[TAG_TRIAL]), []).append(run)
    assert sorted(by_trial) == sorted(t.number for t in trials)
    assert all(len(found) == 1 for found in by_trial.values())
    for trial in trials:
        run = by_trial[trial.number][0]
        assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert run.data.metrics["JF_mean"] == pytest.approx(trial.value)
            assert (tmp_path / "runs" / "e2e" / f"trial-{trial.number}" / "predictions").is_dir()
        else:
            assert trial.params["backbone.timestep"] == 5000
            assert run.info.status == "FAILED"
            assert "5000" in trial.user_attrs["error"]


def test_abandoned_journal_trial_is_failed_and_retried(tmp_path: Path, synth_study: Any) -> None:
    """--fail-running: a trial left RUNNING by a crashed worker (journal storage has no heartbeats)."""
    study_file = synth_study(n_trials=3)
    tracker, runner = FakeTracker(), FakeRunner(temperature_score)
    fake_sweep(study_file, tmp_path, runner, tracker, n_trials=1)
    location = resolve_storage(None, "unit", tmp_path / "storage")
    study = optuna.load_study(study_name="unit", storage=open_storage(location))
    spec = load_study_spec(study_file)
    crashed = study.ask()  # what a worker killed mid-trial leaves behind
    crashed_params = {name: p.suggest(crashed) for name, p in spec.search_space.items()}

    summary = fake_sweep(study_file, tmp_path, runner, tracker, fail_running=True)
    trials = {t.number: t for t in load_trials(tmp_path, "unit")}
    assert trials[crashed.number].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == crashed.number]
    assert len(retry) == 1 and retry[0].params == crashed_params
    assert retry[0].state == optuna.trial.TrialState.COMPLETE
    # the retried failure does not count: 3 complete trials, 1 failed (and retried) one
    assert (summary.n_complete, summary.n_failed) == (3, 0)
    assert any(crashed.number in states for states in tracker.closed_states)


def test_command_line_validate_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.study import main

    assert main([str(STUDIES / "timestep.yaml"), "--validate"]) == 0
    out = capsys.readouterr().out
    assert "timestep" in out and "19 grid points" in out

    bad = write_study(tmp_path, base_study(sampler={"type": "annealing"}), name="bad.yaml")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "sampler.type" in err


def test_sweep_arguments_for_the_main_cli() -> None:
    import argparse

    from harness.study import add_sweep_arguments

    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    args = parser.parse_args(
        ["studies/x.yaml", "--storage", "postgresql://h/db", "--workers", "3", "--n-trials", "7"]
    )
    assert (args.study, args.storage, args.workers, args.n_trials) == (
        Path("studies/x.yaml"),
        "postgresql://h/db",
        3,
        7,
    )
    defaults = parser.parse_args(["s.yaml"])
    assert (defaults.storage, defaults.tracking_uri, defaults.workers, defaults.n_trials) == (
        None,
        None,
        1,
        None,
    )
