"""The backends, and the choice of the one that steps each parameter group.

A backend is code that applies the whole rule to a group's tensors:

========== =================================================================
cpu-kernel the fused C++ kernel (:mod:`rmsprop.backends.cpu`): CPU tensors
triton     the fused Triton kernel (:mod:`rmsprop.backends.triton_kernel`): CUDA tensors
foreach    torch's multi-tensor ops (:mod:`rmsprop.core.functional`)
for-loop   torch's ops, tensor by tensor (:mod:`rmsprop.core.functional`)
per-tensor low-precision state decoded, stepped with torch's ops and encoded,
           tensor by tensor (:mod:`rmsprop.backends.per_tensor`)
========== =================================================================

The first that can take a group steps it: the fused kernel of the tensors'
device, then foreach where torch.optim would take it, then the for-loop.
Low-precision groups take the fused kernel for every parameter whose state is
already stored as the group asks, and the per-tensor path for the others
(state to create or convert). :func:`plan_full_precision` and
:func:`plan_low_precision` decide and say why each other backend does not
step the group; ``RMSprop.plan()`` shows it to users.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from rmsprop.backends.fused import encoded_all_supported, encoded_unsupported_reason, missing_backend, unsupported_reason

__all__ = [
    "BACKENDS",
    "FUSED_BACKENDS",
    "GroupPlan",
    "fused_wanted",
    "plan_full_precision",
    "plan_low_precision",
    "uses_foreach",
]

BACKENDS = ("cpu-kernel", "triton", "foreach", "for-loop", "per-tensor")
# The fused backend of each device type.
FUSED_BACKENDS = {"cpu": "cpu-kernel", "cuda": "triton"}


@dataclass(frozen=True)
class GroupPlan:
    """How one step runs a parameter group.

    ``steps`` maps each backend that runs to the positions (in
    ``group["params"]``) of the params it steps; params without a gradient are
    in none. ``declined`` maps each other backend to why it does not step them.
    """

    group: int
    steps: Mapping[str, tuple[int, ...]]
    declined: Mapping[str, str] = field(default_factory=dict)

    @property
    def backend(self) -> str | None:
        """The backend that steps most of the group's params; ``None`` if no param has a gradient."""
        return max(self.steps, key=lambda name: len(self.steps[name]), default=None)

    def __str__(self) -> str:
        if not self.steps:
            return f"group {self.group}: no parameter has a gradient"
        ran = ", ".join(f"{name} steps {len(positions)} of its params" for name, positions in self.steps.items())
        why = "; ".join(f"not {name}: {reason}" for name, reason in self.declined.items())
        return f"group {self.group}: {ran}" + (f" ({why})" if why else "")


def fused_wanted(group: Mapping[str, Any]) -> str | None:
    """Why the group's settings keep it off the fused kernels, or ``None`` if they allow them.

    ``fused=None`` means: the fused kernel where it supports the tensors,
    unless foreach is set.
    """
    if group["fused"] is False:
        return "fused=False"
    if group["fused"] is None and group["foreach"] is not None:
        return f"foreach={group['foreach']} is set and fused is None"
    # torch.compile cannot trace into the kernels; it fuses the traced torch ops itself.
    if torch.compiler.is_compiling():
        return "under torch.compile the step is traced through torch's ops"
    return None


def _foreach_declined(group: Mapping[str, Any], params: Sequence[Tensor]) -> str | None:
    """Why the foreach path does not step these params, or ``None`` if it does.

    ``foreach=None`` means: the multi-tensor path where torch.optim would take it.
    """
    if group["foreach"] is not None:
        return None if group["foreach"] else "foreach=False"
    if group["differentiable"]:
        return "differentiable=True"
    _, foreach = _default_to_fused_or_foreach(list(params), differentiable=False, use_fused=False)
    return None if foreach else "torch.optim takes the for-loop for these tensors"


def uses_foreach(group: Mapping[str, Any], params: Sequence[Tensor]) -> bool:
    """Whether torch's ops run these params of ``group`` with the foreach path (else the for-loop)."""
    return bool(params) and _foreach_declined(group, params) is None


def plan_full_precision(
    group_index: int,
    group: Mapping[str, Any],
    positions: tuple[int, ...],
    tensors: tuple[list[Tensor], ...],
) -> GroupPlan:
    """The plan of a full-precision group whose params with grads (at ``positions``) and state are
    ``tensors`` (params, grads, square_avgs, grad_avgs, momentum_buffers, steps).

    Raises ``RuntimeError`` where ``fused=True`` and the fused kernel cannot take the tensors.
    """
    params = tensors[0]
    if not params:
        return GroupPlan(group_index, {})
    fused_backend = FUSED_BACKENDS.get(params[0].device.type, "cpu-kernel")
    reason = fused_wanted(group)
    if reason is None:
        reason = unsupported_reason(*tensors, differentiable=group["differentiable"], capturable=group["capturable"])
        if reason is None:
            return GroupPlan(group_index, {fused_backend: positions}, {"foreach": f"{fused_backend} comes first"})
        if group["fused"]:
            raise RuntimeError(f"fused=True cannot take this step: {reason}; fused=None falls back to the other paths")
    declined = {fused_backend: reason}
    foreach_reason = _foreach_declined(group, params)
    if foreach_reason is None:
        declined["for-loop"] = "foreach comes first"
        return GroupPlan(group_index, {"foreach": positions}, declined)
    declined["foreach"] = foreach_reason
    return GroupPlan(group_index, {"for-loop": positions}, declined)


def plan_low_precision(
    group_index: int,
    group: Mapping[str, Any],
    candidates: Sequence[tuple[int, Tensor, Mapping[str, Any] | None, str, bool]],
    describe: Callable[[int], str],
) -> GroupPlan:
    """The plan of a low-precision group.

    ``candidates`` holds, for each param with a gradient, ``(position, param,
    state, format, ready)``: ``ready`` when its state is stored in ``format``
    with exactly the buffers the group's settings use. ``describe(position)``
    names a param in errors. Raises ``RuntimeError`` where ``fused=True`` and a
    param's tensors do not fit the kernel.
    """
    declined: dict[str, str] = {}
    fused: list[int] = []
    per_tensor: list[int] = []
    if not candidates:
        return GroupPlan(group_index, {})
    device = candidates[0][1].device
    fused_backend = FUSED_BACKENDS.get(device.type, "cpu-kernel")
    off = fused_wanted(group) or missing_backend(device)
    if off is None and _all_ready_and_supported(candidates):
        return GroupPlan(group_index, {fused_backend: tuple(position for position, *_ in candidates)})
    for position, p, state, fmt, ready in candidates:
        if off is not None:
            per_tensor.append(position)
            continue
        if not ready:
            per_tensor.append(position)
            declined.setdefault(fused_backend, "the step creates or converts the state of some params")
            continue
        reason = encoded_unsupported_reason(p, state, fmt)
        if reason is None:
            fused.append(position)
        elif group["fused"]:
            raise RuntimeError(
                f"fused=True cannot take this step: {describe(position)}: {reason}; "
                "fused=None falls back to the other paths"
            )
        else:
            per_tensor.append(position)
            declined.setdefault(fused_backend, f"{describe(position)}: {reason}")
    if off is not None:
        declined[fused_backend] = off
    steps = {name: tuple(chosen) for name, chosen in ((fused_backend, fused), ("per-tensor", per_tensor)) if chosen}
    return GroupPlan(group_index, steps, declined)


def _all_ready_and_supported(candidates: Sequence[tuple[int, Tensor, Mapping[str, Any] | None, str, bool]]) -> bool:
    """Whether every candidate's state is ready and the fused kernel takes it: the common step, checked in bulk."""
    if not all(ready for *_, ready in candidates):
        return False
    by_format: dict[str, list[tuple[Tensor, Mapping[str, Any]]]] = {}
    for _, p, state, fmt, _ in candidates:
        by_format.setdefault(fmt, []).append((p, state))
    return all(
        encoded_all_supported([p for p, _ in chosen], [state for _, state in chosen], fmt) for fmt, chosen in by_format.items()
    )
