"""PNG figures of the study: curves with mean ± std bands, lr sensitivity, effective step sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rmsprop.compare.claims import mean_curve, mean_step_size_curve  # noqa: E402
from rmsprop.compare.optimizers import OPTIMIZERS  # noqa: E402

__all__ = ["plot_step_sizes", "plot_task", "write_plots"]

COLORS = dict(zip((spec.name for spec in OPTIMIZERS), plt.get_cmap("tab10").colors))
DPI = 90


def write_plots(tasks: dict[str, Any], out_dir: Path) -> list[Path]:
    """One figure per task (``<task>.png``); the step-size task gets its step-size figure. Returns the paths."""
    paths = []
    for name, task in tasks.items():
        path = out_dir / f"{name}.png"
        figure = plot_step_sizes(task) if name == "step-size" else plot_task(task)
        figure.savefig(path, dpi=DPI)
        plt.close(figure)
        paths.append(path)
    return paths


def plot_task(task: dict[str, Any]) -> plt.Figure:
    """Left: the curve metric over training (mean ± std over seeds). Right: the final figure against lr (seed 0)."""
    figure, (curves, lrs) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2), layout="constrained")
    if task["log_scale"]:
        curves.set_yscale("log")
        lrs.set_yscale("log")
    for name, optimizer in task["optimizers"].items():
        steps, mean, std = mean_curve(optimizer, task["curve_metric"])
        _band(curves, steps, mean, std, f"{name} (lr={optimizer['best_lr']:g})", COLORS[name])
        grid = [run["lr"] for run in optimizer["tuning"]]
        finals = [np.nan if run["diverged"] else run["final"][task["metric"]] for run in optimizer["tuning"]]
        lrs.plot(grid, finals, "o-", color=COLORS[name], label=name, markersize=4)
    for step in task["marked_steps"]:
        curves.axvline(step, color="gray", linestyle=":", linewidth=1)
    curves.set(xlabel="step", ylabel=task["curve_label"], title=f"{task['name']}: {task['curve_label']} (mean ± std)")
    lrs.set(xlabel="learning rate", ylabel=task["metric_label"], xscale="log", title="lr grid, seed 0 (diverged: gap)")
    curves.legend(fontsize=8)
    return figure


def plot_step_sizes(task: dict[str, Any]) -> plt.Figure:
    """Left: median effective step size lr/denominator over training. Right: the curve metric."""
    figure, (sizes, curves) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    sizes.set_yscale("log")
    for name, optimizer in task["optimizers"].items():
        label = f"{name} (lr={optimizer['best_lr']:g})"
        steps, mean, std = mean_step_size_curve(optimizer)
        _band(sizes, steps, mean, std, label, COLORS[name])
        steps, mean, std = mean_curve(optimizer, task["curve_metric"])
        _band(curves, steps, mean, std, label, COLORS[name])
    sizes.set(
        xlabel="step",
        ylabel="median effective step size",
        title="effective step size lr / denominator (median over parameters)",
    )
    curves.set(xlabel="step", ylabel=task["curve_label"], title=task["curve_label"])
    sizes.legend(fontsize=8)
    return figure


def _band(axes: plt.Axes, steps: np.ndarray, mean: np.ndarray, std: np.ndarray, label: str, color) -> None:
    axes.plot(steps, mean, color=color, label=label, linewidth=1.5)
    with np.errstate(invalid="ignore"):
        low = mean - std
    if axes.get_yscale() == "log":
        # A band that reaches zero would break a log axis: clip it at a tenth of the mean.
        low = np.maximum(low, mean / 10)
    axes.fill_between(steps, low, mean + std, color=color, alpha=0.2, linewidth=0)
