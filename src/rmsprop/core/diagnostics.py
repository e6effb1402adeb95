r"""Effective per-parameter step sizes, read from an optimizer's state.

An adaptive optimizer moves each parameter element by a direction scaled by
its own step size :math:`\gamma / d`, where :math:`d` is the element's
denominator. This module rebuilds :math:`\gamma / d` from the state after a
step, i.e. the step size of the most recent update:

================================  =====================================================================
optimizer                         effective step size
================================  =====================================================================
:class:`rmsprop.RMSprop`          :math:`\gamma / d`, :math:`d` as in its docstring: :math:`s = v/c` or
                                  :math:`\max(v/c - (m/c)^2, 0)` if centered, :math:`c = 1 - \alpha^t`
                                  with bias_correction else 1; :math:`d = \sqrt{s + \epsilon}` if
                                  eps_in_sqrt else :math:`\sqrt{s} + \epsilon`; bf16 and 8-bit
                                  state decoded as the step decodes it
``torch.optim.RMSprop``           :math:`\gamma / (\sqrt{s} + \epsilon)`, :math:`s = v` or
                                  :math:`\max(v - m^2, 0)` if centered
``torch.optim.Adagrad``           :math:`\gamma_t / (\sqrt{\textstyle\sum_{k \le t} g_k^2} + \epsilon)`,
                                  :math:`\gamma_t = \gamma / (1 + (t-1) \cdot \text{lr\_decay})`
``torch.optim.Adam`` (and AdamW)  :math:`\gamma / (\sqrt{v / (1 - \beta_2^t)} + \epsilon)`, with
                                  ``max_exp_avg_sq`` for :math:`v` if amsgrad
================================  =====================================================================

The step size multiplies the gradient for RMSProp and Adagrad without
momentum; with momentum it multiplies the new term of the momentum buffer,
and for Adam it multiplies the bias-corrected first moment
:math:`m / (1 - \beta_1^t)`. Complex parameters count as (real, imaginary)
pairs, as the optimizers update them.

Reading the state costs a few elementwise kernels per tensor and one
concatenation per group, with no host synchronisation until the summary's
numbers are read, so it is cheap enough to call after every step.

>>> optimizer.step()                                        # doctest: +SKIP
>>> summary = effective_step_sizes(optimizer)[0]            # doctest: +SKIP
>>> summary.min, summary.median, summary.max                # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from rmsprop.core.functional import denominator
from rmsprop.core.hyperparameters import Hyperparameters
from rmsprop.formats.codecs import decode_state
from rmsprop.formats.layout import mean_weight
from rmsprop.core.optimizer import RMSprop

__all__ = [
    "Histogram",
    "StepSizeSummary",
    "SUPPORTED_OPTIMIZERS",
    "effective_step_size_tensors",
    "effective_step_sizes",
    "has_step_sizes",
]


@dataclass(frozen=True)
class Histogram:
    """Counts of step sizes in ``len(counts)`` bins, equally wide in log10.

    ``edges`` has one more entry than ``counts``; bin ``i`` holds the step
    sizes in ``[edges[i], edges[i+1])``, the last bin also its right edge.
    """

    counts: tuple[int, ...]
    edges: tuple[float, ...]


@dataclass(frozen=True)
class StepSizeSummary:
    """Effective step sizes of one parameter group.

    ``count`` is the number of elements that have optimizer state (0 before
    the first step, when min, median and max are NaN). ``median`` is the lower
    median, an element of the set, as :func:`torch.median` defines it.
    """

    count: int
    min: float
    median: float
    max: float
    histogram: Histogram | None = None


def effective_step_sizes(optimizer: Optimizer, *, histogram_bins: int | None = None) -> list[StepSizeSummary]:
    """Min, median and max of the effective step size in each param group.

    Args:
        optimizer: a :class:`rmsprop.RMSprop`, ``torch.optim.RMSprop``,
            ``torch.optim.Adagrad`` or ``torch.optim.Adam`` (or a subclass).
        histogram_bins: if given, also count the step sizes in this many
            bins spaced evenly in log10 between the group's min and max.

    Returns:
        One :class:`StepSizeSummary` per param group, in order.
    """
    if histogram_bins is not None and (
        isinstance(histogram_bins, bool) or not isinstance(histogram_bins, int) or histogram_bins < 1
    ):
        raise ValueError(f"Invalid histogram_bins: {histogram_bins!r} (histogram_bins must be a positive integer)")
    return [_summarize(tensors, histogram_bins) for tensors in effective_step_size_tensors(optimizer)]


def effective_step_size_tensors(optimizer: Optimizer) -> list[list[Tensor]]:
    """The effective step size of every element, per param group and parameter.

    Parameters without state (never stepped) are left out. Each tensor has the
    shape of its parameter (with a trailing 2 for complex parameters).
    """
    step_size = _step_size_function(optimizer)
    return [
        [step_size(group, p, optimizer.state[p]) for p in group["params"] if optimizer.state.get(p)]
        for group in optimizer.param_groups
    ]


def has_step_sizes(optimizer: Optimizer) -> bool:
    """Whether :func:`effective_step_sizes` can read ``optimizer`` (see :data:`SUPPORTED_OPTIMIZERS`)."""
    return isinstance(optimizer, tuple(_STEP_SIZE_FUNCTIONS))


def _step_size_function(optimizer: Optimizer) -> Callable[[dict[str, Any], Tensor, dict[str, Any]], Tensor]:
    for cls, function in _STEP_SIZE_FUNCTIONS.items():
        if isinstance(optimizer, cls):
            return function
    raise ValueError(
        f"Invalid optimizer: {type(optimizer).__name__} (optimizer must be one of {', '.join(SUPPORTED_OPTIMIZERS)})"
    )


SUPPORTED_OPTIMIZERS = ("rmsprop.RMSprop", "torch.optim.RMSprop", "torch.optim.Adagrad", "torch.optim.Adam")


def _ours(group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> Tensor:
    # The step's own decoding (bf16, 8-bit codes, a stored variance) and its own denominator.
    buffers = decode_state(state, p, mean_weight(group, state))
    correction = 1 - group["alpha"] ** _step(state) if group["bias_correction"] else None
    grad_avg = _real(buffers["grad_avg"]) if group["centered"] else None
    hp = Hyperparameters.from_group(group)
    return _lr(group) / denominator(_real(buffers["square_avg"]), grad_avg, correction, hp, differentiable=False)


def _torch_rmsprop(group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> Tensor:
    s = _real(state["square_avg"])
    if group["centered"]:
        # torch takes the root of v - m^2 unclamped; rounding can make it slightly negative.
        s = (s - _real(state["grad_avg"]) ** 2).clamp_(min=0)
    return _lr(group) / s.sqrt().add_(group["eps"])


def _adagrad(group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> Tensor:
    decayed_lr = _lr(group) / (1 + (_step(state) - 1) * group["lr_decay"])
    return decayed_lr / _real(state["sum"]).sqrt().add_(group["eps"])


def _adam(group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> Tensor:
    v = _real(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"])
    beta2 = float(group["betas"][1])
    return _lr(group) / (v / (1 - beta2 ** _step(state))).sqrt_().add_(group["eps"])


_STEP_SIZE_FUNCTIONS = {
    RMSprop: _ours,
    torch.optim.RMSprop: _torch_rmsprop,
    torch.optim.Adagrad: _adagrad,
    torch.optim.Adam: _adam,
}


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _lr(group: dict[str, Any]) -> float:
    return float(group["lr"])


def _step(state: dict[str, Any]) -> float:
    return float(state["step"])


def _summarize(tensors: list[Tensor], histogram_bins: int | None) -> StepSizeSummary:
    if not tensors:
        nan = math.nan
        return StepSizeSummary(0, nan, nan, nan, Histogram((), ()) if histogram_bins else None)
    values = torch.cat([t.detach().reshape(-1) for t in tensors])
    smallest, largest = torch.aminmax(values)
    median = values.median()
    histogram = _histogram(values, histogram_bins, float(smallest), float(largest)) if histogram_bins else None
    return StepSizeSummary(values.numel(), float(smallest), float(median), float(largest), histogram)


def _histogram(values: Tensor, bins: int, smallest: float, largest: float) -> Histogram:
    """Counts in log10-spaced bins from ``smallest`` to ``largest`` (all values > 0)."""
    low, high = math.log10(smallest), math.log10(largest)
    if high == low:
        # All equal: bins one decade wide in all, centred on the value.
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(values.double().log10(), bins=bins, min=low, max=high)
    edges = [10 ** (low + (high - low) * i / bins) for i in range(bins + 1)]
    return Histogram(tuple(int(c) for c in counts.tolist()), tuple(edges))
