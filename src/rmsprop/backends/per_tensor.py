"""The per-tensor path of low-precision state: decode, the torch rule, encode.

One parameter at a time, so that only one tensor's state is ever held in
fp32. This is the readable reference of the fused kernels' low-precision
steps, and the path of a parameter whose state the step creates or converts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rmsprop.core.functional import rmsprop
from rmsprop.core.hyperparameters import Hyperparameters
from rmsprop.formats.codecs import decode_state, encode_state
from rmsprop.formats.layout import compute_dtype, mean_weight, target_format

__all__ = ["step_encoded"]


def _filled(p: Tensor, dtype: torch.dtype, value: float) -> Tensor:
    if p.is_complex():
        return torch.full(p.shape, complex(value, value), dtype=p.dtype, device=p.device)
    return torch.full(p.shape, value, dtype=dtype, device=p.device)


def step_encoded(
    params: list[Tensor],
    states: list[dict[str, Any]],
    param_indices: list[int],
    group: Mapping[str, Any],
    *,
    foreach: bool,
    new_step: Any,
) -> None:
    """One RMSProp step of ``params`` (all with grads) whose state is stored per ``group["state_precision"]``.

    ``new_step(p)`` makes the ``step`` entry of a fresh state.
    """
    hp = Hyperparameters.from_group(group)
    for p, state, index in zip(params, states, param_indices, strict=True):
        fmt = target_format(p, group["state_precision"], group["min_8bit_size"])
        dtype = compute_dtype(p)
        if not state:
            state["step"] = new_step(p)
        values = decode_state(state, p, mean_weight(group, state))
        values.setdefault("square_avg", _filled(p, dtype, group["initial_scale"]))
        if group["momentum"] > 0:
            values.setdefault("momentum_buffer", _filled(p, dtype, 0.0))
        if group["centered"]:
            values.setdefault("grad_avg", _filled(p, dtype, 0.0))
        work_param = p if p.dtype == dtype else p.detach().to(dtype)
        grad = p.grad if p.grad.dtype == dtype else p.grad.to(dtype)
        rmsprop(
            [work_param],
            [grad],
            [values["square_avg"]],
            [values["grad_avg"]] if group["centered"] else [],
            [values["momentum_buffer"]] if group["momentum"] > 0 else [],
            [state["step"]],
            hp,
            foreach=foreach,
        )
        if work_param is not p:
            p.copy_(work_param)
        encode_state(state, p, values, fmt, index, mean_weight(group, state))
