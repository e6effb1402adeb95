"""Checks of an optimizer's settings, run at the boundary before anything changes.

Each failure is a ``ValueError`` naming the argument and its allowed range.
Where ``torch.optim.RMSprop`` has the same check, its wording opens the message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

from torch import Tensor

__all__ = ["FLAGS", "STATE_PRECISIONS", "check_settings"]

# Non-negative numbers, with the phrase torch.optim uses for each.
_NON_NEGATIVE = {
    "lr": "learning rate",
    "eps": "epsilon value",
    "weight_decay": "weight_decay value",
    "momentum": "momentum value",
    "initial_scale": "initial_scale value",
}

FLAGS = (
    "centered",
    "maximize",
    "capturable",
    "differentiable",
    "eps_in_sqrt",
    "bias_correction",
    "nesterov",
    "decoupled_weight_decay",
    "lr_in_momentum",
)

STATE_PRECISIONS = ("full", "bf16", "8bit")


def check_settings(settings: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if any setting of an optimizer or param group is invalid."""
    _check_lr_tensor(settings["lr"])
    for name, phrase in _NON_NEGATIVE.items():
        _check_non_negative(name, phrase, settings[name])
    _check_alpha(settings["alpha"], settings["bias_correction"])
    for name in FLAGS:
        if not isinstance(settings[name], bool):
            raise ValueError(f"Invalid {name}: {settings[name]!r} ({name} must be True or False)")
    if not (settings["foreach"] is None or isinstance(settings["foreach"], bool)):
        raise ValueError(f"Invalid foreach: {settings['foreach']!r} (foreach must be None, True or False)")
    if settings["nesterov"] and not settings["momentum"] > 0:
        raise ValueError(
            f"Nesterov momentum requires a momentum > 0 (got nesterov=True, momentum={settings['momentum']})"
        )
    if settings["foreach"] and settings["differentiable"]:
        raise ValueError("Invalid foreach: True (foreach=True does not support differentiable=True)")
    _check_state_precision(settings)
    _check_fused(settings)


def _check_fused(settings: Mapping[str, Any]) -> None:
    fused = settings["fused"]
    if not (fused is None or isinstance(fused, bool)):
        raise ValueError(f"Invalid fused: {fused!r} (fused must be None, True or False)")
    if not fused:
        return
    if settings["foreach"]:
        raise ValueError("Invalid fused: True (fused=True and foreach=True cannot both be set)")
    for flag in ("differentiable", "capturable"):
        if settings[flag]:
            raise ValueError(f"Invalid fused: True (the fused path does not support {flag}=True)")


def _check_lr_tensor(lr: Any) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element (got shape {tuple(lr.shape)})")


def _as_real(name: str, value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be a real number)")
    return float(value)


def _check_non_negative(name: str, phrase: str, value: Any) -> None:
    number = _as_real(name, value)
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"Invalid {phrase}: {value} ({name} must be finite and >= 0)")


def _check_alpha(alpha: Any, bias_correction: bool) -> None:
    number = _as_real("alpha", alpha)
    if bias_correction is True:
        if not 0.0 <= number < 1.0:
            raise ValueError(f"Invalid alpha value: {alpha} (alpha must be in [0, 1) with bias_correction=True)")
    elif not 0.0 <= number <= 1.0:
        raise ValueError(f"Invalid alpha value: {alpha} (alpha must be in [0, 1])")


def _check_state_precision(settings: Mapping[str, Any]) -> None:
    precision = settings["state_precision"]
    if precision not in STATE_PRECISIONS:
        allowed = ", ".join(map(repr, STATE_PRECISIONS))
        raise ValueError(f"Invalid state_precision: {precision!r} (state_precision must be one of {allowed})")
    size = settings["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, Integral) or size < 0:
        raise ValueError(f"Invalid min_8bit_size: {size!r} (min_8bit_size must be an integer >= 0)")
    if precision != "full":
        # Rounding is neither differentiable nor capturable in a CUDA graph.
        for name in ("differentiable", "capturable"):
            if settings[name]:
                raise ValueError(
                    f"Invalid {name}: True ({name}=True needs state_precision='full', got {precision!r})"
                )
