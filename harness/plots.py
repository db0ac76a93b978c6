"""Figures of a study: J&F against each varying parameter, parameter importance, optimisation history.

Figures are built with the object-oriented matplotlib API (``Figure`` + Agg canvas), not pyplot, so that
making plots in worker threads or processes touches no global figure state and needs no display. Margins
are fixed rather than computed by a layout engine: rendering is the slow part (about 0.3 s a figure on a
2-core machine) and a layout engine doubles it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    import optuna

DEFAULT_METRIC_LABEL = "J&F-Mean"


def _is_missing(value: object) -> bool:
    """None, NaN and pandas' NA (a param a trial did not have)."""
    if value is None or type(value).__name__ == "NAType":
        return True
    try:
        return bool(value != value)  # NaN and NA are not equal to themselves
    except (TypeError, ValueError):
        return False


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _category_key(value: object) -> tuple[int, float, str]:
    """Numbers first in numeric order, then everything else alphabetically (layers mix 6 and 'up_ft2')."""
    if _is_number(value):
        return (0, float(value), "")  # type: ignore[arg-type]
    return (1, 0.0, str(value))


def draw_metric_vs_param(
    ax: Axes,
    values: Sequence[object],
    scores: Sequence[float],
    param: str,
    metric: str = DEFAULT_METRIC_LABEL,
) -> None:
    """Every trial as a dot, and the mean score per parameter value as a line.

    Numeric parameters use a numeric axis; anything else (layer names, similarity) is categorical.
    """
    pairs = [
        (v, float(s))
        for v, s in zip(values, scores, strict=True)
        if not _is_missing(v) and not _is_missing(s) and math.isfinite(float(s))
    ]
    if not pairs:
        ax.set_title(f"{metric} vs {param} (no finished trials)")
        return
    numeric = all(_is_number(v) for v, _ in pairs)
    # one level per distinct value (compared as text for categories), ordered by the original values
    representative: dict[object, object] = {}
    for value, _ in pairs:
        representative.setdefault(float(value) if numeric else str(value), value)  # type: ignore[arg-type]
    levels = sorted(representative, key=lambda level: _category_key(representative[level]))
    position = {level: (float(level) if numeric else float(i)) for i, level in enumerate(levels)}  # type: ignore[arg-type]
    level_of = [float(v) if numeric else str(v) for v, _ in pairs]  # type: ignore[arg-type]
    xs = [position[level] for level in level_of]
    ys = [s for _, s in pairs]
    ax.scatter(xs, ys, s=18, alpha=0.6, label="trial")
    means = [
        float(np.mean([s for level_i, (_, s) in zip(level_of, pairs, strict=True) if level_i == level]))
        for level in levels
    ]
    # a line between categories would suggest an order that is not there: markers only
    ax.plot(
        [position[level] for level in levels],
        means,
        marker="o" if numeric else "D",
        color="tab:red",
        linewidth=1.5,
        linestyle="-" if numeric else "none",
        label="mean",
    )
    if not numeric:
        ax.set_xticks([position[level] for level in levels])
        ax.set_xticklabels([str(level) for level in levels], rotation=45 if len(levels) > 6 else 0)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def metric_vs_param_figure(
    values: Sequence[object], scores: Sequence[float], param: str, metric: str = DEFAULT_METRIC_LABEL
) -> Figure:
    figure = Figure(figsize=(6, 4))
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.18, top=0.91)
    draw_metric_vs_param(figure.add_subplot(), values, scores, param, metric)
    return figure


def importance_figure(importances: Mapping[str, float]) -> Figure:
    """Horizontal bars, most important parameter on top."""
    # parameter names on the y axis have any length: let the layout engine make room for them
    figure = Figure(figsize=(6, 1.2 + 0.4 * max(1, len(importances))), layout="constrained")
    ax = figure.add_subplot()
    ordered = sorted(importances.items(), key=lambda item: item[1])
    ax.barh([name for name, _ in ordered], [value for _, value in ordered], color="tab:blue")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("parameter importance")
    return figure


def history_figure(
    numbers_: Sequence[int],
    values: Sequence[float],
    maximize: bool = True,
    metric: str = DEFAULT_METRIC_LABEL,
) -> Figure:
    """Each complete trial's value in trial order, with the best value so far."""
    figure = Figure(figsize=(6, 4))
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.91)
    ax = figure.add_subplot()
    ax.scatter(numbers_, values, s=18, alpha=0.7, label="trial")
    if len(values):
        best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
        ax.step(numbers_, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("optimisation history")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return figure


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=dpi)
    return path


def plot_filename(param: str, full: bool = False) -> str:
    """``backbone.timestep`` -> ``jf_vs_timestep.png`` (the last dotted part names the axis, or the whole
    name with ``full``)."""
    short = param if full else param.rsplit(".", 1)[-1]
    safe = "".join(char if char.isalnum() or char in "-_" else "_" for char in short)
    return f"jf_vs_{safe}.png"


def varying_params(trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """Params that take more than one value among ``trials``, in first-seen order."""
    seen: dict[str, set[str]] = {}
    for trial in trials:
        for name, value in trial.params.items():
            seen.setdefault(name, set()).add(repr(value))
    return [name for name, distinct in seen.items() if len(distinct) > 1]


def study_figures(study: optuna.Study) -> dict[str, Figure]:
    """All figures of a study, keyed by file name; empty until a trial is complete.

    Parameter importance needs two complete trials and a varying parameter; it is skipped with a warning
    when Optuna cannot compute it, so that a plot never stops a sweep.
    """
    from optuna.importance import get_param_importances
    from optuna.trial import TrialState

    if len(study.directions) != 1:
        return {}
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if not complete:
        return {}
    maximize = study.direction.name == "MAXIMIZE"
    figures: dict[str, Figure] = {}
    varying = varying_params(complete)
    for param in varying:
        with_param = [t for t in complete if param in t.params]
        filename = plot_filename(param)
        if filename in figures:
            filename = plot_filename(param, full=True)
        figures[filename] = metric_vs_param_figure(
            [t.params[param] for t in with_param],
            [float(t.value) for t in with_param],
            param,  # type: ignore[arg-type]
        )
    figures["optimization_history.png"] = history_figure(
        [t.number for t in complete],
        [float(t.value) for t in complete],
        maximize=maximize,  # type: ignore[arg-type]
    )
    if len(complete) >= 2 and varying:
        try:
            importances = get_param_importances(study)
        except Exception as error:  # noqa: BLE001 - importance is optional; never fail a sweep for it
            warnings.warn(f"parameter importance of study {study.study_name!r} failed: {error}", stacklevel=2)
        else:
            if importances:
                figures["param_importance.png"] = importance_figure(importances)
    return figures
