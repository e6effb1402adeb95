"""The five claims about RMSProp and the rules that turn the study's numbers into verdicts.

:data:`GENERAL_RULE` says how a claim's checks become its verdict, :data:`RULES`
what each claim checks; the thresholds are the module's constants. A claim
whose tasks were not run is *not tested*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmsprop.compare.optimizers import RMSPROP_VARIANTS

__all__ = [
    "CLAIMS",
    "GENERAL_RULE",
    "Stat",
    "beats",
    "evaluate_claims",
    "final_stat",
    "final_values",
    "mean_curve",
    "mean_step_size_curve",
    "steps_to_target",
]

CLAIMS = {
    1: "Adagrad's summed squares make its step size shrink monotonically towards zero; RMSProp's moving "
    "average does not, so RMSProp keeps learning late in training.",
    2: "RMSProp handles non-stationary targets well (the objective changes over time).",
    3: "RMSProp is a good choice for RNN/LSTM training.",
    4: "RMSProp is more stable than Adagrad and converges better.",
    5: "In some tasks RMSProp converges more slowly than Adam.",
}

GENERAL_RULE = (
    "Each claim is checked for each RMSProp variant (`pytorch` and `hinton` presets, centered with momentum) on "
    "each task that bears on it. A claim is **supported** when every check holds, **not supported** when none "
    "does, and **mixed** otherwise. Comparisons use the final runs at each optimizer's tuned lr. Runs with "
    "the same seed share initial weights and data, so comparisons are paired: \"A beats B\" means the mean "
    "over seeds of B - A is positive and more than twice its standard error, 2·sd(B - A)/sqrt(n) (with one "
    "seed, any lower value beats). A diverged run (non-finite loss, or a curve that ends worse than it started) "
    "counts as +inf: it never beats, and any finite set of runs beats it. *Not supported* means that no check "
    "held: these numbers do not show the claim, which is not the same as showing its opposite."
)

# Thresholds of the rules, named so that the report can state them.
SHRINK_RATIO = 0.9  # step(end) / step(mid) below this: the step size is shrinking
DRIFT_TOLERANCE = 1.10  # "handles well": mean tracking error within 10% of the best optimizer's
LSTM_TOLERANCE = 1.02  # "good choice": validation bits/char within 2% of the best optimizer's
TARGET_FRACTION = 0.9  # convergence time: steps to 90% of the way from the start to the best value
SLOWER_FACTOR = 1.2  # "slower": more than 1.2 times Adam's steps to the target (or never there)

RULES = {
    1: f"On the step-size task (char-lstm runs), from the seed-mean of the median effective step size "
    f"lr/denominator: Adagrad's is non-increasing at every log point and its end/mid-training ratio is "
    f"below {SHRINK_RATIO}; the RMSProp variant's ratio is at least {SHRINK_RATIO}; and the variant lowers "
    "validation bits/char more than Adagrad does in the second half of training.",
    2: f"On drift, the variant's mean tracking error beats Adagrad's and is within "
    f"{round((DRIFT_TOLERANCE - 1) * 100)}% of the best optimizer's.",
    3: f"On char-lstm, the variant's mean validation bits/char is within "
    f"{round((LSTM_TOLERANCE - 1) * 100)}% of the best optimizer's.",
    4: "On each of seed-mlp, char-lstm, digits and drift: the variant beats Adagrad on the task's figure, "
    "no more of its lr-grid runs diverge than Adagrad's, and none of its final runs diverge.",
    5: f"For each variant, on at least one of seed-mlp, char-lstm and digits: it needs more than "
    f"{SLOWER_FACTOR} times Adam's steps to bring the seed-mean curve {round(TARGET_FRACTION * 100)}% of the "
    "way from its start to the better of the two optimizers' best values (or never gets there while Adam does).",
}

CLAIM_TASKS = {
    1: ("step-size",),
    2: ("drift",),
    3: ("char-lstm",),
    4: ("seed-mlp", "char-lstm", "digits", "drift"),
    5: ("seed-mlp", "char-lstm", "digits"),
}


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation and count of a figure over seeds (mean +inf if any diverged)."""

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


def final_values(optimizer: dict[str, Any], key: str) -> list[float]:
    """The figure ``key`` of each final run, in seed order; +inf for a diverged run."""
    values = []
    for run in optimizer["runs"]:
        value = run["final"].get(key)
        values.append(math.inf if value is None or run["diverged"] else float(value))
    return values


def final_stat(optimizer: dict[str, Any], key: str) -> Stat:
    """The figure ``key`` over an optimizer's final runs; diverged runs count as +inf."""
    return _stat(final_values(optimizer, key))


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

    A run that stopped early is NaN from there on.
    """
    return _mean_over_runs([run["curves"] for run in optimizer["runs"]], key)


def mean_step_size_curve(optimizer: dict[str, Any], key: str = "median") -> tuple[np.ndarray, ...]:
    """Steps, mean and standard deviation over the final runs of the effective step size ``key``."""
    return _mean_over_runs([run["step_size"] for run in optimizer["runs"]], key)


def _mean_over_runs(records: list[dict[str, list]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = max((record["step"] for record in records), key=len)
    table = np.full((len(records), len(steps)), np.nan)
    for row, record in enumerate(records):
        values = [np.nan if v is None else v for v in record[key]]
        table[row, : len(values)] = values
    with np.errstate(invalid="ignore"):
        mean = table.mean(axis=0)
        std = table.std(axis=0, ddof=1) if len(records) > 1 else np.zeros(len(steps))
    return np.asarray(steps, dtype=float), mean, std


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


def _claim_1(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    task = tasks["step-size"]
    optimizers = task["optimizers"]

    def step_trend(name: str) -> dict[str, Any]:
        steps, median, _ = mean_step_size_curve(optimizers[name])
        mid = int(np.argmin(np.abs(steps - steps[-1] / 2)))
        _, curve, _ = mean_curve(optimizers[name], task["curve_metric"])
        curve_steps = np.asarray(optimizers[name]["runs"][0]["curves"]["step"], dtype=float)
        curve_mid = int(np.argmin(np.abs(curve_steps - curve_steps[-1] / 2)))
        return {
            "mid_step": float(steps[mid]),
            "step_size_mid": float(median[mid]),
            "step_size_end": float(median[-1]),
            "ratio": float(median[-1] / median[mid]),
            "non_increasing": bool(np.all(np.diff(median) <= 1e-6 * np.abs(median[:-1]))),
            "late_progress": float(curve[curve_mid] - curve[-1]),
        }

    adagrad = step_trend("adagrad")
    adagrad_shrinks = adagrad["non_increasing"] and adagrad["ratio"] < SHRINK_RATIO
    checks, lines, numbers = [], [], {"adagrad": adagrad}
    lines.append(
        f"Adagrad: median step {adagrad['step_size_mid']:.3g} at step {adagrad['mid_step']:.0f} -> "
        f"{adagrad['step_size_end']:.3g} at the end (ratio {adagrad['ratio']:.2f}, "
        f"{'non-increasing' if adagrad['non_increasing'] else 'not monotone'}); "
        f"late progress {adagrad['late_progress']:.3f} bits/char"
    )
    for name in _variants(task):
        trend = step_trend(name)
        holds = adagrad_shrinks and trend["ratio"] >= SHRINK_RATIO and trend["late_progress"] > adagrad["late_progress"]
        checks.append(holds)
        numbers[name] = trend
        lines.append(
            f"{name}: median step {trend['step_size_mid']:.3g} -> {trend['step_size_end']:.3g} "
            f"(ratio {trend['ratio']:.2f}); late progress {trend['late_progress']:.3f} bits/char: "
            f"{'holds' if holds else 'fails'}"
        )
    return checks, lines, numbers


def _claim_2(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    task = tasks["drift"]
    stats = {name: final_stat(opt, task["metric"]) for name, opt in task["optimizers"].items()}
    adagrad = final_values(task["optimizers"]["adagrad"], task["metric"])
    best_name = min(stats, key=lambda name: stats[name].mean)
    lines = [f"best: {best_name} {stats[best_name]}"]
    if best_name != "adagrad":
        lines[0] += f"; adagrad {stats['adagrad']}"
    checks = []
    for name in _variants(task):
        better = beats(final_values(task["optimizers"][name], task["metric"]), adagrad)
        close = stats[name].mean <= DRIFT_TOLERANCE * stats[best_name].mean
        checks.append(better and close)
        lines.append(
            f"{name}: {stats[name]} ({stats[name].mean / stats[best_name].mean:.2f}x best; "
            f"{'beats' if better else 'does not beat'} Adagrad): {'holds' if better and close else 'fails'}"
        )
    return checks, lines, {name: vars(stat) for name, stat in stats.items()}


def _claim_3(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    task = tasks["char-lstm"]
    stats = {name: final_stat(opt, task["metric"]) for name, opt in task["optimizers"].items()}
    best_name = min(stats, key=lambda name: stats[name].mean)
    checks, lines = [], [f"best: {best_name} {stats[best_name]} bits/char"]
    for name in _variants(task):
        holds = stats[name].mean <= LSTM_TOLERANCE * stats[best_name].mean
        checks.append(holds)
        lines.append(
            f"{name}: {stats[name]} ({stats[name].mean / stats[best_name].mean:.3f}x best): "
            f"{'holds' if holds else 'fails'}"
        )
    return checks, lines, {name: vars(stat) for name, stat in stats.items()}


def _claim_4(tasks: dict[str, Any]) -> tuple[list[bool], list[str], dict[str, Any]]:
    checks, lines, numbers = [], [], {}
    for task_name in CLAIM_TASKS[4]:
        if task_name not in tasks:
            continue
        task = tasks[task_name]
        adagrad = task["optimizers"]["adagrad"]
        adagrad_stat = final_stat(adagrad, task["metric"])
        adagrad_values = final_values(adagrad, task["metric"])
        adagrad_diverged = sum(run["diverged"] for run in adagrad["tuning"])
        for name in _variants(task):
            optimizer = task["optimizers"][name]
            stat = final_stat(optimizer, task["metric"])
            grid_diverged = sum(run["diverged"] for run in optimizer["tuning"])
            final_diverged = sum(run["diverged"] for run in optimizer["runs"])
            better = beats(final_values(optimizer, task["metric"]), adagrad_values)
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
        steps, adam_curve, _ = mean_curve(task["optimizers"]["adam"], task["curve_metric"])
        for name in _variants(task):
            seen.add(name)
            variant_steps, curve, _ = mean_curve(task["optimizers"][name], task["curve_metric"])
            start = adam_curve[0]
            best = float(np.nanmin(np.concatenate([adam_curve, curve])))
            target = start + TARGET_FRACTION * (best - start)
            adam_time = steps_to_target(steps, adam_curve, target)
            variant_time = steps_to_target(variant_steps, curve, target)
            slower = variant_time > SLOWER_FACTOR * adam_time
            slower_somewhere[name] |= slower
            numbers[f"{task_name}/{name}"] = {"target": target, "steps": variant_time, "adam_steps": adam_time}
            lines.append(
                f"{task_name}, {name}: {_steps(variant_time)} steps to {target:.4g} vs Adam {_steps(adam_time)}"
                f"{' (slower)' if slower else ''}"
            )
    checks = [slower_somewhere[name] for name in RMSPROP_VARIANTS if name in seen]
    return checks, lines, numbers


def _steps(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f}"


_CHECKS = {1: _claim_1, 2: _claim_2, 3: _claim_3, 4: _claim_4, 5: _claim_5}


def evaluate_claims(tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdict on each claim, with the rule and the numbers behind it, from the study's task results."""
    claims = []
    for number, text in CLAIMS.items():
        entry = {"number": number, "claim": text, "rule": RULES[number], "tasks": list(CLAIM_TASKS[number])}
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
