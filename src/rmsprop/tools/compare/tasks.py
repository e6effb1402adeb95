"""The tasks of the study: which problem, trained by whom, for how long, judged by which figure.

The problems themselves are in :mod:`rmsprop.tools.compare.problems` and
:mod:`rmsprop.tools.compare.cartpole`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rmsprop.tools.compare.cartpole import CartPoleA2C
from rmsprop.tools.compare.optimizers import OPTIMIZERS, RMSPROP_VARIANTS
from rmsprop.tools.compare.problems import Adding, CharLSTM, Digits, DigitsCNN, Drift, Problem, SeedMLP, SmallCharLSTM

__all__ = ["TASKS", "Budget", "Task", "task_by_name"]


@dataclass(frozen=True)
class Budget:
    """``steps`` optimizer steps, with the curves logged every ``log_every`` steps."""

    steps: int
    log_every: int


@dataclass(frozen=True)
class Task:
    """What to train (``problem``), with whom, for how long, and which figure decides.

    Tasks with the same ``problem`` and budgets share runs. ``metric`` (a key of
    the final figures) tunes the lr and ranks the optimizers; ``curve_metric``
    (a key of the logged figures) is plotted and times convergence. Both are
    lower-is-better unless ``higher_is_better``. ``seeds`` is the number of
    final runs per optimizer (after tuning on seed 0).

    Where ``tune_around`` names another task, the lr grid is that task's tuned
    lr and its two neighbours on the log grid (grown past an end where the best
    lr sits), searched at this task's budget: a long run re-tuned where the
    short one left off. ``extra_curve`` (key, label) is a second logged figure
    to plot; ``env_steps_per_step`` puts environment steps on the x axis.
    ``failure_level``, where set, replaces the check that the curve ends no
    worse than it started: a run whose final metric is no better than it has
    diverged (where an untrained model can score well by chance).
    ``step_cost_ms`` is a rough CPU time per step, used
    only to start the longest runs first.
    """

    name: str
    title: str
    description: str
    problem: str
    make_problem: Callable[[int, Budget], Problem]
    metric: str
    metric_label: str
    curve_metric: str
    curve_label: str
    budget: Budget
    quick_budget: Budget
    seeds: int
    step_cost_ms: float
    optimizers: tuple[str, ...] = tuple(spec.name for spec in OPTIMIZERS)
    higher_is_better: bool = False
    log_scale: bool = True
    tune_around: str | None = None
    env_steps_per_step: int | None = None
    extra_curve: tuple[str, str] | None = None
    failure_level: float | None = None
    marked_steps: Callable[[Budget], tuple[int, ...]] = lambda budget: ()

    def budget_for(self, quick: bool) -> Budget:
        return self.quick_budget if quick else self.budget


_CHAR_LSTM = {
    "metric": "val_bpc",
    "metric_label": "validation bits/char",
    "curve_metric": "val_bpc",
    "curve_label": "validation bits/char",
    "log_scale": False,
}
_DIGITS_SPLIT = "(1797 images, split 60/20/20 into train/val/test), minibatches of 64. Figure: validation cross-entropy."

TASKS: tuple[Task, ...] = (
    Task(
        name="seed-mlp",
        title="seed-mlp: the mission document's SimpleNet on random regression data",
        description="SimpleNet (10->50->1) fits y = randn(100, 1) from X = randn(100, 10) with full-batch MSE. "
        "The targets are noise, so there is no validation data: the lr is tuned on the final training MSE.",
        problem="seed-mlp",
        make_problem=lambda seed, budget: SeedMLP(seed),
        metric="train_mse",
        metric_label="final training MSE",
        curve_metric="train_mse",
        curve_label="training MSE",
        budget=Budget(1000, 25),
        quick_budget=Budget(40, 10),
        seeds=5,
        step_cost_ms=0.2,
    ),
    Task(
        name="digits",
        title="digits: MLP on scikit-learn's handwritten digits",
        description="An MLP (64->64->10, ReLU) classifies the 8x8 digits of `sklearn.datasets.load_digits` "
        + _DIGITS_SPLIT,
        problem="digits",
        make_problem=lambda seed, budget: Digits(seed),
        metric="val_loss",
        metric_label="validation cross-entropy",
        curve_metric="val_loss",
        curve_label="validation cross-entropy",
        budget=Budget(1500, 50),
        quick_budget=Budget(60, 20),
        seeds=5,
        step_cost_ms=0.35,
    ),
    Task(
        name="digits-cnn",
        title="digits-cnn: a small convolutional net on scikit-learn's handwritten digits",
        description="A CNN (conv 3x3 16 -> max-pool -> conv 3x3 32 -> max-pool -> linear, ReLU) classifies the "
        "digits as 1x8x8 images " + _DIGITS_SPLIT,
        problem="digits-cnn",
        make_problem=lambda seed, budget: DigitsCNN(seed),
        metric="val_loss",
        metric_label="validation cross-entropy",
        curve_metric="val_loss",
        curve_label="validation cross-entropy",
        budget=Budget(600, 25),
        quick_budget=Budget(20, 10),
        seeds=5,
        step_cost_ms=2.7,
    ),
    Task(
        name="char-lstm",
        title="char-lstm: character-level LSTM on Python's documentation text",
        description=f"A one-layer LSTM ({CharLSTM.hidden_size} units, {CharLSTM.embedding_size}-dim embedding) "
        "predicts the next character of the text of `pydoc_data.topics` (ships with Python, ~465K characters, "
        f"split 90/5/5 into train/val/test), batches of {CharLSTM.batch_size} random windows of "
        f"{CharLSTM.window} characters. Figure: validation bits per character on the whole validation split "
        f"(curves: {CharLSTM.curve_windows} windows of 256 characters spread over it).",
        problem="char-lstm",
        make_problem=lambda seed, budget: CharLSTM(seed),
        budget=Budget(1000, 50),
        quick_budget=Budget(10, 5),
        seeds=3,
        step_cost_ms=9.0,
        **_CHAR_LSTM,
    ),
    Task(
        name="adding",
        title=f"adding: the LSTM adding problem, sequences of {Adding.length}",
        description=f"A one-layer LSTM ({Adding.hidden_size} units) reads sequences of {Adding.length} (value, "
        "marker) pairs and predicts the sum of the two marked values, one in each half (Hochreiter & "
        f"Schmidhuber, 1997); fresh batches of {Adding.batch_size} every step. Predicting the mean scores "
        f"MSE 1/6 = 0.167; below it the net has learned to carry the values across the sequence. Figure: MSE on "
        f"{Adding.held_out_size} fixed validation sequences.",
        problem="adding",
        make_problem=lambda seed, budget: Adding(seed),
        metric="val_mse",
        metric_label="validation MSE",
        curve_metric="val_mse",
        curve_label="validation MSE",
        budget=Budget(3000, 100),
        quick_budget=Budget(10, 5),
        seeds=3,
        step_cost_ms=3.5,
    ),
    Task(
        name="drift",
        title="drift: online regression with drifting and jumping true weights",
        description=f"Online linear regression in {Drift.dimension} dimensions, a fresh batch of "
        f"{Drift.batch_size} samples per step, noise {Drift.noise}. The true weights take a random-walk step "
        f"(std {Drift.drift} per coordinate) every step and jump to a fresh N(0, I) draw at 1/3 and 2/3 of the "
        "run. Figure: tracking error |w_model - w_true|^2 / d averaged over all steps.",
        problem="drift",
        make_problem=lambda seed, budget: Drift(seed, budget.steps),
        metric="mean_tracking_error",
        metric_label="mean tracking error",
        curve_metric="tracking_error",
        curve_label="tracking error",
        budget=Budget(3000, 50),
        quick_budget=Budget(90, 10),
        seeds=5,
        step_cost_ms=0.2,
        marked_steps=lambda budget: Drift.jump_schedule(budget.steps),
    ),
    Task(
        name="cartpole-a2c",
        title="cartpole-a2c: advantage actor-critic on gymnasium's CartPole-v1",
        description=f"A2C (the Stable-Baselines3 recipe: {CartPoleA2C.n_envs} environments, "
        f"{CartPoleA2C.n_steps}-step returns, gamma {CartPoleA2C.gamma}, gradient norm clipped to "
        f"{CartPoleA2C.max_grad_norm}, 64-64 tanh policy and value nets) learns to balance the pole; one optimizer "
        f"step per {CartPoleA2C.env_steps_per_step} environment steps. Figure: the mean return of "
        f"{CartPoleA2C.evaluation_episodes} greedy episodes from fixed held-out starts (500 at most), averaged "
        "over the log points of the last quarter of training; curves also show the return of the training "
        "episodes over environment steps. Higher is better.",
        problem="cartpole-a2c",
        make_problem=lambda seed, budget: CartPoleA2C(seed, budget.steps),
        metric="late_eval_return",
        metric_label="late evaluation return",
        curve_metric="eval_return",
        curve_label="evaluation return",
        budget=Budget(1000, 50),
        quick_budget=Budget(20, 10),
        seeds=5,
        step_cost_ms=4.0,
        higher_is_better=True,
        log_scale=False,
        env_steps_per_step=CartPoleA2C.env_steps_per_step,
        extra_curve=("episode_return", "training episode return"),
        # A policy that pushes one way only scores 8-10; an untrained greedy policy may score 500 by chance.
        failure_level=15.0,
    ),
    Task(
        name="char-lstm-long",
        title="char-lstm-long: a smaller character LSTM trained towards its plateau, Adagrad against RMSProp",
        description=f"The char-lstm text with a smaller LSTM ({SmallCharLSTM.hidden_size} units, "
        f"{SmallCharLSTM.embedding_size}-dim embedding, batches of {SmallCharLSTM.batch_size} windows of "
        f"{SmallCharLSTM.window} characters) for 8000 steps, about 10 passes over the training text, with "
        "Adagrad and the RMSProp variants only, each re-tuned at this budget on a 3-point grid around its "
        "char-lstm lr. The effective per-parameter step size lr/denominator (`rmsprop.core.diagnostics`) is read "
        "from the optimizer state at every log point.",
        problem="char-lstm-small",
        make_problem=lambda seed, budget: SmallCharLSTM(seed),
        budget=Budget(8000, 100),
        quick_budget=Budget(20, 5),
        seeds=3,
        step_cost_ms=2.2,
        optimizers=(*RMSPROP_VARIANTS, "adagrad"),
        tune_around="char-lstm",
        **_CHAR_LSTM,
    ),
)


def task_by_name(name: str) -> Task:
    for task in TASKS:
        if task.name == name:
            return task
    raise ValueError(f"Unknown task {name!r}; valid tasks are: {', '.join(t.name for t in TASKS)}")
