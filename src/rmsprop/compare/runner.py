"""Training runs, learning-rate tuning and the whole study.

Protocol, per task and optimizer: train once per lr of the optimizer's grid
with seed 0 and keep the lr with the best final ``task.metric`` (validation
data where the task has any), growing the grid past an end where the best lr
sits; then train with that lr from seeds 1..N, which the tuning never saw.
Every run of a task gets the same number of steps.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from tqdm import tqdm

from rmsprop import __version__
from rmsprop.compare.optimizers import OptimizerSpec, next_lr, optimizer_spec
from rmsprop.compare.tasks import Task, task_by_name
from rmsprop.diagnostics import effective_step_sizes, has_step_sizes

__all__ = ["MAX_GRID_EXTENSIONS", "TUNING_SEED", "best_lr", "run_study", "train"]

TUNING_SEED = 0
MAX_GRID_EXTENSIONS = 2
Run = dict[str, Any]


def train(task: Task, spec: OptimizerSpec, lr: float, seed: int, *, quick: bool = False) -> Run:
    """Train ``task``'s problem with ``spec`` at ``lr`` from ``seed``; the run's curves and final figures.

    A run *diverges* when the training loss or a final figure is not finite,
    or when the curve metric ends worse than it started; training stops at
    the first non-finite loss.
    """
    budget = task.budget_for(quick)
    problem = task.make_problem(seed, budget)
    optimizer = spec.build(problem.model.parameters(), lr)
    curves: dict[str, list[float | None]] = {"step": [], "train_loss": []}
    step_size: dict[str, list[float]] | None = (
        {"step": [], "min": [], "median": [], "max": []} if has_step_sizes(optimizer) else None
    )
    window_losses: list[float] = []

    def log(step: int) -> None:
        with torch.no_grad():
            figures = problem.evaluate()
        curves["step"].append(step)
        curves["train_loss"].append(sum(window_losses) / len(window_losses) if window_losses else None)
        for key, value in figures.items():
            curves.setdefault(key, []).append(value)
        window_losses.clear()
        if step_size is not None and step > 0:
            summary = effective_step_sizes(optimizer)[0]
            step_size["step"].append(step)
            for key in ("min", "median", "max"):
                step_size[key].append(getattr(summary, key))

    started = time.perf_counter()
    log(0)
    finite = True
    for step in range(1, budget.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.training_loss(step)
        if not torch.isfinite(loss):
            finite = False
            break
        loss.backward()
        optimizer.step()
        window_losses.append(loss.item())
        if step % budget.log_every == 0 or step == budget.steps:
            log(step)
    with torch.no_grad():
        final = problem.final_metrics()
    curve = curves[task.curve_metric]
    diverged = (
        not finite
        or not all(math.isfinite(value) for value in final.values())
        or not math.isfinite(curve[-1])
        or curve[-1] > curve[0]
    )
    return {
        "optimizer": spec.name,
        "lr": lr,
        "seed": seed,
        "curves": curves,
        "step_size": step_size,
        "final": final,
        "diverged": diverged,
        "seconds": time.perf_counter() - started,
    }


def _score(run: Run, metric: str) -> float:
    """The tuning score: the final metric, +inf for a diverged run."""
    value = run["final"][metric]
    return math.inf if run["diverged"] or not math.isfinite(value) else value


def best_lr(runs: list[Run], metric: str) -> float:
    """The lr of the run with the lowest score; the smallest lr if all diverged."""
    return min(runs, key=lambda run: (_score(run, metric), run["lr"]))["lr"]


def run_study(
    task_names: Iterable[str], *, quick: bool = False, seeds: int = 3, show_progress: bool | None = None
) -> dict[str, Any]:
    """Tune and run every optimizer of every task; the results as a JSON-ready dict.

    ``show_progress=None`` shows a progress bar only when stderr is a terminal.
    Runs use one CPU thread: the models are small, and on a shared machine
    more threads make them slower, not faster.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"Invalid seeds: {seeds!r} (seeds must be a positive integer)")
    tasks = [task_by_name(name) for name in dict.fromkeys(task_names)]
    if not tasks:
        raise ValueError("Invalid task_names: empty (give at least one task)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()
    bar = tqdm(
        total=sum(_run_count(task, quick, seeds) for task in tasks),
        unit="run",
        disable=not sys.stderr.isatty() if show_progress is None else not show_progress,
    )
    cache: dict[tuple, Run] = {}

    def cached_train(task: Task, spec: OptimizerSpec, lr: float, seed: int, extra: bool = False) -> Run:
        if extra:  # a run past the planned grid
            bar.total += 1
        key = (task.problem, task.budget_for(quick), spec.name, lr, seed)
        if key not in cache:
            bar.set_description(f"{task.name} {spec.name} lr={lr:g} seed={seed}")
            cache[key] = train(task, spec, lr, seed, quick=quick)
        bar.update()
        return cache[key]

    try:
        task_results = {task.name: _run_task(task, quick, seeds, cached_train) for task in tasks}
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return {
        "meta": {
            "rmsprop_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "quick": quick,
            "seeds": seeds,
            "tuning_seed": TUNING_SEED,
            "final_seeds": list(range(TUNING_SEED + 1, TUNING_SEED + 1 + seeds)),
            "wall_seconds": time.perf_counter() - started,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
            "torch_threads": 1,
        },
        "tasks": task_results,
    }


def _run_count(task: Task, quick: bool, seeds: int) -> int:
    return sum(len(_lr_grid(optimizer_spec(name), quick)) + seeds for name in task.optimizers)


def _lr_grid(spec: OptimizerSpec, quick: bool) -> tuple[float, ...]:
    return spec.quick_grid if quick else spec.lr_grid


def _tune(task: Task, spec: OptimizerSpec, quick: bool, train_fn) -> tuple[list[float], list[Run]]:
    """The lr grid as searched and its seed-0 runs, in lr order.

    Outside quick mode, while the best lr is at an end of the grid the grid
    grows by one point past that end, at most :data:`MAX_GRID_EXTENSIONS` times.
    """
    grid = list(_lr_grid(spec, quick))
    tuning = [train_fn(task, spec, lr, TUNING_SEED) for lr in grid]
    for _ in range(0 if quick else MAX_GRID_EXTENSIONS):
        lr = best_lr(tuning, task.metric)
        if lr == grid[-1]:
            grid.append(next_lr(lr, up=True))
            tuning.append(train_fn(task, spec, grid[-1], TUNING_SEED, extra=True))
        elif lr == grid[0]:
            grid.insert(0, next_lr(lr, up=False))
            tuning.insert(0, train_fn(task, spec, grid[0], TUNING_SEED, extra=True))
        else:
            break
    return grid, tuning


def _run_task(task: Task, quick: bool, seeds: int, train_fn) -> dict[str, Any]:
    optimizers = {}
    for name in task.optimizers:
        spec = optimizer_spec(name)
        grid, tuning = _tune(task, spec, quick, train_fn)
        lr = best_lr(tuning, task.metric)
        runs = [train_fn(task, spec, lr, seed) for seed in range(TUNING_SEED + 1, TUNING_SEED + 1 + seeds)]
        optimizers[name] = {
            "label": spec.label,
            "lr_grid": list(grid),
            "best_lr": lr,
            "best_lr_at_grid_edge": lr in (grid[0], grid[-1]),
            "tuning": tuning,
            "runs": runs,
        }
    budget = task.budget_for(quick)
    return {
        "name": task.name,
        "title": task.title,
        "description": task.description,
        "metric": task.metric,
        "metric_label": task.metric_label,
        "curve_metric": task.curve_metric,
        "curve_label": task.curve_label,
        "log_scale": task.log_scale,
        "claims": list(task.claims),
        "steps": budget.steps,
        "log_every": budget.log_every,
        "marked_steps": list(task.marked_steps(budget)),
        "optimizers": optimizers,
    }
