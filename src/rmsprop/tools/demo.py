"""The first example: a small net trained with RMSProp, checked against torch.

``SimpleNet`` (Linear 10->50, ReLU, Linear 50->1) fits random regression data
``X = randn(100, 10)``, ``y = randn(100, 1)`` with MSELoss for 10 epochs of
full-batch RMSProp (lr=0.01, alpha=0.9, eps=1e-8). The run is then repeated
with ``torch.optim.RMSprop`` from the same seed to show the losses agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from rmsprop.core.optimizer import RMSprop

__all__ = ["SimpleNet", "train", "run_demo"]

SETTINGS = {"lr": 0.01, "alpha": 0.9, "eps": 1e-08}


class SimpleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 50)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(50, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def train(
    optimizer_class: Callable[..., torch.optim.Optimizer],
    *,
    seed: int = 0,
    epochs: int = 10,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the example from ``seed``; returns the loss of each epoch."""
    # Same order of random draws as examples/simple_net.py: model, then data.
    torch.manual_seed(seed)
    model = SimpleNet()
    criterion = nn.MSELoss()
    optimizer = optimizer_class(model.parameters(), **SETTINGS)
    X = torch.randn(100, 10)
    y = torch.randn(100, 1)

    losses = []
    for epoch in range(epochs):
        optimizer.zero_grad()
        loss = criterion(model(X), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_epoch is not None:
            on_epoch(epoch, loss.item())
    return losses


def run_demo(seed: int = 0, epochs: int = 10, print_fn: Callable[[str], None] = print) -> bool:
    """Print the training log, then compare with torch.optim.RMSprop. Returns True if they agree."""
    print_fn(f"SimpleNet on random regression data, RMSprop(lr=0.01, alpha=0.9, eps=1e-08), seed {seed}")

    def report(epoch: int, loss: float) -> None:
        print_fn(f"Epoch [{epoch + 1}/{epochs}], Loss: {loss:.4f}")

    ours = train(RMSprop, seed=seed, epochs=epochs, on_epoch=report)
    theirs = train(torch.optim.RMSprop, seed=seed, epochs=epochs)

    print_fn("")
    print_fn("Same run with torch.optim.RMSprop:")
    print_fn(f"{'epoch':>5}  {'rmsprop.RMSprop':>16}  {'torch.optim.RMSprop':>20}  {'|difference|':>12}")
    for epoch, (a, b) in enumerate(zip(ours, theirs), start=1):
        print_fn(f"{epoch:>5}  {a:>16.8f}  {b:>20.8f}  {abs(a - b):>12.3g}")
    largest = max(abs(a - b) for a, b in zip(ours, theirs))
    agree = largest <= 1e-6
    verdict = "bit-identical" if largest == 0 else ("agree" if agree else "DIFFER")
    print_fn(f"Largest difference: {largest:.3g} ({verdict})")
    return agree
