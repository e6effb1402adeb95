"""The supervised and online training problems of the study.

A *problem* is one training run's world, built from a seed: a model, the
training loss of each step, and validation figures. All data ships with Python
or scikit-learn, or is generated: nothing is downloaded. The reinforcement
learning problem lives in :mod:`rmsprop.tools.compare.cartpole`.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmsprop.tools.demo import SimpleNet

__all__ = ["Adding", "CharLSTM", "Digits", "DigitsCNN", "Drift", "Problem", "SeedMLP", "SmallCharLSTM"]


class Problem(ABC):
    """A model with its data, built from a seed (which fixes initial weights and batch order).

    ``max_grad_norm``, where set, clips the gradient's global norm before each
    step, as the problem's usual training recipe does.
    """

    model: nn.Module
    max_grad_norm: float | None = None

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


# --- digits, digits-cnn: scikit-learn's handwritten digits -------------------------------


@functools.cache
def digits_splits() -> dict[str, tuple[Tensor, Tensor]]:
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
        self.model = self.build_model()
        self.splits = digits_splits()
        self.batches = torch.Generator().manual_seed(seed)

    @staticmethod
    def build_model() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

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


class DigitsCNN(Digits):
    """A small convolutional net on the digits as 1x8x8 images; data and batches as :class:`Digits`.

    conv 3x3 (16) -> ReLU -> max-pool 2 -> conv 3x3 (32) -> ReLU -> max-pool 2 -> linear 128->10.
    """

    @staticmethod
    def build_model() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 10),
        )


# --- char-lstm: a character language model on Python's own documentation ---------------


@functools.cache
def pydoc_text() -> tuple[Tensor, int]:
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
        codes, vocabulary_size = pydoc_text()
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


class SmallCharLSTM(CharLSTM):
    """:class:`CharLSTM` at a quarter of the cost per step, small enough to train to its plateau on a CPU.

    32 units, a 16-dim embedding, batches of 16 windows of 32 characters.
    """

    embedding_size, hidden_size = 16, 32
    batch_size, window = 16, 32


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


# --- adding: the long-range LSTM benchmark ---------------------------------------------


def adding_batch(size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``size`` sequences of the adding problem: inputs ``(size, length, 2)`` and targets ``(size,)``.

    Channel 0 holds values drawn from U(0, 1), channel 1 marks two of them, one
    in each half of the sequence; the target is the sum of the two marked values.
    """
    values = torch.rand(size, length, generator=generator)
    first = torch.randint(length // 2, (size,), generator=generator)
    second = torch.randint(length // 2, (size,), generator=generator) + length // 2
    markers = torch.zeros(size, length)
    rows = torch.arange(size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], dim=-1), (values * markers).sum(dim=1)


@functools.cache
def adding_held_out(length: int, size: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Fixed validation and test sets of the adding problem, the same for every seed."""
    return {
        "val": adding_batch(size, length, torch.Generator().manual_seed(10_001)),
        "test": adding_batch(size, length, torch.Generator().manual_seed(10_002)),
    }


class Adding(Problem):
    r"""The adding problem (Hochreiter & Schmidhuber, 1997): an LSTM reads ``length`` steps, then sums two.

    A one-layer LSTM of ``hidden_size`` units reads each sequence of
    :func:`adding_batch`; a linear head on its last hidden state predicts the
    sum; the loss is the MSE. Predicting the mean, 1, scores
    :math:`\operatorname{Var}(u_1 + u_2) = 1/6 \approx 0.167`: a model below
    that has learned to find and add the marked values across the sequence.
    Figures on a fixed validation set and, at the end, a fixed test set.
    """

    length, hidden_size, batch_size, held_out_size = 100, 32, 32, 1000

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = _AddingLSTM(self.hidden_size)
        self.batches = torch.Generator().manual_seed(seed)
        self.held_out = adding_held_out(self.length, self.held_out_size)

    def training_loss(self, step: int) -> Tensor:
        inputs, targets = adding_batch(self.batch_size, self.length, self.batches)
        return F.mse_loss(self.model(inputs), targets)

    def _mse(self, split: str) -> float:
        inputs, targets = self.held_out[split]
        return F.mse_loss(self.model(inputs), targets).item()

    def evaluate(self) -> dict[str, float]:
        return {"val_mse": self._mse("val")}

    def final_metrics(self) -> dict[str, float]:
        return {"val_mse": self._mse("val"), "test_mse": self._mse("test")}


class _AddingLSTM(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden, _ = self.lstm(inputs)
        return self.head(hidden[:, -1])[:, 0]


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
