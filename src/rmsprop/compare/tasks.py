"""The training problems of the study and the tasks that put the claims to them.

A *problem* is one training run's world, built from a seed: a model, the
training loss of each step, and validation figures. Every figure whose key is
in :attr:`Task.metric` or :attr:`Task.curve_metric` is lower-is-better. All
data ships with Python or scikit-learn, or is generated: nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmsprop.compare.optimizers import OPTIMIZERS, RMSPROP_VARIANTS
from rmsprop.demo import SimpleNet

__all__ = ["TASKS", "Budget", "Problem", "Task", "task_by_name"]


@dataclass(frozen=True)
class Budget:
    """``steps`` optimizer steps, with the curves logged every ``log_every`` steps."""

    steps: int
    log_every: int


class Problem(ABC):
    """A model with its data, built from a seed (which fixes initial weights and batch order)."""

    model: nn.Module

    @abstractmethod
    def training_loss(self, step: int) -> Tensor:
        """The loss on the batch of ``step`` (1-based), ready for ``backward()``."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Figures logged on the curves (called without gradients)."""

    def final_metrics(self) -> dict[str, float]:
        """Figures at the end of training (called without gradients)."""
        return self.evaluate()


# --- seed-mlp: the mission document's example -------------------------------------------


class SeedMLP(Problem):
    """SimpleNet (10->50->1) fitting ``y = randn(100, 1)`` from ``X = randn(100, 10)``, full batch.

    The targets are noise, so nothing generalises: this is a pure
    optimisation problem and the figure is the training MSE.
    """

    def __init__(self, seed: int) -> None:
        # Same order of draws as the mission document: model, then data.
        torch.manual_seed(seed)
        self.model = SimpleNet()
        self.x = torch.randn(100, 10)
        self.y = torch.randn(100, 1)

    def training_loss(self, step: int) -> Tensor:
        return F.mse_loss(self.model(self.x), self.y)

    def evaluate(self) -> dict[str, float]:
        return {"train_mse": self.training_loss(0).item()}


# --- digits: scikit-learn's handwritten digits -------------------------------------------


@functools.cache
def _digits_splits() -> dict[str, tuple[Tensor, Tensor]]:
    """1797 8x8 images scaled to [0, 1], split 60/20/20 into train/val/test by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.tensor(np.random.default_rng(0).permutation(len(y)))
    train_end, val_end = int(0.6 * len(y)), int(0.8 * len(y))
    parts = {"train": order[:train_end], "val": order[train_end:val_end], "test": order[val_end:]}
    return {name: (x[index], y[index]) for name, index in parts.items()}


class Digits(Problem):
    """An MLP 64->64->10 classifying the digits, minibatches of 64 drawn with replacement."""

    batch_size = 64

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.splits = _digits_splits()
        self.batches = torch.Generator().manual_seed(seed)

    def training_loss(self, step: int) -> Tensor:
        x, y = self.splits["train"]
        index = torch.randint(len(y), (self.batch_size,), generator=self.batches)
        return F.cross_entropy(self.model(x[index]), y[index])

    def _figures(self, split: str) -> dict[str, float]:
        x, y = self.splits[split]
        logits = self.model(x)
        return {
            f"{split}_loss": F.cross_entropy(logits, y).item(),
            f"{split}_accuracy": (logits.argmax(dim=1) == y).float().mean().item(),
        }

    def evaluate(self) -> dict[str, float]:
        return self._figures("val")

    def final_metrics(self) -> dict[str, float]:
        return {**self._figures("val"), **self._figures("test")}


# --- char-lstm: a character language model on Python's own documentation ---------------


@functools.cache
def _pydoc_text() -> tuple[Tensor, int]:
    """The text of ``pydoc_data.topics`` (topics in sorted order) as character codes, and the vocabulary size."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, codes = np.unique(code_points, return_inverse=True)
    return torch.from_numpy(codes.astype(np.int64)), len(alphabet)


class CharLSTM(Problem):
    """A one-layer LSTM predicting the next character; the text is split 90/5/5 into train/val/test.

    Training batches are ``batch_size`` random windows of ``window`` characters
    (truncated backpropagation, no state carried over). The curves use
    ``curve_windows`` fixed windows of 256 characters spread over the
    validation text; the final figures use all of it.
    """

    embedding_size, hidden_size = 32, 64
    batch_size, window = 32, 64
    curve_windows = 32

    def __init__(self, seed: int) -> None:
        codes, vocabulary_size = _pydoc_text()
        train_end, val_end = int(0.9 * len(codes)), int(0.95 * len(codes))
        self.splits = {"train": codes[:train_end], "val": codes[train_end:val_end], "test": codes[val_end:]}
        torch.manual_seed(seed)
        self.model = _LSTMModel(vocabulary_size, self.embedding_size, self.hidden_size)
        self.batches = torch.Generator().manual_seed(seed)

    def training_loss(self, step: int) -> Tensor:
        train = self.splits["train"]
        starts = torch.randint(len(train) - self.window - 1, (self.batch_size, 1), generator=self.batches)
        windows = train[starts + torch.arange(self.window + 1)]
        return self.model.loss(windows)

    def _bits_per_char(self, codes: Tensor) -> float:
        """Mean bits per character over ``codes``, cut into windows of 256 (each starts without context)."""
        span = codes[: (len(codes) - 1) // 256 * 256 + 1]
        inputs = span[:-1].reshape(-1, 256)
        targets = span[1:].reshape(-1, 256)
        return self.model.loss(torch.cat([inputs, targets[:, -1:]], dim=1)).item() / math.log(2)

    def evaluate(self) -> dict[str, float]:
        # Windows spread over the whole split, so that the curves end near the final figure.
        val = self.splits["val"]
        starts = torch.linspace(0, len(val) - 257, self.curve_windows).long()
        windows = val[starts[:, None] + torch.arange(257)]
        return {"val_bpc": self.model.loss(windows).item() / math.log(2)}

    def final_metrics(self) -> dict[str, float]:
        return {"val_bpc": self._bits_per_char(self.splits["val"]), "test_bpc": self._bits_per_char(self.splits["test"])}


class _LSTMModel(nn.Module):
    def __init__(self, vocabulary_size: int, embedding_size: int, hidden_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary_size, embedding_size)
        self.lstm = nn.LSTM(embedding_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, vocabulary_size)

    def loss(self, windows: Tensor) -> Tensor:
        """Mean cross-entropy (nats) of predicting ``windows[:, 1:]`` from ``windows[:, :-1]``."""
        hidden, _ = self.lstm(self.embed(windows[:, :-1]))
        logits = self.head(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


# --- drift: online regression towards moving targets -----------------------------------


class Drift(Problem):
    r"""Online linear regression whose true weights move: :math:`y = w_t \cdot x + 0.1\,\varepsilon`.

    :math:`w_t` (20 dimensions, starting at :math:`N(0, I)`) takes a random-walk
    step of standard deviation ``drift`` per coordinate every step, and jumps to
    a fresh :math:`N(0, I)` draw at each of ``jumps`` evenly spaced points.
    Each step sees a fresh batch of 10 samples. The tracking error is
    :math:`\lVert \hat w - w_t \rVert^2 / 20`, averaged over the steps since the
    previous log point (curves) or over the whole run (final figure).
    """

    dimension, batch_size, noise, drift = 20, 10, 0.1, 0.01

    def __init__(self, seed: int, steps: int, jumps: int = 2) -> None:
        torch.manual_seed(seed)
        self.model = nn.Linear(self.dimension, 1, bias=False)
        self.stream = torch.Generator().manual_seed(seed)
        self.target = torch.randn(self.dimension, generator=self.stream)
        self.jump_steps = set(self.jump_schedule(steps, jumps))
        self.window_error, self.window_steps = 0.0, 0
        self.total_error, self.total_steps = 0.0, 0

    @staticmethod
    def jump_schedule(steps: int, jumps: int = 2) -> tuple[int, ...]:
        """The steps at which the true weights jump: ``jumps`` points evenly spaced in the run."""
        return tuple(round(steps * (k + 1) / (jumps + 1)) for k in range(jumps))

    def training_loss(self, step: int) -> Tensor:
        self._move_target(step)
        x = torch.randn(self.batch_size, self.dimension, generator=self.stream)
        y = x @ self.target + self.noise * torch.randn(self.batch_size, generator=self.stream)
        # The error of the weights this batch is predicted with, before the step.
        error = (self.model.weight.detach()[0] - self.target).square().mean().item()
        self.window_error += error
        self.window_steps += 1
        self.total_error += error
        self.total_steps += 1
        return F.mse_loss(self.model(x)[:, 0], y)

    def _move_target(self, step: int) -> None:
        if step in self.jump_steps:
            self.target = torch.randn(self.dimension, generator=self.stream)
        else:
            self.target = self.target + self.drift * torch.randn(self.dimension, generator=self.stream)

    def evaluate(self) -> dict[str, float]:
        if self.window_steps == 0:
            error = (self.model.weight.detach()[0] - self.target).square().mean().item()
        else:
            error = self.window_error / self.window_steps
        self.window_error, self.window_steps = 0.0, 0
        return {"tracking_error": error}

    def final_metrics(self) -> dict[str, float]:
        return {"mean_tracking_error": self.total_error / max(self.total_steps, 1)}


# --- the tasks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What to train (``problem``), with whom, for how long, and which figure decides.

    Tasks with the same ``problem`` and budgets share runs. ``metric`` (a key of
    the final figures) tunes the lr and ranks the optimizers; ``curve_metric``
    (a key of the logged figures) is plotted and times convergence.
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
    optimizers: tuple[str, ...]
    claims: tuple[int, ...]
    log_scale: bool = True
    marked_steps: Callable[[Budget], tuple[int, ...]] = lambda budget: ()

    def budget_for(self, quick: bool) -> Budget:
        return self.quick_budget if quick else self.budget


ALL_OPTIMIZERS = tuple(spec.name for spec in OPTIMIZERS)
_CHAR_LSTM_BUDGETS = {"budget": Budget(600, 30), "quick_budget": Budget(20, 10)}

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
        quick_budget=Budget(60, 10),
        optimizers=ALL_OPTIMIZERS,
        claims=(4, 5),
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
        metric="val_bpc",
        metric_label="validation bits/char",
        curve_metric="val_bpc",
        curve_label="validation bits/char",
        optimizers=ALL_OPTIMIZERS,
        claims=(3, 4, 5),
        log_scale=False,
        **_CHAR_LSTM_BUDGETS,
    ),
    Task(
        name="digits",
        title="digits: MLP on scikit-learn's handwritten digits",
        description="An MLP (64->64->10, ReLU) classifies the 8x8 digits of `sklearn.datasets.load_digits` "
        "(1797 images, split 60/20/20 into train/val/test), minibatches of 64. Figure: validation cross-entropy.",
        problem="digits",
        make_problem=lambda seed, budget: Digits(seed),
        metric="val_loss",
        metric_label="validation cross-entropy",
        curve_metric="val_loss",
        curve_label="validation cross-entropy",
        budget=Budget(1500, 50),
        quick_budget=Budget(100, 20),
        optimizers=ALL_OPTIMIZERS,
        claims=(4, 5),
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
        quick_budget=Budget(150, 10),
        optimizers=ALL_OPTIMIZERS,
        claims=(2, 4),
        marked_steps=lambda budget: Drift.jump_schedule(budget.steps),
    ),
    Task(
        name="step-size",
        title="step-size: effective step size lr/denominator over training, Adagrad vs RMSProp",
        description="The char-lstm runs of Adagrad, the RMSProp variants and Adam (for reference), with the "
        "effective per-parameter step size (`rmsprop.diagnostics`) read from the optimizer state at every log "
        "point: its median over all parameters, and the validation bits/char in the second half of training.",
        problem="char-lstm",
        make_problem=lambda seed, budget: CharLSTM(seed),
        metric="val_bpc",
        metric_label="validation bits/char",
        curve_metric="val_bpc",
        curve_label="validation bits/char",
        optimizers=(*RMSPROP_VARIANTS, "adagrad", "adam"),
        claims=(1,),
        log_scale=False,
        **_CHAR_LSTM_BUDGETS,
    ),
)


def task_by_name(name: str) -> Task:
    for task in TASKS:
        if task.name == name:
            return task
    raise ValueError(f"Unknown task {name!r}; valid tasks are: {', '.join(t.name for t in TASKS)}")
