"""Training runs, learning-rate tuning and the whole study, spread over worker processes.

Protocol, per task and optimizer: train once per lr of the optimizer's grid
with seed 0 and keep the lr with the best final ``task.metric`` (validation
data where the task has any), growing the grid past an end where the best lr
sits; then train with that lr from seeds 1..N, which the tuning never saw.
Every run of a task gets the same number of steps. A task with
``tune_around`` searches the tuned lr of that task and its two neighbours.

Each (task, optimizer) study is a generator that yields the runs it needs
next and receives their results, so that the runs of all studies can be
spread over worker processes, longest first, while each study waits only for
its own.
"""

from __future__ import annotations

import heapq
import itertools
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from rmsprop import __version__
from rmsprop.tools.compare.optimizers import OptimizerSpec, next_lr, optimizer_spec
from rmsprop.tools.compare.tasks import Task, task_by_name
from rmsprop.core.diagnostics import effective_step_sizes, has_step_sizes

__all__ = ["MAX_GRID_EXTENSIONS", "TUNING_SEED", "RunRequest", "best_lr", "run_study", "train"]

TUNING_SEED = 0
MAX_GRID_EXTENSIONS = 2
Run = dict[str, Any]


def train(task: Task, spec: OptimizerSpec, lr: float, seed: int, *, quick: bool = False) -> Run:
    """Train ``task``'s problem with ``spec`` at ``lr`` from ``seed``; the run's curves and final figures.

    A run *diverges* when the training loss or a final figure is not finite,
    or when the curve metric ends worse than it started (or, where the task
    has a ``failure_level``, when the final metric is no better than it);
    training stops at the first non-finite loss.
    """
    budget = task.budget_for(quick)
    started, cpu_started = time.perf_counter(), time.process_time()
    problem = task.make_problem(seed, budget)
    parameters = list(problem.model.parameters())
    optimizer = spec.build(parameters, lr)
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

    log(0)
    finite = True
    for step in range(1, budget.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.training_loss(step)
        if not torch.isfinite(loss):
            finite = False
            break
        loss.backward()
        if problem.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, problem.max_grad_norm)
        optimizer.step()
        window_losses.append(loss.item())
        if step % budget.log_every == 0 or step == budget.steps:
            log(step)
    with torch.no_grad():
        final = problem.final_metrics()
    curve = curves[task.curve_metric]
    if task.failure_level is not None:
        value = final[task.metric]
        ended_worse = value <= task.failure_level if task.higher_is_better else value >= task.failure_level
    else:
        ended_worse = curve[-1] < curve[0] if task.higher_is_better else curve[-1] > curve[0]
    diverged = (
        not finite
        or not all(math.isfinite(value) for value in final.values())
        or not math.isfinite(curve[-1])
        or ended_worse
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
        "cpu_seconds": time.process_time() - cpu_started,
    }


def _score(run: Run, metric: str, higher_is_better: bool) -> float:
    """The tuning score, lower is better: the final metric (negated if higher is better), +inf if diverged."""
    value = run["final"][metric]
    if run["diverged"] or value is None or not math.isfinite(value):
        return math.inf
    return -value if higher_is_better else value


def best_lr(runs: list[Run], metric: str, higher_is_better: bool = False) -> float:
    """The lr of the run with the best final ``metric``; the smallest lr if all diverged."""
    return min(runs, key=lambda run: (_score(run, metric, higher_is_better), run["lr"]))["lr"]


@dataclass(frozen=True)
class RunRequest:
    """One training run a study needs; ``extra`` marks a run past the planned grid."""

    task: str
    optimizer: str
    lr: float
    seed: int
    extra: bool = False

    def key(self, quick: bool) -> tuple:
        """Runs with equal keys are equal: the same problem, budget, optimizer, lr and seed."""
        task = task_by_name(self.task)
        return (task.problem, task.budget_for(quick), self.optimizer, self.lr, self.seed)

    def cost(self, quick: bool) -> float:
        task = task_by_name(self.task)
        return task.step_cost_ms * task.budget_for(quick).steps


def _train_request(request: RunRequest, quick: bool) -> Run:
    """A worker's job: the run that ``request`` names."""
    return train(task_by_name(request.task), optimizer_spec(request.optimizer), request.lr, request.seed, quick=quick)


def _one_thread() -> None:
    # The models are small: on a shared machine more threads make them slower, not faster.
    torch.set_num_threads(1)


Study = Generator[list[RunRequest], list[Run], Any]


def _lr_grid(task: Task, spec: OptimizerSpec, quick: bool) -> Study:
    """The lr grid to search first, and the lr it centres on (None unless ``task.tune_around``)."""
    if task.tune_around is None:
        return list(spec.quick_grid if quick else spec.lr_grid), None
    around = task_by_name(task.tune_around)
    _, tuning, _ = yield from _tune(around, spec, quick)
    centre = best_lr(tuning, around.metric, around.higher_is_better)
    return [next_lr(centre, up=False), centre, next_lr(centre)], centre


def _tune(task: Task, spec: OptimizerSpec, quick: bool) -> Study:
    """The lr grid as searched, its seed-0 runs in lr order, and the lr the grid centred on.

    Outside quick mode, while the best lr is at an end of the grid the grid
    grows by one point past that end, at most :data:`MAX_GRID_EXTENSIONS` times.
    """
    grid, centre = yield from _lr_grid(task, spec, quick)
    tuning = yield [RunRequest(task.name, spec.name, lr, TUNING_SEED) for lr in grid]
    for _ in range(0 if quick else MAX_GRID_EXTENSIONS):
        lr = best_lr(tuning, task.metric, task.higher_is_better)
        if lr not in (grid[0], grid[-1]):
            break
        up = lr == grid[-1]
        new_lr = next_lr(lr, up=up)
        [run] = yield [RunRequest(task.name, spec.name, new_lr, TUNING_SEED, extra=True)]
        if up:
            grid.append(new_lr)
            tuning.append(run)
        else:
            grid.insert(0, new_lr)
            tuning.insert(0, run)
    return grid, tuning, centre


def _study(task: Task, spec: OptimizerSpec, quick: bool, seeds: int) -> Study:
    """Tune ``spec`` on ``task``, then run it from the final seeds; the optimizer's results."""
    grid, tuning, centre = yield from _tune(task, spec, quick)
    lr = best_lr(tuning, task.metric, task.higher_is_better)
    runs = yield [RunRequest(task.name, spec.name, lr, seed) for seed in _final_seeds(seeds)]
    return {
        "label": spec.label,
        "lr_grid": list(grid),
        "grid_centre": centre,
        "best_lr": lr,
        "best_lr_at_grid_edge": lr in (grid[0], grid[-1]),
        "tuning": tuning,
        "runs": runs,
    }


def _final_seeds(seeds: int) -> list[int]:
    return list(range(TUNING_SEED + 1, TUNING_SEED + 1 + seeds))


def _planned_runs(task: Task, spec: OptimizerSpec, quick: bool, seeds: int, studies: set[tuple[str, str]]) -> int:
    """The runs a study needs without grid extensions; a centring task's grid counts unless it is among ``studies``."""
    full_grid = len(spec.quick_grid if quick else spec.lr_grid)
    if task.tune_around is None:
        return full_grid + seeds
    shared = (task.tune_around, spec.name) in studies
    return 3 + seeds + (0 if shared else full_grid)


class _Scheduler:
    """Drives the studies: runs what they request, longest first, on ``workers`` processes (1: in this one)."""

    def __init__(self, quick: bool, workers: int, bar: tqdm) -> None:
        self.quick, self.workers, self.bar = quick, workers, bar
        self.results: dict[tuple, Run] = {}
        self.queue: list[tuple[float, int, tuple, RunRequest]] = []
        self.queued: set[tuple] = set()
        self.order = itertools.count()
        self.waiting: dict[Any, list[RunRequest]] = {}
        self.studies: dict[Any, Study] = {}
        self.finished: dict[Any, Any] = {}
        self.cpu_seconds = 0.0

    def run(self, studies: dict[Any, Study]) -> dict[Any, Any]:
        self.studies = studies
        for study_id in studies:
            self._advance(study_id, None)
        self._advance_ready()
        if self.workers == 1:
            while self.queue:
                key, request = self._pop()
                self._record(key, _train_request(request, self.quick))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_one_thread) as pool:
                in_flight: dict[Future, tuple] = {}
                while self.queue or in_flight:
                    while self.queue and len(in_flight) < self.workers:
                        key, request = self._pop()
                        in_flight[pool.submit(_train_request, request, self.quick)] = key
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        self._record(in_flight.pop(future), future.result())
        return self.finished

    def _pop(self) -> tuple[tuple, RunRequest]:
        _, _, key, request = heapq.heappop(self.queue)
        self.bar.set_description(f"{request.task} {request.optimizer} lr={request.lr:g} seed={request.seed}")
        return key, request

    def _record(self, key: tuple, run: Run) -> None:
        self.results[key] = run
        self.cpu_seconds += run["cpu_seconds"]
        self.bar.update()
        self._advance_ready()

    def _advance(self, study_id: Any, results: list[Run] | None) -> None:
        try:
            requests = self.studies[study_id].send(results)
        except StopIteration as stop:
            self.waiting.pop(study_id, None)
            self.finished[study_id] = stop.value
            return
        self.waiting[study_id] = requests
        for request in requests:
            key = request.key(self.quick)
            if key in self.results or key in self.queued:
                continue
            self.queued.add(key)
            if request.extra:
                self.bar.total += 1
                self.bar.refresh()
            heapq.heappush(self.queue, (-request.cost(self.quick), next(self.order), key, request))

    def _advance_ready(self) -> None:
        """Hand every study whose requested runs are all done their results, until none is ready."""
        ready = True
        while ready:
            ready = False
            for study_id, requests in list(self.waiting.items()):
                keys = [request.key(self.quick) for request in requests]
                if all(key in self.results for key in keys):
                    self._advance(study_id, [self.results[key] for key in keys])
                    ready = True


def run_study(
    task_names: Iterable[str],
    *,
    quick: bool = False,
    seeds: int | None = None,
    workers: int | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Tune and run every optimizer of every task; the results as a JSON-ready dict.

    ``seeds`` overrides each task's number of final seeds (default: the
    task's, 1 with ``quick``). ``workers`` is the number of worker processes
    (default: one per CPU core; 1 runs everything in this process).
    ``show_progress=None`` shows a progress bar only when stderr is a terminal.
    Every run uses one CPU thread.
    """
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ValueError(f"Invalid seeds: {seeds!r} (seeds must be a positive integer or None)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"Invalid workers: {workers!r} (workers must be a positive integer or None)")
    tasks = [task_by_name(name) for name in dict.fromkeys(task_names)]
    if not tasks:
        raise ValueError("Invalid task_names: empty (give at least one task)")
    workers = workers if workers is not None else os.cpu_count() or 1
    task_seeds = {task.name: seeds if seeds is not None else 1 if quick else task.seeds for task in tasks}
    studies = {
        (task.name, name): _study(task, optimizer_spec(name), quick, task_seeds[task.name])
        for task in tasks
        for name in task.optimizers
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()
    bar = tqdm(
        total=sum(_planned_runs(task_by_name(task), optimizer_spec(name), quick, task_seeds[task], set(studies))
                  for task, name in studies),
        unit="run",
        disable=not sys.stderr.isatty() if show_progress is None else not show_progress,
    )
    scheduler = _Scheduler(quick, workers, bar)
    try:
        finished = scheduler.run(studies)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    task_results = {
        task.name: _task_result(task, quick, {name: finished[(task.name, name)] for name in task.optimizers})
        for task in tasks
    }
    return {
        "meta": {
            "rmsprop_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "quick": quick,
            "seeds": task_seeds,
            "tuning_seed": TUNING_SEED,
            "wall_seconds": time.perf_counter() - started,
            "run_cpu_seconds": scheduler.cpu_seconds,
            "main_cpu_seconds": time.process_time() - cpu_started,
            "runs": len(scheduler.results),
            "workers": workers,
            "cpu_count": os.cpu_count(),
            "cpu": _cpu_name(),
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
            "torch_threads": 1,
        },
        "tasks": task_results,
    }


def _cpu_name() -> str:
    """The CPU model as the OS names it (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _task_result(task: Task, quick: bool, optimizers: dict[str, Any]) -> dict[str, Any]:
    budget = task.budget_for(quick)
    return {
        "name": task.name,
        "title": task.title,
        "description": task.description,
        "metric": task.metric,
        "metric_label": task.metric_label,
        "curve_metric": task.curve_metric,
        "curve_label": task.curve_label,
        "higher_is_better": task.higher_is_better,
        "log_scale": task.log_scale,
        "tune_around": task.tune_around,
        "env_steps_per_step": task.env_steps_per_step,
        "extra_curve": task.extra_curve,
        "steps": budget.steps,
        "log_every": budget.log_every,
        "marked_steps": list(task.marked_steps(budget)),
        "optimizers": optimizers,
    }
