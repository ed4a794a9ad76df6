"""Plots of an :class:`rdtf.evaluate.EvalResult`, saved as image files.

Built on ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend), so
they work the same in a notebook, a CI job or a worker thread. PSNR can be infinite
(an exact copy); plots draw it at :data:`PSNR_DISPLAY_CAP` and say so on the axis.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from rdtf.evaluate import EvalResult
from rdtf.io import write_atomic

#: Infinite PSNR (identical frames) is drawn at this many dB.
PSNR_DISPLAY_CAP = 60.0


def _displayed(values: np.ndarray | float) -> np.ndarray:
    return np.minimum(np.asarray(values, dtype=np.float64), PSNR_DISPLAY_CAP)


def _colour(result: EvalResult, method: str) -> str:
    """One colour per method across every panel and plot of a result."""
    return f"C{result.methods.index(method) % 10}" if method in result.methods else "black"


def _column_mean(values: np.ndarray) -> np.ndarray:
    """Mean over rows ignoring NaN; NaN where a column has no value (e.g. padding frames)."""
    counts = np.count_nonzero(~np.isnan(values), axis=0)
    return np.where(counts > 0, np.nansum(values, axis=0) / np.maximum(counts, 1), np.nan)


def _axis_label(metric: str) -> str:
    return f"{metric} (∞ drawn at {PSNR_DISPLAY_CAP:g})" if metric.startswith("psnr") else metric


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Save ``figure`` atomically in the format its suffix names (png, pdf, svg)."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lower().lstrip(".") or "png", bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


def _check_metric(result: EvalResult, metric: str) -> None:
    if metric not in result.metrics:
        raise ValueError(f"metric {metric!r}: not in this result (has {', '.join(result.metrics)})")


def plot_metric_by_task(result: EvalResult, metric: str, path: str | Path, *, methods: Sequence[str] | None = None) -> Path:
    """Grouped bars: one group per task, one bar per method, bootstrap CI as error bars."""
    _check_metric(result, metric)
    methods = list(methods or result.methods)
    tasks = [task for task in result.tasks if any(result.aggregate(task, m, metric) for m in methods)]
    figure = Figure(figsize=(max(5.0, 1.3 * len(tasks) + 2.0), 3.6), dpi=110)
    ax = figure.subplots()
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        means, lows, highs, where = [], [], [], []
        for position, task in enumerate(tasks):
            entry = result.aggregate(task, method, metric)
            if entry is None:
                continue
            mean = _displayed(entry["mean"])
            low = mean if np.isnan(entry["ci_low"]) else _displayed(entry["ci_low"])
            high = mean if np.isnan(entry["ci_high"]) else _displayed(entry["ci_high"])
            means.append(mean)
            lows.append(mean - low)
            highs.append(high - mean)
            where.append(position - 0.4 + (index + 0.5) * width)
        if where:
            ax.bar(where, means, width, yerr=[lows, highs], capsize=2, label=method, color=_colour(result, method))
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, fontsize=8)
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(f"{metric} by task (mean, {result.settings.get('confidence', 0.95):.0%} bootstrap CI)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(figure, path)


def sweep_values(result: EvalResult, parameter: str) -> dict[str, float]:
    """Methods named ``"{parameter}={value}"`` (see :func:`rdtf.evaluate.sweep_methods`) → value."""
    prefix = f"{parameter}="
    values = {}
    for method in result.methods:
        if method.startswith(prefix):
            try:
                values[method] = float(method[len(prefix) :])
            except ValueError:
                continue
    return values


def plot_metric_vs_parameter(result: EvalResult, metric: str, parameter: str, path: str | Path) -> Path:
    """One line per task: ``metric`` against a sampler parameter (e.g. denoising steps, guidance scale)."""
    _check_metric(result, metric)
    values = sweep_values(result, parameter)
    if len(values) < 2:
        raise ValueError(f"parameter {parameter!r}: need at least two methods named '{parameter}=<number>', found {sorted(values)}")
    figure = Figure(figsize=(5.0, 3.4), dpi=110)
    ax = figure.subplots()
    for task in result.tasks:
        points = sorted(
            (value, entry)
            for method, value in values.items()
            if (entry := result.aggregate(task, method, metric)) is not None
        )
        if not points:
            continue
        xs = np.array([value for value, _ in points])
        means = _displayed([entry["mean"] for _, entry in points])
        ax.plot(xs, means, marker="o", label=task)
        lows = np.array([entry["ci_low"] for _, entry in points], dtype=np.float64)
        highs = np.array([entry["ci_high"] for _, entry in points], dtype=np.float64)
        if not np.isnan(lows).all():
            ax.fill_between(xs, _displayed(lows), _displayed(highs), alpha=0.15)
    ax.set_xlabel(parameter)
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(f"{metric} vs {parameter}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_per_frame(result: EvalResult, path: str | Path, *, metric: str = "psnr", methods: Sequence[str] | None = None) -> Path:
    """Mean per-frame ``metric`` by frame index, one panel per task, given frames shaded.

    Shows where interpolation dips between given frames and how prediction decays with
    distance from them. Each panel uses the clips of its most common length; a frame is
    shaded when most of those clips give it.
    """
    methods = list(methods or result.methods)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for entry in result.per_frame:
        if metric not in entry:
            raise ValueError(f"metric {metric!r}: no per-frame values (have psnr, ssim, iou, sharpness)")
        by_task[entry["task"]].append(entry)
    tasks = [task for task in result.tasks if by_task[task]]
    figure = Figure(figsize=(4.2 * len(tasks), 3.2), dpi=110)
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        lengths = [len(entry[metric]) for entry in by_task[task]]
        length = max(set(lengths), key=lengths.count)
        entries = [entry for entry in by_task[task] if len(entry[metric]) == length]
        given_share = np.mean([entry["given"] for entry in entries], axis=0)
        for t in np.flatnonzero(given_share > 0.5):
            ax.axvspan(t + 0.5, t + 1.5, color="#006ec8", alpha=0.12, lw=0)
        for method in methods:
            series = [entry[metric] for entry in entries if entry["method"] == method]
            if not series:
                continue
            ax.plot(np.arange(1, length + 1), _column_mean(_displayed(series)), marker=".", label=method, color=_colour(result, method))
        ax.set_title(f"{task} (shaded: given)", fontsize=9)
        ax.set_xlabel("frame")
        ax.set_xticks(range(1, length + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(_axis_label(metric))
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    axes[-1].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(figure, path)
