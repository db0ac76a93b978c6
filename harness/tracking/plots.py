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
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    import optuna

DEFAULT_METRIC_LABEL = "J&F-Mean"
#: integer axes with at most this many values, none closer than 1/this of the range, get a tick per value
MAX_LABELLED_TICKS = 12


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


def _levels(pairs: list[tuple[object, float]]) -> tuple[bool, list[object], dict[object, object]]:
    """Whether the values are numeric, the distinct levels in order, and a representative value each."""
    numeric = all(_is_number(v) for v, _ in pairs)
    # one level per distinct value (compared as text for categories), ordered by the original values
    representative: dict[object, object] = {}
    for value, _ in pairs:
        representative.setdefault(float(value) if numeric else str(value), value)  # type: ignore[arg-type]
    levels = sorted(representative, key=lambda level: _category_key(representative[level]))
    return numeric, levels, representative


def _is_integer(value: object) -> bool:
    return _is_number(value) and float(value).is_integer()  # type: ignore[arg-type]


def draw_metric_vs_param(
    ax: Axes,
    values: Sequence[object],
    scores: Sequence[float],
    param: str,
    metric: str = DEFAULT_METRIC_LABEL,
    *,
    sequence_scores: Sequence[Sequence[float]] | None = None,
    published: Sequence[tuple[object, str]] = (),
) -> None:
    """Every trial as a dot and the mean per parameter value as a line; with ``sequence_scores`` (each
    trial's per-sequence scores) the spread of those per value (interquartile bar, min-max line); each
    ``(value, label)`` in ``published`` as a dashed vertical line.

    Numeric parameters use a numeric axis (integer ticks for integer settings); anything else (layer
    names, similarity) is categorical.
    """
    keep = [
        i
        for i, (v, s) in enumerate(zip(values, scores, strict=True))
        if not _is_missing(v) and not _is_missing(s) and math.isfinite(float(s))
    ]
    pairs = [(values[i], float(scores[i])) for i in keep]
    if not pairs:
        ax.set_title(f"{metric} vs {param} (no finished trials)")
        return
    numeric, levels, representative = _levels(pairs)
    position = {level: (float(level) if numeric else float(i)) for i, level in enumerate(levels)}  # type: ignore[arg-type]
    level_of = [float(v) if numeric else str(v) for v, _ in pairs]  # type: ignore[arg-type]
    if sequence_scores is not None:
        pooled: dict[object, list[float]] = {level: [] for level in levels}
        for index, level in zip(keep, level_of, strict=True):
            pooled[level].extend(float(s) for s in sequence_scores[index] if not _is_missing(s))
        _draw_spread(ax, {position[level]: spread for level, spread in pooled.items()})
    ax.scatter([position[level] for level in level_of], [s for _, s in pairs], s=18, alpha=0.6, label="trial")
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
    for value, label in published:
        key = float(value) if numeric and _is_number(value) else str(value)  # type: ignore[arg-type]
        if key in position:
            ax.axvline(position[key], color="tab:green", linestyle="--", linewidth=1.2, label=label)
    if not numeric:
        ax.set_xticks([position[level] for level in levels])
        ax.set_xticklabels([str(level) for level in levels], rotation=45 if len(levels) > 6 else 0)
    elif all(_is_integer(representative[level]) for level in levels):
        ticks = sorted(position[level] for level in levels)
        span = ticks[-1] - ticks[0]
        gaps = [right - left for left, right in zip(ticks, ticks[1:], strict=False)]
        if len(ticks) <= MAX_LABELLED_TICKS and (not gaps or min(gaps) >= span / MAX_LABELLED_TICKS):
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(int(tick)) for tick in ticks])
        else:  # too many or too close to label each: integer ticks only
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _draw_spread(ax: Axes, pooled: Mapping[float, list[float]]) -> None:
    """Per x: a thin line from the lowest to the highest score and a thick bar over the middle half."""
    xs = [x for x, values in pooled.items() if values]
    if not xs:
        return
    low = [float(np.min(pooled[x])) for x in xs]
    high = [float(np.max(pooled[x])) for x in xs]
    q1 = [float(np.percentile(pooled[x], 25)) for x in xs]
    q3 = [float(np.percentile(pooled[x], 75)) for x in xs]
    ax.vlines(xs, low, high, color="tab:gray", linewidth=1, alpha=0.7, label="sequences: range")
    ax.vlines(xs, q1, q3, color="tab:gray", linewidth=6, alpha=0.5, label="sequences: middle half")


def metric_vs_param_figure(
    values: Sequence[object],
    scores: Sequence[float],
    param: str,
    metric: str = DEFAULT_METRIC_LABEL,
    *,
    sequence_scores: Sequence[Sequence[float]] | None = None,
    published: Sequence[tuple[object, str]] = (),
) -> Figure:
    figure = Figure(figsize=(6, 4))
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.18, top=0.91)
    ax = figure.add_subplot()
    draw_metric_vs_param(
        ax, values, scores, param, metric, sequence_scores=sequence_scores, published=published
    )
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


def marginal_figure(effects: Mapping[str, float], metric: str = DEFAULT_METRIC_LABEL) -> Figure:
    """Horizontal bars: per parameter, the highest minus the lowest per-value mean of ``metric``.

    Drawn instead of fANOVA importance when the trials confound the settings: the bars are marginal
    (each ignores the other settings), and the title says so."""
    figure = Figure(figsize=(6, 1.6 + 0.4 * max(1, len(effects))), layout="constrained")
    ax = figure.add_subplot()
    ordered = sorted(effects.items(), key=lambda item: item[1])
    ax.barh([name for name, _ in ordered], [value for _, value in ordered], color="tab:gray")
    ax.set_xlabel(f"range of per-value mean {metric}")
    ax.set_title("marginal effect per setting\n(not adjusted: the trials confound these settings)")
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


def _determines(rows: Sequence[Mapping[str, object]], first: str, second: str) -> bool:
    """Whether, among ``rows`` having both params, each value of ``first`` comes with one value of
    ``second`` only. A ``first`` that never repeats a value (a continuous TPE axis) determines nothing
    that the trials could have shown otherwise, so it does not count."""
    seen: dict[str, list[str]] = {}
    for row in rows:
        if first in row and second in row:
            seen.setdefault(repr(row[first]), []).append(repr(row[second]))
    repeated = [values for values in seen.values() if len(values) > 1]
    return bool(repeated) and all(len(set(values)) == 1 for values in seen.values())


def confounded_pairs(
    trials: Sequence[optuna.trial.FrozenTrial], params: Sequence[str]
) -> list[tuple[str, str]]:
    """Pairs of varying params whose effects the trials cannot separate: one's value fixes the other's
    (e.g. every layer-6 trial used t 30). Parameter importance over such trials is not meaningful."""
    rows = [trial.params for trial in trials]
    return [
        (first, second)
        for i, first in enumerate(params)
        for second in params[i + 1 :]
        if _determines(rows, first, second) or _determines(rows, second, first)
    ]


def marginal_effects(trials: Sequence[optuna.trial.FrozenTrial], params: Sequence[str]) -> dict[str, float]:
    """Per param: highest minus lowest mean objective over the trials with each of its values."""
    effects = {}
    for param in params:
        by_value: dict[str, list[float]] = {}
        for trial in trials:
            if param in trial.params and trial.value is not None:
                by_value.setdefault(repr(trial.params[param]), []).append(float(trial.value))
        means = [float(np.mean(values)) for values in by_value.values()]
        if len(means) > 1:
            effects[param] = max(means) - min(means)
    return effects


def _same_setting(left: object, right: object) -> bool:
    """Settings compared as MLflow stores them (``6`` and ``"6"`` agree, so do ``0.1`` and ``0.10``)."""
    if _is_number(left) and _is_number(right):
        return float(left) == float(right)  # type: ignore[arg-type]
    return str(left) == str(right)


def published_marks(param: str, fixed: Mapping[str, object] | None = None) -> list[tuple[object, str]]:
    """``(value, label)`` for each published system (harness.published.PUBLISHED) that sets ``param`` and
    agrees with the study's ``fixed`` settings wherever both set a key: where its setting lies on the
    study's axis."""
    from harness.published import PUBLISHED

    fixed = fixed or {}
    marks = []
    for name, system in sorted(PUBLISHED.items()):
        overrides = system.overrides
        if param not in overrides:
            continue
        if any(key in fixed and not _same_setting(fixed[key], value) for key, value in overrides.items()):
            continue
        number = f" ({system.jf:.1f} J&F)" if system.jf is not None else ""
        marks.append((overrides[param], f"published: {name}{number}"))
    return marks


def study_figures(study: optuna.Study, fixed: Mapping[str, object] | None = None) -> dict[str, Figure]:
    """All figures of a study, keyed by file name; empty until a trial is complete.

    Per varying setting: trials, per-value means and the spread of the per-sequence scores (the values
    each trial reported per sequence), with published settings marked (``fixed`` = the study's fixed
    settings, used to pick the published systems that apply). Parameter importance (fANOVA) needs two
    varying settings that the trials do not confound; otherwise a marginal-effect plot that says so is
    drawn instead. A failing importance computation is skipped with a warning: a plot never stops a sweep.
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
            [float(t.value) for t in with_param],  # type: ignore[arg-type]
            param,
            sequence_scores=[list(t.intermediate_values.values()) for t in with_param],
            published=published_marks(param, fixed),
        )
    figures["optimization_history.png"] = history_figure(
        [t.number for t in complete],
        [float(t.value) for t in complete],  # type: ignore[arg-type]
        maximize=maximize,
    )
    if len(complete) < 2 or len(varying) < 2:
        return figures
    if confounded_pairs(complete, varying):
        effects = marginal_effects(complete, varying)
        if effects:
            figures["marginal_effects.png"] = marginal_figure(effects)
        return figures
    try:
        importances = get_param_importances(study)
    except Exception as error:  # noqa: BLE001 - importance is optional; never fail a sweep for it
        warnings.warn(f"parameter importance of study {study.study_name!r} failed: {error}", stacklevel=2)
    else:
        if importances:
            figures["param_importance.png"] = importance_figure(importances)
    return figures
