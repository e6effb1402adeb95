"""The optimizers under comparison, each with the learning-rate grid it is tuned on."""

from __future__ import annotations

import math

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from rmsprop.core.optimizer import RMSprop
from rmsprop.core.presets import preset_settings

__all__ = ["OPTIMIZERS", "OptimizerSpec", "RMSPROP_VARIANTS", "next_lr", "optimizer_spec"]

Params = Iterable[nn.Parameter]


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer of the study: how to build it with a given lr, and the lrs to try.

    ``lr_grid`` is log-spaced (factors of about 3). ``quick_grid`` is its
    middle, for the ``--quick`` smoke run.
    """

    name: str
    label: str
    build: Callable[[Params, float], torch.optim.Optimizer]
    lr_grid: tuple[float, ...]
    is_rmsprop: bool = False

    @property
    def quick_grid(self) -> tuple[float, ...]:
        middle = len(self.lr_grid) // 2
        return self.lr_grid[middle - 1 : middle + 2]


def next_lr(lr: float, up: bool = True) -> float:
    """The neighbour of ``lr`` (1 or 3 times a power of ten) on the log grid 1e-3, 3e-3, 1e-2, ..."""
    leading_digit = round(lr / 10 ** math.floor(math.log10(lr)))
    factor = 3 if leading_digit == 1 else 10 / 3
    if not up:
        factor = 10 / 3 if leading_digit == 1 else 3
    return float(f"{lr * factor if up else lr / factor:.1g}")


def _log_grid(lowest: float, points: int = 6) -> tuple[float, ...]:
    """``points`` lrs from ``lowest`` up, each :func:`next_lr` of the one before."""
    grid = [lowest]
    while len(grid) < points:
        grid.append(next_lr(grid[-1]))
    return tuple(grid)


def _preset(name: str, **overrides) -> Callable[[Params, float], torch.optim.Optimizer]:
    return lambda params, lr: RMSprop(params, **preset_settings(name, **overrides, lr=lr))


OPTIMIZERS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        "rmsprop-pytorch",
        "RMSprop (pytorch preset: alpha=0.99)",
        _preset("pytorch"),
        _log_grid(1e-4),
        is_rmsprop=True,
    ),
    OptimizerSpec(
        "rmsprop-hinton",
        "RMSprop (hinton preset: alpha=0.9, eps in sqrt)",
        _preset("hinton"),
        _log_grid(1e-4),
        is_rmsprop=True,
    ),
    OptimizerSpec(
        "rmsprop-centered-momentum",
        "RMSprop (centered, momentum=0.9)",
        _preset("pytorch", centered=True, momentum=0.9),
        # Momentum 0.9 multiplies the steady-state step by 10: the grid starts 3x lower.
        _log_grid(3e-5),
        is_rmsprop=True,
    ),
    OptimizerSpec(
        "adagrad",
        "torch Adagrad",
        lambda params, lr: torch.optim.Adagrad(params, lr=lr),
        _log_grid(1e-3),
    ),
    OptimizerSpec(
        "adam",
        "torch Adam",
        lambda params, lr: torch.optim.Adam(params, lr=lr),
        _log_grid(1e-4),
    ),
    OptimizerSpec(
        "sgd-momentum",
        "torch SGD (momentum=0.9)",
        lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        _log_grid(1e-3),
    ),
)

RMSPROP_VARIANTS: tuple[str, ...] = tuple(spec.name for spec in OPTIMIZERS if spec.is_rmsprop)


def optimizer_spec(name: str) -> OptimizerSpec:
    for spec in OPTIMIZERS:
        if spec.name == name:
            return spec
    raise ValueError(f"Unknown optimizer {name!r}; valid optimizers are: {', '.join(s.name for s in OPTIMIZERS)}")
