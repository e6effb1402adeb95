"""A NumPy reference of the RMSProp rule, written to be read.

This is the algorithm as one would teach it, in float64, one parameter at a
time, with every flag of :class:`rmsprop.RMSprop`. It is the oracle the tests
check the torch implementation against, so it shares no code with it.

>>> import numpy as np
>>> param = np.array([1.0, -2.0])
>>> state = init_state(param)
>>> param, state = step(param, np.array([0.5, 0.5]), state, lr=0.01, alpha=0.9)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["RMSpropState", "init_state", "step"]


class RMSpropState(NamedTuple):
    step: int
    square_avg: np.ndarray  # E[g^2], the moving average of squared gradients
    grad_avg: np.ndarray  # E[g], used by the centered form
    momentum_buffer: np.ndarray


def init_state(param: np.ndarray, initial_scale: float = 0.0) -> RMSpropState:
    """The state before the first step: E[g^2] = initial_scale, everything else zero."""
    real = _as_real(param)
    return RMSpropState(
        step=0,
        square_avg=np.full_like(real, initial_scale),
        grad_avg=np.zeros_like(real),
        momentum_buffer=np.zeros_like(real),
    )


def step(
    param: np.ndarray,
    grad: np.ndarray,
    state: RMSpropState,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    eps_in_sqrt: bool = False,
    bias_correction: bool = False,
    nesterov: bool = False,
    decoupled_weight_decay: bool = False,
    lr_in_momentum: bool = False,
) -> tuple[np.ndarray, RMSpropState]:
    """One RMSProp step; returns the new parameter and state (inputs are not changed).

    Complex parameters are treated as pairs of real numbers, as torch.optim does.
    The state's arrays are real: for a complex parameter of shape S they have shape S + (2,).
    """
    is_complex = np.iscomplexobj(param)
    theta = _as_real(param)
    g = _as_real(grad)
    t = state.step + 1

    if maximize:
        g = -g

    if weight_decay != 0:
        if decoupled_weight_decay:
            theta = theta * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * theta

    square_avg = alpha * state.square_avg + (1 - alpha) * g**2
    grad_avg = alpha * state.grad_avg + (1 - alpha) * g if centered else state.grad_avg

    correction = 1 - alpha**t if bias_correction else 1.0
    second_moment = square_avg / correction
    if centered:
        second_moment = np.maximum(second_moment - (grad_avg / correction) ** 2, 0.0)

    if eps_in_sqrt:
        denominator = np.sqrt(second_moment + eps)
    else:
        denominator = np.sqrt(second_moment) + eps
    update = g / denominator

    buf = state.momentum_buffer
    if momentum == 0:
        theta = theta - lr * update
    elif lr_in_momentum:
        buf = momentum * buf + lr * update
        theta = theta - (momentum * buf + lr * update if nesterov else buf)
    else:
        buf = momentum * buf + update
        theta = theta - lr * (update + momentum * buf if nesterov else buf)

    new_param = theta[..., 0] + 1j * theta[..., 1] if is_complex else theta
    return new_param, RMSpropState(t, square_avg, grad_avg, buf)


def _as_real(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return np.stack([x.real, x.imag], axis=-1).astype(np.float64)
    return x.astype(np.float64)
