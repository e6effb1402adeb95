"""PNG figures of the study: curves with mean ± std bands, lr grids, effective step sizes, lr sensitivity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rmsprop.tools.compare.claims import (  # noqa: E402
    CLAIM_TASKS,
    PHASES,
    SENSITIVITY_MARGIN,
    lr_sensitivity,
    mean_curve,
    mean_step_size_curve,
)
from rmsprop.tools.compare.optimizers import OPTIMIZERS  # noqa: E402

__all__ = ["SENSITIVITY_PLOT", "plot_lr_sensitivity", "plot_step_sizes", "plot_task", "write_plots"]

COLORS = dict(zip((spec.name for spec in OPTIMIZERS), plt.get_cmap("tab10").colors))
DPI = 90
SENSITIVITY_PLOT = "lr-sensitivity"


def write_plots(tasks: dict[str, Any], out_dir: Path) -> list[Path]:
    """One figure per task (``<task>.png``; step sizes for the long run) and ``lr-sensitivity.png``."""
    figures = {
        name: plot_step_sizes(task) if task["tune_around"] else plot_task(task) for name, task in tasks.items()
    }
    sensitivity_tasks = [tasks[name] for name in CLAIM_TASKS[6] if name in tasks]
    if sensitivity_tasks:
        figures[SENSITIVITY_PLOT] = plot_lr_sensitivity(sensitivity_tasks)
    paths = []
    for name, figure in figures.items():
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=DPI)
        plt.close(figure)
        paths.append(path)
    return paths


def _x(task: dict[str, Any], steps: np.ndarray) -> np.ndarray:
    return steps * (task["env_steps_per_step"] or 1)


def _x_label(task: dict[str, Any]) -> str:
    return "environment steps" if task["env_steps_per_step"] else "step"


def plot_task(task: dict[str, Any]) -> plt.Figure:
    """The curve metric over training (mean ± std over seeds), any extra curve, and the final figure against lr."""
    extra = task["extra_curve"]
    panels = 3 if extra else 2
    figure, axes = plt.subplots(
        1, panels, figsize=(6 * panels, 4.5), width_ratios=(3, 3, 2)[-panels:], layout="constrained"
    )
    curves, lrs = axes[0], axes[-1]
    if task["log_scale"]:
        curves.set_yscale("log")
        lrs.set_yscale("log")
    for name, optimizer in task["optimizers"].items():
        steps, mean, std = mean_curve(optimizer, task["curve_metric"])
        _band(curves, _x(task, steps), mean, std, f"{name} (lr={optimizer['best_lr']:g})", COLORS[name])
        if extra:
            steps, mean, std = _mean_where_logged(optimizer, extra[0])
            _band(axes[1], _x(task, steps), mean, std, name, COLORS[name])
        grid = [run["lr"] for run in optimizer["tuning"]]
        finals = [np.nan if run["diverged"] else run["final"][task["metric"]] for run in optimizer["tuning"]]
        lrs.plot(grid, finals, "o-", color=COLORS[name], label=name, markersize=4)
    for step in task["marked_steps"]:
        curves.axvline(_x(task, np.asarray(step)), color="gray", linestyle=":", linewidth=1)
    curves.set(xlabel=_x_label(task), ylabel=task["curve_label"], title=f"{task['name']}: {task['curve_label']} (mean ± std)")
    if extra:
        axes[1].set(xlabel=_x_label(task), ylabel=extra[1], title=f"{extra[1]} (mean ± std)")
    lrs.set(xlabel="learning rate", ylabel=task["metric_label"], xscale="log", title="lr grid, seed 0 (diverged: gap)")
    curves.legend(fontsize=8)
    return figure


def plot_step_sizes(task: dict[str, Any]) -> plt.Figure:
    """Left: median effective step size lr/denominator over training. Right: the curve metric. Phases dotted."""
    figure, (sizes, curves) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    sizes.set_yscale("log")
    for name, optimizer in task["optimizers"].items():
        label = f"{name} (lr={optimizer['best_lr']:g})"
        steps, mean, std = mean_step_size_curve(optimizer)
        _band(sizes, steps, mean, std, label, COLORS[name])
        steps, mean, std = mean_curve(optimizer, task["curve_metric"])
        _band(curves, steps, mean, std, label, COLORS[name])
    for k in range(1, len(PHASES)):
        for axes in (sizes, curves):
            axes.axvline(task["steps"] * k / len(PHASES), color="gray", linestyle=":", linewidth=1)
    sizes.set(
        xlabel="step",
        ylabel="median effective step size",
        title=f"{task['name']}: effective step size lr / denominator (median over parameters)",
    )
    curves.set(xlabel="step", ylabel=task["curve_label"], title=f"{task['curve_label']} (phases dotted)")
    sizes.legend(fontsize=8)
    return figure


def plot_lr_sensitivity(tasks: list[dict[str, Any]]) -> plt.Figure:
    """Per task: each optimizer's seed-0 progress against lr, as a fraction of its best lr's; the margin dashed."""
    columns = min(4, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4 * columns, 3.4 * rows), squeeze=False, sharey=True, layout="constrained"
    )
    floor = -0.1
    for axis, task in zip(axes.flat, tasks):
        for name, optimizer in task["optimizers"].items():
            entry = lr_sensitivity(task, optimizer)
            # Runs worse than the untrained model are drawn on the floor; diverged runs leave a gap.
            fraction = np.maximum(np.asarray(entry["fraction"], dtype=float), floor)
            axis.plot(entry["lrs"], fraction, "o-", color=COLORS[name], label=name, markersize=3, linewidth=1.2)
        axis.axhline(1 - SENSITIVITY_MARGIN, color="gray", linestyle="--", linewidth=1)
        axis.set(xscale="log", title=task["name"], xlabel="learning rate", ylim=(floor - 0.05, 1.05))
    for axis in axes[:, 0]:
        axis.set_ylabel("fraction of the best lr's progress")
    for axis in list(axes.flat)[len(tasks) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(
        f"lr sensitivity (seed 0): above the dashed line an lr makes >= {round((1 - SENSITIVITY_MARGIN) * 100)}% "
        "of the best lr's progress over the untrained model"
    )
    return figure


def _mean_where_logged(optimizer: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and std over the final runs that logged ``key`` at each point (episodes end irregularly)."""
    runs = optimizer["runs"]
    steps = np.asarray(runs[0]["curves"]["step"], dtype=float)
    table = np.array([[np.nan if v is None else v for v in run["curves"][key]] for run in runs], dtype=float)
    logged = np.isfinite(table).sum(axis=0)
    total = np.where(np.isfinite(table), table, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / logged
        spread = np.where(np.isfinite(table), (table - mean) ** 2, 0.0).sum(axis=0) / (logged - 1)
    return steps, mean, np.sqrt(np.where(logged > 1, spread, 0.0))


def _band(axes: plt.Axes, steps: np.ndarray, mean: np.ndarray, std: np.ndarray, label: str, color) -> None:
    axes.plot(steps, mean, color=color, label=label, linewidth=1.5)
    with np.errstate(invalid="ignore"):
        low = mean - std
    if axes.get_yscale() == "log":
        # A band that reaches zero would break a log axis: clip it at a tenth of the mean.
        low = np.maximum(low, mean / 10)
    axes.fill_between(steps, low, mean + std, color=color, alpha=0.2, linewidth=0)
