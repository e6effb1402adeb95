"""The six claims about RMSProp and the rules that turn the study's numbers into verdicts.

:data:`GENERAL_RULE` says how a claim's checks become its verdict, :data:`RULES`
what each claim checks, :data:`CAVEATS` why a verdict could still be wrong;
the thresholds are the module's constants. A claim whose tasks were not run
is *not tested*. Figures are compared *oriented*: lower is better, so a
higher-is-better figure (an episode return) enters negated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmsprop.tools.compare.optimizers import RMSPROP_VARIANTS

__all__ = [
    "CAVEATS",
    "CLAIMS",
    "CLAIM_TASKS",
    "GENERAL_RULE",
    "RULES",
    "Stat",
    "beats",
    "evaluate_claims",
    "final_stat",
    "lr_sensitivity",
    "mean_curve",
    "mean_step_size_curve",
    "oriented_values",
    "phase_summary",
    "steps_to_target",
]

CLAIMS = {
    1: "Adagrad's summed squares make its step size shrink monotonically towards zero; RMSProp's moving "
    "average does not, so RMSProp keeps learning late in training.",
    2: "RMSProp handles non-stationary targets well (the objective changes over time).",
    3: "RMSProp is a good choice for RNN/LSTM training.",
    4: "RMSProp is more stable than Adagrad and converges better.",
    5: "In some tasks RMSProp converges more slowly than Adam.",
    6: "RMSProp still requires manual selection of the initial learning rate.",
}

GENERAL_RULE = (
    "Each claim is checked for each RMSProp variant (`pytorch` and `hinton` presets, centered with momentum) on "
    "each task that bears on it. A claim is **supported** when every check holds, **not supported** when none "
    "does, and **mixed** otherwise. On a task every optimizer trains for the same number of steps, and its lr "
    "is tuned the same way: one seed-0 run per point of a log grid (factors of about 3), the grid grown past an "
    "end where the best lr sits, scored on validation data where the task has any. Comparisons use the final "
    "runs at each optimizer's tuned lr, from seeds the tuning never saw. Runs with the same seed share initial weights and data, so "
    "comparisons are paired: \"A beats B\" means the mean over seeds of B - A (figures oriented so that lower "
    "is better) is positive and more than twice its standard error, 2·sd(B - A)/sqrt(n) (with one seed, any "
    "lower value beats). A diverged run (non-finite loss, or a curve that ends worse than it started; on "
    "cartpole-a2c, a late evaluation return of 15 or less: the policy collapsed) counts as the worst possible "
    "figure: it never beats, and any finite set of runs beats it. *Not supported* means that no check held: these numbers do not show the claim, which is not the same as showing its opposite."
)

# Thresholds of the rules, named so that the report can state them.
SHRINK_RATIO = 0.9  # late-phase / middle-phase mean step size below this: the step size is shrinking
PHASES = ("early", "middle", "late")  # equal thirds of the run
DRIFT_TOLERANCE = 1.10  # "handles well": figure within 10% of the best optimizer's
LSTM_TOLERANCE = 1.02  # "good choice": validation bits/char within 2% of the best optimizer's
SOLVED_MSE = 0.01  # the adding problem is solved below this validation MSE (predicting the mean: 0.167)
TARGET_FRACTION = 0.9  # convergence time: steps to 90% of the way from the start to the best value
SLOWER_FACTOR = 1.2  # "slower": more than 1.2 times Adam's steps to the target (or never there)
SENSITIVITY_MARGIN = 0.1  # a "good" lr makes at least 90% of the best lr's progress

RULES = {
    1: f"On char-lstm-long (a 32-unit character LSTM, 8000 steps, lr re-tuned at that budget), the run is cut into three equal phases. "
    f"From the seed-mean of the median effective step size lr/denominator: Adagrad's is non-increasing at every "
    f"log point and its late-phase mean is below {SHRINK_RATIO} times its middle-phase mean; the RMSProp "
    f"variant's late/middle ratio is at least {SHRINK_RATIO}; and the variant's learning progress in the late "
    "phase (validation bits/char at its start minus at its end, each the mean of the log points in the twelfth "
    "of the run up to it) beats Adagrad's, paired by seed.",
    2: f"On drift and on cartpole-a2c, the variant's figure (mean tracking error; late evaluation return) beats "
    f"Adagrad's and is within {round((DRIFT_TOLERANCE - 1) * 100)}% of the best optimizer's.",
    3: f"On char-lstm, the variant's mean validation bits/char is within {round((LSTM_TOLERANCE - 1) * 100)}% "
    f"of the best optimizer's; on adding, its mean validation MSE is below {SOLVED_MSE} (it solves the task; "
    "predicting the mean scores 0.167).",
    4: "On each of seed-mlp, digits, digits-cnn, char-lstm, adding, drift and cartpole-a2c: the variant beats "
    "Adagrad on the task's figure, no more of its lr-grid runs diverge than Adagrad's, and none of its final "
    "runs diverge.",
    5: f"For each variant, on at least one of seed-mlp, digits, digits-cnn, char-lstm, adding and cartpole-a2c: "
    f"it needs more than {SLOWER_FACTOR} times Adam's steps to bring the seed-mean curve "
    f"{round(TARGET_FRACTION * 100)}% of the way from its start to the better of the two optimizers' best values "
    "(or never gets there while Adam does).",
    6: f"An lr of the grid is *good* on a task when its seed-0 run makes at least "
    f"{round((1 - SENSITIVITY_MARGIN) * 100)}% of the progress of the task's best lr for that optimizer (progress: "
    "the figure of the untrained model minus the run's final figure, in log10 on the tasks plotted on a log "
    "scale). The claim holds for a variant when no lr is good on every task of seed-mlp, digits, digits-cnn, "
    "char-lstm, adding, drift and cartpole-a2c: its lr has to be chosen per task.",
}

SENSITIVITY_TASKS = ("seed-mlp", "digits", "digits-cnn", "char-lstm", "adding", "drift", "cartpole-a2c")
CLAIM_TASKS = {
    1: ("char-lstm-long",),
    2: ("drift", "cartpole-a2c"),
    3: ("char-lstm", "adding"),
    4: SENSITIVITY_TASKS,
    5: ("seed-mlp", "digits", "digits-cnn", "char-lstm", "adding", "cartpole-a2c"),
    6: SENSITIVITY_TASKS,
}

CAVEATS = {
    1: [
        "8000 steps of a 32-unit LSTM (about 10 passes over 420K characters) bring it near its plateau, but it is "
        "a small model: Adagrad's 1/sqrt(t) decay costs more the longer the run, and a larger model trained "
        "longer may keep more to learn late.",
        "An optimizer that has already come close to its plateau has little progress left to make: the late-phase "
        "comparison favours the one that learns more slowly early on. The phase table shows both.",
        "The lr was re-tuned at 8000 steps on one seed over 3 grid points (more where the best sat at an end).",
    ],
    2: [
        "Two non-stationary tasks: a linear model tracking a random walk with jumps, and A2C on CartPole. Neither is "
        "large, and RL returns are noisy between seeds: five seeds detect only large differences.",
        "A2C clips the gradient norm to 0.5, which blunts differences between optimizers' step sizes.",
    ],
    3: [
        "Small LSTMs (64 and 32 units) on CPU budgets: 1000 steps on char-lstm, 3000 on adding. The adding problem "
        "is solved abruptly, so a budget a little shorter or longer can change which optimizers solve it.",
    ],
    4: [
        "Stability is counted as divergence on the lr grid; no run uses an lr schedule, warm-up or weight decay.",
        "Three seeds on the costly tasks detect only differences large against the seed-to-seed spread.",
    ],
    5: [
        "Convergence time is read from curves logged every 25-100 steps, so differences under one log interval "
        "do not show.",
    ],
    6: [
        "Widths are measured on seed 0 alone, on a grid with factors of about 3; a range that reaches the end of "
        "the searched grid is a lower bound (marked >=). An lr a task's grid did not include counts as not good.",
        "The margin is a choice: a stricter one narrows every range. And it is relative to each optimizer's own "
        "best lr: an optimizer that learns little at every lr (one that never solves adding) looks insensitive.",
        "The rule asks whether RMSProp needs its lr chosen per task, not whether it needs that more than the "
        "others: the lines for Adam, Adagrad and SGD above give their widths and their most widely good lr.",
    ],
}


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation and count of a figure over seeds (mean ±inf if any diverged)."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return "diverged" if math.isinf(self.mean) else f"{self.mean:.4g} ± {self.std:.2g}"


def _stat(values: list[float]) -> Stat:
    if not values or not all(math.isfinite(v) for v in values):
        return Stat(math.inf, 0.0, len(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return Stat(float(np.mean(values)), std, len(values))


def _sign(task: dict[str, Any]) -> float:
    return -1.0 if task["higher_is_better"] else 1.0


def final_stat(optimizer: dict[str, Any], key: str) -> Stat:
    """The figure ``key`` over an optimizer's final runs (as measured); a diverged run makes it ``diverged``."""
    values = []
    for run in optimizer["runs"]:
        value = run["final"].get(key)
        values.append(math.inf if value is None or run["diverged"] else float(value))
    return _stat(values)


def oriented_values(task: dict[str, Any], optimizer: dict[str, Any]) -> list[float]:
    """The task's figure of each final run in seed order, lower is better; +inf for a diverged run."""
    sign = _sign(task)
    values = []
    for run in optimizer["runs"]:
        value = run["final"].get(task["metric"])
        values.append(math.inf if value is None or run["diverged"] else sign * float(value))
    return values


def beats(a: list[float], b: list[float]) -> bool:
    """Whether ``a`` is lower than ``b``, paired by seed, by more than twice the standard error of the mean difference."""
    if len(a) != len(b):
        raise ValueError(f"Invalid runs: {len(a)} and {len(b)} values (paired comparisons need one per seed each)")
    if not all(math.isfinite(v) for v in a):
        return False
    if not all(math.isfinite(v) for v in b):
        return True
    differences = np.asarray(b) - np.asarray(a)
    if len(differences) == 1:
        return bool(differences[0] > 0)
    standard_error = differences.std(ddof=1) / math.sqrt(len(differences))
    return bool(differences.mean() > 2 * standard_error)


def mean_curve(optimizer: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and standard deviation over the final runs of the logged figure ``key``.

    A run that stopped early, or a log point without the figure, makes the mean NaN there.
    """
    return _mean_over_runs([run["curves"] for run in optimizer["runs"]], key)


def mean_step_size_curve(optimizer: dict[str, Any], key: str = "median") -> tuple[np.ndarray, ...]:
    """Steps, mean and standard deviation over the final runs of the effective step size ``key``."""
    return _mean_over_runs([run["step_size"] for run in optimizer["runs"]], key)


def _run_table(records: list[dict[str, list]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps, and one row per record of the figure ``key`` (NaN where missing)."""
    steps = max((record["step"] for record in records), key=len)
    table = np.full((len(records), len(steps)), np.nan)
    for row, record in enumerate(records):
        values = [np.nan if v is None else v for v in record[key]]
        table[row, : len(values)] = values
    return np.asarray(steps, dtype=float), table


def _mean_over_runs(records: list[dict[str, list]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps, table = _run_table(records, key)
    if len(records) == 1:
        return steps, table[0], np.zeros(len(steps))
    with np.errstate(invalid="ignore"):
        return steps, table.mean(axis=0), table.std(axis=0, ddof=1)


def steps_to_target(steps: np.ndarray, curve: np.ndarray, target: float) -> float:
    """The first logged step at which ``curve`` is at or below ``target``; +inf if never."""
    reached = np.nonzero(curve <= target)[0]
    return float(steps[reached[0]]) if len(reached) else math.inf


def _verdict(checks: list[bool]) -> str:
    if all(checks):
        return "supported"
    return "not supported" if not any(checks) else "mixed"


def _variants(task: dict[str, Any]) -> list[str]:
    return [name for name in RMSPROP_VARIANTS if name in task["optimizers"]]


def _ratio_to_best(task: dict[str, Any], value: float, best: float) -> float:
    """How many times worse than ``best`` ``value`` is (1: as good), for raw figures of ``task``."""
    if math.isinf(value):
        return math.inf
    return value / best if not task["higher_is_better"] else best / value if value > 0 else math.inf


def _best(task: dict[str, Any]) -> tuple[str, dict[str, Stat]]:
    stats = {name: final_stat(opt, task["metric"]) for name, opt in task["optimizers"].items()}
    sign = _sign(task)
    best = min(stats, key=lambda name: math.inf if math.isinf(stats[name].mean) else sign * stats[name].mean)
    return best, stats


# --- claim 1: the long run ---------------------------------------------------------------


def phase_summary(task: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, Any]:
    """Per phase (equal thirds of the run) and per seed: mean median step size and learning progress.

    The figure at a phase boundary is the mean of the logged curve over the
    log points in the twelfth of the run up to it (at least one log interval;
    at step 0, the first log point); progress is the start figure minus the end figure, oriented so that
    positive is better.
    """
    steps = task["steps"]
    bounds = [round(steps * k / len(PHASES)) for k in range(len(PHASES) + 1)]
    window = max(steps / 12, task["log_every"])
    curve_steps, curves = _run_table([run["curves"] for run in optimizer["runs"]], task["curve_metric"])
    size_steps, sizes = _run_table([run["step_size"] for run in optimizer["runs"]], "median")
    sign = _sign(task)

    def figure_at(bound: int) -> np.ndarray:
        if bound == 0:
            return curves[:, 0]
        near = (curve_steps > bound - window) & (curve_steps <= bound)
        return curves[:, near].mean(axis=1)

    figures = [figure_at(bound) for bound in bounds]
    summary: dict[str, Any] = {"bounds": bounds}
    for index, phase in enumerate(PHASES):
        inside = (size_steps > bounds[index]) & (size_steps <= bounds[index + 1])
        summary[phase] = {
            "step_size": sizes[:, inside].mean(axis=1).tolist(),
            "progress": (sign * (figures[index] - figures[index + 1])).tolist(),
        }
    return summary


def _claim_1(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    task = tasks["char-lstm-long"]
    optimizers = task["optimizers"]
    summaries = {name: phase_summary(task, opt) for name, opt in optimizers.items()}

    def ratio(name: str) -> float:
        return float(np.mean(summaries[name]["late"]["step_size"]) / np.mean(summaries[name]["middle"]["step_size"]))

    _, adagrad_sizes, _ = mean_step_size_curve(optimizers["adagrad"])
    non_increasing = bool(np.all(np.diff(adagrad_sizes) <= 1e-6 * np.abs(adagrad_sizes[:-1])))
    adagrad_ratio = ratio("adagrad")
    adagrad_shrinks = non_increasing and adagrad_ratio < SHRINK_RATIO
    adagrad_late = summaries["adagrad"]["late"]["progress"]
    lines = [
        f"adagrad (lr {optimizers['adagrad']['best_lr']:g}): step size late/middle {adagrad_ratio:.2f} "
        f"({'non-increasing' if non_increasing else 'not monotone'}); late-phase progress "
        f"{np.mean(adagrad_late):.3f} bits/char"
    ]
    for name, summary in summaries.items():
        total = sum(np.mean(summary[phase]["progress"]) for phase in PHASES)
        lines.append(
            f"{name}: {np.mean(summary['late']['progress']) / total:.1%} of its progress over the run came in the "
            "late phase"
            if total > 0
            else f"{name}: no progress over the run"
        )
    checks = []
    for name in _variants(task):
        late = summaries[name]["late"]["progress"]
        more = beats([-v for v in late], [-v for v in adagrad_late])
        holds = adagrad_shrinks and ratio(name) >= SHRINK_RATIO and more
        checks.append(holds)
        lines.append(
            f"{name} (lr {optimizers[name]['best_lr']:g}): step size late/middle {ratio(name):.2f}; late-phase "
            f"progress {np.mean(late):.3f} bits/char ({'beats' if more else 'does not beat'} Adagrad's): "
            f"{'holds' if holds else 'fails'}"
        )
    numbers = {
        "phases": summaries,
        "adagrad_non_increasing": non_increasing,
        "step_size_ratio": {name: ratio(name) for name in optimizers},
    }
    return checks, lines, numbers


# --- claims 2 to 5: the tuned runs ---------------------------------------------------------


def _within_best(
    tasks: dict[str, Any], task_names: tuple[str, ...], tolerance: float, against_adagrad: bool
) -> tuple[list[bool], list[str], dict[str, Any]]:
    """Checks that the variant is within ``tolerance`` times the best, and (optionally) beats Adagrad."""
    checks, lines, numbers = [], [], {}
    for task_name in task_names:
        if task_name not in tasks:
            continue
        task = tasks[task_name]
        best_name, stats = _best(task)
        versus_adagrad = "" if best_name == "adagrad" else f"; adagrad {stats['adagrad']}"
        lines.append(f"{task_name}: best {best_name} {stats[best_name]}{versus_adagrad}")
        adagrad = oriented_values(task, task["optimizers"]["adagrad"])
        for name in _variants(task):
            ratio = _ratio_to_best(task, stats[name].mean, stats[best_name].mean)
            close = ratio <= tolerance
            better = beats(oriented_values(task, task["optimizers"][name]), adagrad) if against_adagrad else True
            checks.append(close and better)
            versus = f"; {'beats' if better else 'does not beat'} Adagrad" if against_adagrad else ""
            lines.append(
                f"{task_name}, {name}: {stats[name]} ({ratio:.3g}x best{versus}): "
                f"{'holds' if close and better else 'fails'}"
            )
        numbers[task_name] = {name: vars(stat) for name, stat in stats.items()}
    return checks, lines, numbers


def _claim_2(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    return _within_best(tasks, CLAIM_TASKS[2], DRIFT_TOLERANCE, against_adagrad=True)


def _claim_3(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    checks, lines, numbers = _within_best(tasks, ("char-lstm",), LSTM_TOLERANCE, against_adagrad=False)
    if "adding" in tasks:
        task = tasks["adding"]
        best_name, stats = _best(task)
        solved = [name for name, stat in stats.items() if stat.mean < SOLVED_MSE]
        lines.append(f"adding: best {best_name} {stats[best_name]}; solved by {', '.join(solved) or 'none'}")
        for name in _variants(task):
            holds = stats[name].mean < SOLVED_MSE
            checks.append(holds)
            lines.append(f"adding, {name}: {stats[name]}: {'holds' if holds else 'fails'}")
        numbers["adding"] = {name: vars(stat) for name, stat in stats.items()}
    return checks, lines, numbers


def _claim_4(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    checks, lines, numbers = [], [], {}
    for task_name in CLAIM_TASKS[4]:
        if task_name not in tasks:
            continue
        task = tasks[task_name]
        adagrad = task["optimizers"]["adagrad"]
        adagrad_stat = final_stat(adagrad, task["metric"])
        adagrad_values = oriented_values(task, adagrad)
        adagrad_diverged = sum(run["diverged"] for run in adagrad["tuning"])
        for name in _variants(task):
            optimizer = task["optimizers"][name]
            stat = final_stat(optimizer, task["metric"])
            grid_diverged = sum(run["diverged"] for run in optimizer["tuning"])
            final_diverged = sum(run["diverged"] for run in optimizer["runs"])
            better = beats(oriented_values(task, optimizer), adagrad_values)
            stable = grid_diverged <= adagrad_diverged and final_diverged == 0
            checks.append(better and stable)
            numbers[f"{task_name}/{name}"] = {
                "variant": vars(stat),
                "adagrad": vars(adagrad_stat),
                "grid_diverged": grid_diverged,
                "adagrad_grid_diverged": adagrad_diverged,
                "final_diverged": final_diverged,
            }
            lines.append(
                f"{task_name}, {name}: {stat} vs Adagrad {adagrad_stat} "
                f"({'beats' if better else 'does not beat'}); diverged lr-grid runs {grid_diverged} vs "
                f"{adagrad_diverged}, final runs {final_diverged}: {'holds' if better and stable else 'fails'}"
            )
    return checks, lines, numbers


def _claim_5(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    slower_somewhere = {name: False for name in RMSPROP_VARIANTS}
    seen = set()
    lines, numbers = [], {}
    for task_name in CLAIM_TASKS[5]:
        if task_name not in tasks:
            continue
        task = tasks[task_name]
        sign = _sign(task)
        steps, adam_curve, _ = mean_curve(task["optimizers"]["adam"], task["curve_metric"])
        adam_curve = sign * adam_curve
        for name in _variants(task):
            seen.add(name)
            variant_steps, curve, _ = mean_curve(task["optimizers"][name], task["curve_metric"])
            curve = sign * curve
            start = adam_curve[0]
            best = float(np.nanmin(np.concatenate([adam_curve, curve])))
            target = start + TARGET_FRACTION * (best - start)
            adam_time = steps_to_target(steps, adam_curve, target)
            variant_time = steps_to_target(variant_steps, curve, target)
            slower = variant_time > SLOWER_FACTOR * adam_time
            slower_somewhere[name] |= slower
            numbers[f"{task_name}/{name}"] = {"target": sign * target, "steps": variant_time, "adam_steps": adam_time}
            lines.append(
                f"{task_name}, {name}: steps to {sign * target:.4g}: {_steps(variant_time)} vs Adam "
                f"{_steps(adam_time)}{' (slower)' if slower else ''}"
            )
    checks = [slower_somewhere[name] for name in RMSPROP_VARIANTS if name in seen]
    return checks, lines, numbers


def _steps(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f}"


# --- claim 6: learning-rate sensitivity ----------------------------------------------------


def lr_sensitivity(task: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, Any]:
    """The seed-0 grid's progress per lr, the good lrs, and the width of the good range around the best.

    ``progress`` is the untrained model's figure minus the run's final figure
    (log10 of both on log-scale tasks), oriented so that positive is better,
    as a fraction of the best lr's (NaN for a diverged run). The good range is
    the run of consecutive good grid lrs that holds the best; ``width`` its
    extent in decades, ``at_edge`` whether it reaches an end of the grid.
    """
    sign = _sign(task)
    transform = np.log10 if task["log_scale"] else (lambda value: value)
    tuning = optimizer["tuning"]
    untrained = tuning[0]["curves"][task["curve_metric"]][0]

    def progress(run: dict[str, Any]) -> float:
        value = run["final"].get(task["metric"])
        if run["diverged"] or value is None or not math.isfinite(value) or (task["log_scale"] and value <= 0):
            return math.nan
        return float(sign * (transform(untrained) - transform(value)))

    lrs = [run["lr"] for run in tuning]
    raw = [progress(run) for run in tuning]
    best_progress = max((p for p in raw if math.isfinite(p)), default=math.nan)
    if not best_progress > 0:
        return {"lrs": lrs, "fraction": [math.nan] * len(lrs), "good": [], "width": 0.0, "at_edge": False}
    fraction = [p / best_progress if math.isfinite(p) else math.nan for p in raw]
    good = [f >= 1 - SENSITIVITY_MARGIN for f in fraction]
    best = fraction.index(1.0)
    low, high = best, best
    while low > 0 and good[low - 1]:
        low -= 1
    while high < len(lrs) - 1 and good[high + 1]:
        high += 1
    return {
        "lrs": lrs,
        "fraction": fraction,
        "good": [lr for lr, ok in zip(lrs, good) if ok],
        "width": math.log10(lrs[high] / lrs[low]),
        "at_edge": low == 0 or high == len(lrs) - 1,
    }


def _claim_6(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    present = [name for name in CLAIM_TASKS[6] if name in tasks]
    optimizer_names = list(dict.fromkeys(name for task in present for name in tasks[task]["optimizers"]))
    sensitivity = {
        name: {task: lr_sensitivity(tasks[task], tasks[task]["optimizers"][name]) for task in present}
        for name in optimizer_names
    }
    checks, lines = [], []
    for name in optimizer_names:
        per_task = sensitivity[name]
        counts: dict[float, int] = {}
        for entry in per_task.values():
            for lr in entry["good"]:
                counts[lr] = counts.get(lr, 0) + 1
        most = max(sorted(counts), key=counts.get, default=None)
        widths = ", ".join(
            f"{task} {'>=' if entry['at_edge'] else ''}{entry['width']:.1f}" for task, entry in per_task.items()
        )
        everywhere = most is not None and counts[most] == len(present)
        summary = f"lr {most:g} good on {counts[most]}/{len(present)} tasks" if most is not None else "no good lr"
        line = f"{name}: good-range widths (decades) {widths}; {summary}"
        if name in RMSPROP_VARIANTS:
            checks.append(not everywhere)
            line += f": {'fails' if everywhere else 'holds'}"
        lines.append(line)
    return checks, lines, {"tasks": present, "sensitivity": sensitivity}


_CHECKS = {1: _claim_1, 2: _claim_2, 3: _claim_3, 4: _claim_4, 5: _claim_5, 6: _claim_6}


def evaluate_claims(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdict on each claim, with the rule and the numbers behind it, from the study's task results."""
    claims = []
    for number, text in CLAIMS.items():
        entry = {
            "number": number,
            "claim": text,
            "rule": RULES[number],
            "caveats": CAVEATS[number],
            "tasks": list(CLAIM_TASKS[number]),
        }
        if not any(name in tasks for name in CLAIM_TASKS[number]):
            claims.append({**entry, "verdict": "not tested", "checks": [], "evidence": [], "numbers": {}})
            continue
        checks, lines, numbers = _CHECKS[number](tasks)
        verdict = _verdict(checks) if checks else "not tested"
        claims.append(
            {
                **entry,
                "verdict": verdict,
                "checks": checks,
                "held": f"{sum(checks)}/{len(checks)}",
                "evidence": lines,
                "numbers": numbers,
            }
        )
    return claims
