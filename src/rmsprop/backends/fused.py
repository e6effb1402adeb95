r"""The fused kernels' entry: which tensors they take, and the call of the kernel of each device.

One pass reads each element of ``p``, ``g``, ``v`` (and ``m``, ``b`` where
used) once, applies the whole rule and writes them back: the CPU kernel
(:mod:`rmsprop.backends.cpu.kernel`) for CPU tensors, the Triton kernel
(:mod:`rmsprop.backends.triton_kernel`) for CUDA tensors. Elements are
computed in float32 (float64 for float64 tensors): results equal torch's
paths within that type's rounding, not bit for bit.

Taken: dense contiguous tensors of float32, float64, bfloat16, float16,
complex64 or complex128 (as pairs of reals), parameter, gradient and state of
one dtype on one device, steps as 1-element CPU tensors, every flag of the
rule. :func:`unsupported_reason` and :func:`encoded_unsupported_reason` say
why other inputs are not. Low-precision state (:mod:`rmsprop.formats`) is
decoded, updated and encoded in the same pass (:func:`fused_rmsprop_encoded`)
with the reference's noise (:func:`rmsprop.formats.noise.rounding_noise`),
by the CPU kernel or, on CUDA, :func:`rmsprop.backends.triton_kernel.step_encoded`.
The design: docs/design/cpu-kernel.md and docs/design/triton-kernel.md.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache
from operator import attrgetter
from types import ModuleType

import torch
from torch import Tensor

from rmsprop.backends.cpu import kernel as cpu_kernel
from rmsprop.core.hyperparameters import Hyperparameters
from rmsprop.formats.layout import num_blocks, stored_keys

__all__ = [
    "encoded_all_supported",
    "encoded_unsupported_reason",
    "fused_rmsprop",
    "fused_rmsprop_encoded",
    "missing_backend",
    "triton_available",
    "unsupported_dtype_or_layout",
    "unsupported_reason",
]

_REAL_DTYPES = {torch.float32, torch.float64, torch.bfloat16, torch.float16}
_STEP_DTYPES = {torch.float32, torch.float64}
_SUPPORTED_DTYPES = _REAL_DTYPES | {torch.complex64, torch.complex128}
_PLAIN_TYPES = {Tensor, torch.nn.Parameter}
_DTYPE, _SHAPE, _LAYOUT, _IS_CPU, _DEVICE = (attrgetter(name) for name in ("dtype", "shape", "layout", "is_cpu", "device"))
_DEVICE_TYPES = {"cpu", "cuda"}


@cache
def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def missing_backend(device: torch.device) -> str | None:
    """Why the fused kernel for ``device`` cannot run here (not built, or triton not installed), or ``None``."""
    if device.type == "cpu" and cpu_kernel.problem() is not None:
        cpu_kernel.warn_fallback()
        return cpu_kernel.problem()
    if device.type == "cuda" and not triton_available():
        return "triton is not installed (the fused path on CUDA tensors is a Triton kernel)"
    return None


@cache
def _triton_kernels() -> ModuleType:
    """The Triton kernel, imported on the first fused step on CUDA tensors."""
    from rmsprop.backends import triton_kernel as _triton_kernels

    return _triton_kernels


def unsupported_dtype_or_layout(tensor: Tensor, what: str) -> str | None:
    """Why the fused kernel cannot update ``tensor`` in place, or ``None`` if it can."""
    if type(tensor) not in _PLAIN_TYPES:
        return f"{what} is a {type(tensor).__name__}, not a plain tensor"
    if tensor.device.type not in _DEVICE_TYPES:
        return f"{what} is on {tensor.device}; the fused path runs on CPU and CUDA tensors"
    if tensor.layout != torch.strided:
        return f"{what} has layout {tensor.layout}, not torch.strided"
    if tensor.dtype not in _SUPPORTED_DTYPES:
        return f"{what} has dtype {tensor.dtype}; supported: float32, float64, bfloat16, float16, complex64, complex128"
    if not tensor.is_contiguous():
        return f"{what} is not contiguous"
    if tensor.is_conj() or tensor.is_neg():
        # A lazy view: its memory holds the values before conjugation or negation.
        return f"{what} has its conjugate or negative bit set (call .resolve_conj() / .resolve_neg())"
    return None


def unsupported_reason(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    *,
    differentiable: bool,
    capturable: bool,
) -> str | None:
    """Why :func:`fused_rmsprop` cannot take these inputs, or ``None`` if it can.

    The kernels write through raw pointers, so every tensor is checked: its
    device, layout, dtype, contiguity and shape. The optimizer calls this for a
    group the CPU kernel's own gathering declined (its first step, or a change
    it cannot take); that gathering checks the same.
    """
    if differentiable:
        return "differentiable=True needs autograd through the step"
    if capturable:
        return "capturable=True is for graph capture on accelerators"
    buffers = {"gradient": grads, "'square_avg'": square_avgs}
    if grad_avgs:
        buffers["'grad_avg'"] = grad_avgs
    if momentum_buffers:
        buffers["'momentum_buffer'"] = momentum_buffers
    if not _all_supported(params, list(buffers.values()), state_steps):
        return _first_unsupported(params, buffers, state_steps)
    for device in set(map(_DEVICE, params)):
        reason = missing_backend(device)
        if reason is not None:
            return reason
    return None


def _all_plain_strided_contiguous(tensors: list[Tensor]) -> bool:
    """Whether every tensor is a plain (or Parameter) dense contiguous tensor whose memory holds
    its values (no lazy conjugate or negative bit), in C-level passes."""
    return (
        set(map(type, tensors)) <= _PLAIN_TYPES
        and set(map(_LAYOUT, tensors)) <= {torch.strided}
        and all(map(Tensor.is_contiguous, tensors))
        and not any(map(Tensor.is_conj, tensors))
        and not any(map(Tensor.is_neg, tensors))
    )


def _all_supported(params: list[Tensor], buffers: list[list[Tensor]], state_steps: list[Tensor]) -> bool:
    """The check of :func:`unsupported_reason`, one C-level pass per property."""
    if not all(map(_all_plain_strided_contiguous, (params, *buffers))):
        return False
    dtypes, shapes, devices = list(map(_DTYPE, params)), list(map(_SHAPE, params)), list(map(_DEVICE, params))
    if not (set(dtypes) <= _SUPPORTED_DTYPES and {device.type for device in set(devices)} <= _DEVICE_TYPES):
        return False
    if any(
        list(map(_DTYPE, tensors)) != dtypes or list(map(_SHAPE, tensors)) != shapes or list(map(_DEVICE, tensors)) != devices
        for tensors in buffers
    ):
        return False
    return _all_steps_fit(state_steps)


def _all_steps_fit(state_steps: list[Tensor]) -> bool:
    """:func:`_step_fits` for every tensor, one C-level pass per property."""
    return (
        set(map(_DTYPE, state_steps)) <= _STEP_DTYPES
        and all(map(_IS_CPU, state_steps))
        and set(map(Tensor.numel, state_steps)) <= {1}
    )


def _first_unsupported(params: list[Tensor], buffers: dict[str, list[Tensor]], state_steps: list[Tensor]) -> str | None:
    """The first problem :func:`_all_supported` found, in words."""
    for i, param in enumerate(params):
        reason = unsupported_dtype_or_layout(param, f"parameter {i}")
        for what, tensors in buffers.items():
            tensor = tensors[i]
            if reason is None and tensor.dtype != param.dtype:
                reason = f"the {what} of parameter {i} is {tensor.dtype}, the parameter {param.dtype}"
            if reason is None and tensor.shape != param.shape:
                reason = f"the {what} of parameter {i} has shape {tuple(tensor.shape)}, the parameter {tuple(param.shape)}"
            if reason is None and tensor.device != param.device:
                reason = f"the {what} of parameter {i} is on {tensor.device}, the parameter on {param.device}"
            reason = reason or unsupported_dtype_or_layout(tensor, f"the {what} of parameter {i}")
        if reason is None and not _step_fits(state_steps[i]):
            reason = f"the 'step' of parameter {i} is not a 1-element float32 or float64 CPU tensor"
        if reason is not None:
            return reason
    return None


def _step_fits(step: Tensor) -> bool:
    """Whether the kernels can read and increment this 'step' tensor."""
    return step.device.type == "cpu" and step.dtype in _STEP_DTYPES and step.numel() == 1


def fused_rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
) -> None:
    """Apply one RMSProp step in place, in one kernel call per device, parameter dtype and step dtype.

    Same contract as :func:`rmsprop.core.functional.rmsprop`; the inputs must pass
    :func:`unsupported_reason`.
    """
    if not params:
        return
    used = (grad_avgs if hp.centered else [], momentum_buffers if hp.momentum > 0 else [])
    lists = (params, grads, square_avgs, *used, state_steps)
    for (device, _, _), positions in _split_by_device_and_dtype(params, state_steps):

        def chosen(tensors: list[Tensor]) -> list[Tensor]:
            return tensors if positions is None or not tensors else [tensors[i] for i in positions]

        _BACKENDS[device.type](tuple(map(chosen, lists)), hp)


# (params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps) of one kernel call;
# grad_avgs and momentum_buffers are empty where the rule does not use them.
TensorLists = tuple[list[Tensor], ...]


def _run_cpu(lists: TensorLists, hp: Hyperparameters) -> None:
    """One CPU kernel call over tensors of one dtype and step dtype (see :func:`rmsprop.backends.cpu.kernel.step`)."""
    cpu_kernel.step(*lists, hp)


def _run_triton(lists: TensorLists, hp: Hyperparameters) -> None:
    """One Triton launch (see :func:`rmsprop.backends.triton_kernel.rmsprop_step`)."""
    _triton_kernels().rmsprop_step(*lists, hp, float(hp.lr))
    torch.autograd.graph.increment_version(lists[0])


# The kernel for each device type that unsupported_reason accepts.
_BACKENDS: dict[str, Callable[[TensorLists, Hyperparameters], None]] = {"cpu": _run_cpu, "cuda": _run_triton}


def encoded_unsupported_reason(p: Tensor, state: dict, fmt: str) -> str | None:
    """Why :func:`fused_rmsprop_encoded` cannot step ``p`` with its ``state`` stored as ``fmt``
    (``"wide"``, ``"bf16"`` or ``"8bit"``), or ``None`` if it can."""
    reason = unsupported_dtype_or_layout(p, "the parameter") or unsupported_dtype_or_layout(p.grad, "its gradient")
    if reason is not None:
        return reason
    if p.grad.dtype != p.dtype or p.grad.shape != p.shape:
        return f"the gradient is {p.grad.dtype} of shape {tuple(p.grad.shape)}, the parameter {p.dtype} of shape {tuple(p.shape)}"
    if fmt != "wide" and p.dtype not in _REAL_DTYPES:
        return f"the parameter is {p.dtype}; low-precision state is fused for float32, float64, bfloat16 and float16"
    if not _step_fits(state["step"]):
        return "its 'step' is not a 1-element float32 or float64 CPU tensor"
    for key in stored_keys(state):
        expected = _STATE_DTYPES.get(fmt, torch.float32 if p.dtype in _HALF else p.dtype)
        reason = _unsupported_entry(state[key], key, expected, p.shape, p.device)
        if reason is None and fmt == "8bit":
            absmax_shape = (num_blocks(p.numel()),)
            reason = _unsupported_entry(state[key + "_absmax"], key + "_absmax", torch.float32, absmax_shape, p.device)
        if reason is not None:
            return reason
    return missing_backend(p.device)


def encoded_all_supported(params: list[Tensor], states: list[dict], fmt: str) -> bool:
    """Whether :func:`encoded_unsupported_reason` finds nothing for any of these params, all with
    state stored as ``fmt`` under the same keys: its checks, one C-level pass per property."""
    grads = [p.grad for p in params]
    if not (params and all(map(_all_plain_strided_contiguous, (params, grads)))):
        return False
    dtypes, shapes, devices = list(map(_DTYPE, params)), list(map(_SHAPE, params)), list(map(_DEVICE, params))
    if list(map(_DTYPE, grads)) != dtypes or list(map(_SHAPE, grads)) != shapes or len(set(devices)) != 1:
        return False
    if not set(dtypes) <= (_REAL_DTYPES if fmt != "wide" else _SUPPORTED_DTYPES):
        return False
    if not _all_steps_fit([state["step"] for state in states]):
        return False
    expected = [_STATE_DTYPES.get(fmt, torch.float32 if dtype in _HALF else dtype) for dtype in dtypes]
    blocks = [(num_blocks(p.numel()),) for p in params] if fmt == "8bit" else None
    for key in stored_keys(states[0]):
        entries = [(key, expected, shapes)] + ([(key + "_absmax", [torch.float32] * len(params), blocks)] if blocks else [])
        for name, entry_dtypes, entry_shapes in entries:
            tensors = [state[name] for state in states]
            if not (
                _all_plain_strided_contiguous(tensors)
                and list(map(_DTYPE, tensors)) == entry_dtypes
                and list(map(_SHAPE, tensors)) == entry_shapes
                and set(map(_DEVICE, tensors)) == set(devices)
            ):
                return False
    return missing_backend(devices[0]) is None


_HALF = (torch.bfloat16, torch.float16)
# The dtype of a stored buffer, for the formats whose dtype does not depend on the parameter's.
_STATE_DTYPES = {"bf16": torch.bfloat16, "8bit": torch.uint8}


def _unsupported_entry(tensor: Tensor, key: str, dtype: torch.dtype, shape: tuple, device: torch.device) -> str | None:
    if type(tensor) not in _PLAIN_TYPES or tensor.device != device or tensor.layout != torch.strided:
        return f"its {key!r} is not a plain tensor on the parameter's device ({device})"
    if tensor.dtype != dtype or tensor.shape != shape:
        return f"its {key!r} is {tensor.dtype} of shape {tuple(tensor.shape)}, not {dtype} of shape {tuple(shape)}"
    if not tensor.is_contiguous():
        return f"its {key!r} is not contiguous"
    return None


def fused_rmsprop_encoded(
    params: list[Tensor], states: list[dict], formats: list[str], param_indices: list[int], hp: Hyperparameters
) -> None:
    """One RMSProp step of ``params`` whose state is stored as ``formats`` (see :func:`encoded_unsupported_reason`),
    with every buffer the settings use and no other; ``param_indices`` seed the rounding noise.

    State of the parameter's own dtype (``"wide"`` state of float32, float64
    and complex parameters) goes to :func:`fused_rmsprop`; the rest to one
    kernel call per device, parameter dtype, format and step dtype.
    """
    if not params:
        return
    full = [i for i, (p, fmt) in enumerate(zip(params, formats, strict=True)) if fmt == "wide" and p.dtype not in _HALF]
    if full:
        chosen = [states[i] for i in full]
        fused_rmsprop(
            [params[i] for i in full],
            [params[i].grad for i in full],
            [state["square_avg"] for state in chosen],
            [state["grad_avg"] for state in chosen] if hp.centered else [],
            [state["momentum_buffer"] for state in chosen] if hp.momentum > 0 else [],
            [state["step"] for state in chosen],
            hp,
        )
    encoded = sorted(set(range(len(params))) - set(full))
    # "wide" state of a 16-bit parameter is float32.
    kinds = [
        (params[i].device, params[i].dtype, "float32" if formats[i] == "wide" else formats[i], states[i]["step"].dtype)
        for i in encoded
    ]
    for kind in dict.fromkeys(kinds):
        chosen = [i for i, other in zip(encoded, kinds, strict=True) if other == kind]
        _ENCODED_BACKENDS[kind[0].type](
            [params[i] for i in chosen], [states[i] for i in chosen], kind[2], [param_indices[i] for i in chosen], hp
        )


def _run_cpu_encoded(params: list[Tensor], states: list[dict], fmt: str, param_indices: list[int], hp: Hyperparameters) -> None:
    """See :func:`rmsprop.backends.cpu.kernel.step_encoded`."""
    cpu_kernel.step_encoded(params, states, fmt, param_indices, hp)


def _run_triton_encoded(params: list[Tensor], states: list[dict], fmt: str, param_indices: list[int], hp: Hyperparameters) -> None:
    """See :func:`rmsprop.backends.triton_kernel.step_encoded`."""
    _triton_kernels().step_encoded(params, states, fmt, param_indices, hp)


# The low-precision kernel for each device type that encoded_unsupported_reason accepts.
_ENCODED_BACKENDS: dict[str, Callable[[list[Tensor], list[dict], str, list[int], Hyperparameters], None]] = {
    "cpu": _run_cpu_encoded,
    "cuda": _run_triton_encoded,
}


def _split_by_device_and_dtype(params: list[Tensor], state_steps: list[Tensor]) -> list[tuple[tuple, list[int] | None]]:
    """((device, parameter dtype, step dtype), positions) for each kernel call; ``None`` means all."""
    kinds = (set(map(_DEVICE, params)), set(map(_DTYPE, params)), set(map(_DTYPE, state_steps)))
    if all(len(kind) == 1 for kind in kinds):
        return [(tuple(kind.pop() for kind in kinds), None)]
    positions: dict[tuple, list[int]] = {}
    for i, kind in enumerate(zip(map(_DEVICE, params), map(_DTYPE, params), map(_DTYPE, state_steps), strict=True)):
        positions.setdefault(kind, []).append(i)
    return list(positions.items())
