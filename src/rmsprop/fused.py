r"""The fused path: the whole RMSProp step in one pass over memory, on CPU or CUDA.

The for-loop and foreach paths of :mod:`rmsprop.functional` make one pass
over memory per tensor operation (5 to 9 per step) and allocate temporaries.
Here one kernel reads each element of ``p``, ``g``, ``v`` (and ``m``, ``b``
where used) once, applies the whole rule of :mod:`rmsprop.functional` in
registers and writes ``p``, ``v`` (``m``, ``b``) back: a plain fp32 step moves
20 bytes per parameter, the minimum. This module checks the tensors and picks
the kernel by device:

- CPU tensors: a C++ kernel (``csrc/fused_step.cpp``, built on first use by
  :mod:`rmsprop._cpp_kernels` and cached), all tensors in one call, chunks
  spread over torch's own intra-op threads. From a group's second step the
  optimizer hands it the group's params and state mapping, and it gathers
  and checks the gradients and buffers itself (0.1-0.5 us per param, against
  ~5 us per tensor in Python). Where no C++ compiler is at hand (or the
  build fails, with a warning), the numba kernel
  (:mod:`rmsprop._numba_kernels`, one call per dtype) takes its place; the
  two give the same results bit for bit.
- CUDA tensors: a Triton kernel (:mod:`rmsprop._triton_kernels`, one launch
  per dtype and device).

Each is imported (or built) on its first step.

Elements are computed in float32 (float64 for float64 tensors), so results
equal the for-loop path within that type's rounding, not bit for bit: torch
rounds every intermediate tensor to the parameter's dtype, uses fused
multiply-adds in some kernels (``add`` with ``alpha``, ``addcmul``, ``lerp``)
where the CPU kernels use them elsewhere (the C++ and numba kernels at the same
places, where the machine has them: the moving averages and the parameter
update) and, on this AVX512 CPU, a float32 ``sqrt`` that is not correctly rounded
(20% of its results on uniform inputs in [0.1, 1.1) differed by an ulp from
IEEE ``sqrt``, which the fused kernels use). ``fused=False`` keeps torch's
numbers bit for bit.

Supported: dense contiguous CPU tensors (with a C++ compiler or numba) or CUDA
tensors (with triton installed) of float32, float64, bfloat16, float16,
complex64 or complex128 (as pairs of reals), parameter, gradient and state of
one dtype on one device, steps on the CPU (as torch keeps them without
``capturable``), with every flag of the rule. The Triton kernel computes as
the numba kernel does (same types, correctly rounded division and square
root). :func:`unsupported_reason` says why other inputs are not; the
optimizer then falls back to the other paths.

Low-precision state (:mod:`rmsprop.state_precision`) has kernels of its own,
which decode the stored state, apply the same rule and encode it again in the
same pass (:func:`fused_rmsprop_encoded`): bfloat16 state element by element,
8-bit state block by block (decode with the map and absmax, update, reduce the
block's new absmax, encode). The rounding noise is
:func:`rmsprop.state_precision.rounding_bits`, counter-based, so the kernels
draw for each element the bits that the per-tensor path draws for it: the two
agree within float32 rounding, except where that rounding moves a value across
a stochastic rounding threshold (one code, or one bfloat16 ulp, in rare elements).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from functools import cache
from operator import attrgetter
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rmsprop import _cpp_kernels
from rmsprop.functional import Hyperparameters
from rmsprop.state_precision import SIGNED_MAP, UNSIGNED_MAP, interval_table, num_blocks, stored_keys

__all__ = [
    "cpu_hyperparameters",
    "cpu_kernel",
    "encoded_unsupported_reason",
    "fused_rmsprop",
    "fused_rmsprop_encoded",
    "kernel_scalars",
    "missing_backend",
    "numba_available",
    "triton_available",
    "unsupported_dtype_or_layout",
    "unsupported_reason",
]

# Tensor dtype -> (array type the kernel sees, type elements are computed in).
# bfloat16 and float16 travel as 16-bit integers (see rmsprop._numba_kernels).
_KERNEL_TYPES = {
    torch.float32: (np.float32, np.float32),
    torch.float64: (np.float64, np.float64),
    torch.bfloat16: (np.uint16, np.float32),
    torch.float16: (np.int16, np.float32),
}
_REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_STEP_TYPES = {torch.float32: np.float32, torch.float64: np.float64}
_SUPPORTED_DTYPES = _KERNEL_TYPES.keys() | _REAL_OF_COMPLEX.keys()
_PLAIN_TYPES = {Tensor, torch.nn.Parameter}
_DTYPE, _SHAPE, _LAYOUT, _IS_CPU, _DEVICE = (attrgetter(name) for name in ("dtype", "shape", "layout", "is_cpu", "device"))
_DEVICE_TYPES = {"cpu", "cuda"}


@cache
def numba_available() -> bool:
    """Whether numba can be imported (checked without importing it)."""
    return importlib.util.find_spec("numba") is not None


@cache
def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def missing_backend(device: torch.device) -> str | None:
    """Why the fused kernel for ``device`` cannot run here (its compiler is not installed), or ``None``."""
    if device.type == "cpu" and not numba_available():
        missing = _cpp_kernels.compiler_missing()
        if missing is not None:
            return f"{missing}, and numba (the other CPU kernel) is not installed"
    if device.type == "cuda" and not triton_available():
        return "triton is not installed (the fused path on CUDA tensors is a Triton kernel)"
    return None


@cache
def _kernels() -> ModuleType:
    """The numba kernels, imported on the first fused step (importing numba takes ~1 s)."""
    from rmsprop import _numba_kernels

    return _numba_kernels


@cache
def _triton_kernels() -> ModuleType:
    """The Triton kernel, imported on the first fused step on CUDA tensors."""
    from rmsprop import _triton_kernels

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
    group the C++ kernel's own gathering declined (its first step, or a change
    it cannot take); the C++ kernel's checks are the same.
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
    """The check of :func:`unsupported_reason`, one C-level pass per property (~1 us per parameter)."""
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
    return (
        set(map(_DTYPE, state_steps)) <= _STEP_TYPES.keys()
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
    return step.device.type == "cpu" and step.dtype in _STEP_TYPES and step.numel() == 1


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

    Same contract as :func:`rmsprop.functional.rmsprop`; the inputs must pass
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


def cpu_kernel() -> ModuleType | None:
    """The C++ kernel (:mod:`rmsprop._cpp_kernels`), built or loaded on first use; ``None`` where it cannot be built."""
    problem = _cpp_kernels.build_problem()
    if problem is not None:
        _warn_numba_fallback(problem)
        return None
    return _cpp_kernels.module()


@cache
def _warn_numba_fallback(reason: str) -> None:
    if numba_available():
        warnings.warn(f"rmsprop: {reason}; the fused CPU path uses its numba kernel instead", stacklevel=3)


def cpu_hyperparameters(kernel: ModuleType, hp: Hyperparameters) -> Any:
    """``hp`` as the C++ kernel takes it (a tensor lr as its value)."""
    return kernel.Hyperparameters(
        float(hp.lr),
        float(hp.alpha),
        float(hp.eps),
        float(hp.weight_decay),
        float(hp.momentum),
        hp.maximize,
        hp.eps_in_sqrt,
        hp.decoupled_weight_decay,
        hp.bias_correction,
        hp.nesterov,
        hp.lr_in_momentum,
    )


def _run_cpu(lists: TensorLists, hp: Hyperparameters) -> None:
    """The C++ kernel, or the numba kernel where no C++ compiler is at hand."""
    kernel = cpu_kernel()
    if kernel is None:
        _run_numba(lists, hp)
        return
    plan = kernel.gather_tensors(*lists)
    if isinstance(plan, str):
        raise RuntimeError(f"the fused CPU kernel cannot take these tensors: {plan}")
    kernel.run(plan, cpu_hyperparameters(kernel, hp))


def _run_numba(lists: TensorLists, hp: Hyperparameters) -> None:
    """One numba kernel call over CPU tensors of one dtype (see :func:`rmsprop._numba_kernels.rmsprop_step`)."""
    if not numba_available():
        raise RuntimeError(f"the fused CPU path has no kernel: {_cpp_kernels.build_problem()}, and numba is not installed")
    params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps = lists
    kernels = _kernels()
    _match_torch_threads()
    dtype = params[0].dtype
    storage, compute = _KERNEL_TYPES[_REAL_OF_COMPLEX.get(dtype, dtype)]
    # Complex tensors are updated as pairs of reals, like the for-loop path.
    sizes = np.fromiter(map(Tensor.numel, params), np.int64, len(params)) * (2 if dtype.is_complex else 1)
    kernels.rmsprop_step(
        _addresses(params),
        _addresses(grads),
        _addresses(square_avgs),
        _addresses(grad_avgs) if grad_avgs else None,
        _addresses(momentum_buffers) if momentum_buffers else None,
        sizes,
        _addresses(state_steps),
        np.empty(0, storage),
        np.empty(0, _STEP_TYPES[state_steps[0].dtype]),
        kernel_scalars(hp, float(hp.lr), compute),
        *_kernel_flags(hp),
    )
    # Writes through raw pointers are invisible to autograd's check that saved tensors are unchanged.
    torch.autograd.graph.increment_version(params)


def _kernel_flags(hp: Hyperparameters) -> tuple[float, bool, bool, bool, bool]:
    """The numba kernels' arguments after ``scalars``: alpha as a float64 (for the bias correction) and the flags."""
    return (
        float(hp.alpha),
        hp.weight_decay != 0 and not hp.decoupled_weight_decay,
        hp.bias_correction,
        hp.nesterov,
        hp.lr_in_momentum,
    )


def _addresses(tensors: list[Tensor]) -> np.ndarray:
    return np.fromiter(map(Tensor.data_ptr, tensors), np.int64, len(tensors))


def _run_triton(lists: TensorLists, hp: Hyperparameters) -> None:
    """One Triton launch (see :func:`rmsprop._triton_kernels.rmsprop_step`)."""
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
    if fmt != "wide" and p.dtype not in _KERNEL_TYPES:
        return f"the parameter is {p.dtype}; low-precision state is fused for float32, float64, bfloat16 and float16"
    if not _step_fits(state["step"]):
        return "its 'step' is not a 1-element float32 or float64 CPU tensor"
    for key in stored_keys(state):
        expected = _STATE_DTYPES.get(fmt, torch.float32 if p.dtype in _HALF else p.dtype)
        reason = _unsupported_entry(state[key], key, expected, p.shape)
        if reason is None and fmt == "8bit":
            reason = _unsupported_entry(state[key + "_absmax"], key + "_absmax", torch.float32, (num_blocks(p.numel()),))
        if reason is not None:
            return reason
    return None


_HALF = (torch.bfloat16, torch.float16)
# The dtype of a stored buffer, for the formats whose dtype does not depend on the parameter's.
_STATE_DTYPES = {"bf16": torch.bfloat16, "8bit": torch.uint8}


def _unsupported_entry(tensor: Tensor, key: str, dtype: torch.dtype, shape: tuple) -> str | None:
    if type(tensor) not in _PLAIN_TYPES or tensor.device.type != "cpu" or tensor.layout != torch.strided:
        return f"its {key!r} is not a plain CPU tensor"
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
    low-precision kernel call per kind of storage.
    """
    if not params:
        return
    kernels = _kernels()
    _match_torch_threads()
    lr = float(hp.lr)
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
    kinds = [(params[i].dtype, formats[i], states[i]["step"].dtype) for i in encoded]
    for dtype, fmt, step_dtype in set(kinds):
        chosen = [i for i, kind in zip(encoded, kinds, strict=True) if kind == (dtype, fmt, step_dtype)]

        def addresses(key: str) -> np.ndarray | None:
            if (key == "grad_avg" and not hp.centered) or (key == "momentum_buffer" and hp.momentum == 0):
                return None
            return _addresses([states[i][key] for i in chosen])

        storage, compute = _KERNEL_TYPES[dtype]
        square_key = "grad_variance" if hp.centered and fmt != "wide" else "square_avg"
        chosen_params = [params[i] for i in chosen]
        common = (
            np.array([p.numel() for p in chosen_params], np.int64),
            addresses("step"),
            np.array([param_indices[i] for i in chosen], np.int64),
        )
        flags = _kernel_flags(hp)
        grads = _addresses([p.grad for p in chosen_params])
        param_addresses = _addresses(chosen_params)
        if fmt == "8bit":
            kernels.rmsprop_step_8bit(
                param_addresses,
                grads,
                addresses(square_key),
                addresses(square_key + "_absmax"),
                addresses("grad_avg"),
                addresses("grad_avg_absmax") if hp.centered else None,
                addresses("momentum_buffer"),
                addresses("momentum_buffer_absmax") if hp.momentum > 0 else None,
                *common,
                np.empty(0, storage),
                np.empty(0, _STEP_TYPES[step_dtype]),
                kernel_scalars(hp, lr, compute),
                *flags,
                *_MAPS["signed"],
                *_MAPS["unsigned"],
            )
        else:
            state_storage = np.uint16 if fmt == "bf16" else np.float32
            kernels.rmsprop_step_bf16(
                param_addresses,
                grads,
                addresses(square_key),
                addresses("grad_avg"),
                addresses("momentum_buffer"),
                *common,
                np.empty(0, storage),
                np.empty(0, state_storage),
                np.empty(0, _STEP_TYPES[step_dtype]),
                kernel_scalars(hp, lr, compute),
                *flags,
            )
    torch.autograd.graph.increment_version(params)


# Each map with the table of its code lookup.
_MAPS = {
    "signed": (SIGNED_MAP.numpy(), interval_table(SIGNED_MAP).numpy()),
    "unsigned": (UNSIGNED_MAP.numpy(), interval_table(UNSIGNED_MAP).numpy()),
}


def kernel_scalars(hp: Hyperparameters, lr: float, compute: type) -> np.ndarray:
    """The rule's numbers, in the order of ``_numba_kernels``'s indices, as the compute type.

    Options that only change numbers are folded into them, which keeps one
    kernel for them all without changing any result: the sign of the
    gradient (maximize), ``1 - lr*wd`` (1 without decoupled weight decay) and
    the eps added inside or outside the square root (0 for the other place).
    """
    kernels = _kernels()
    scalars = np.empty(kernels.NUM_SCALARS, compute)
    decoupled = hp.decoupled_weight_decay and hp.weight_decay != 0
    scalars[kernels.LR] = lr
    scalars[kernels.ALPHA] = hp.alpha
    scalars[kernels.RATE] = 1 - hp.alpha
    scalars[kernels.EPS_INSIDE] = hp.eps if hp.eps_in_sqrt else 0.0
    scalars[kernels.EPS_OUTSIDE] = 0.0 if hp.eps_in_sqrt else hp.eps
    scalars[kernels.WEIGHT_DECAY] = hp.weight_decay
    scalars[kernels.DECAY_FACTOR] = 1 - lr * hp.weight_decay if decoupled else 1.0
    scalars[kernels.MOMENTUM] = hp.momentum
    scalars[kernels.SIGN] = -1.0 if hp.maximize else 1.0
    return scalars


def _split_by_device_and_dtype(params: list[Tensor], state_steps: list[Tensor]) -> list[tuple[tuple, list[int] | None]]:
    """((device, parameter dtype, step dtype), positions) for each kernel call; ``None`` means all."""
    kinds = (set(map(_DEVICE, params)), set(map(_DTYPE, params)), set(map(_DTYPE, state_steps)))
    if all(len(kind) == 1 for kind in kinds):
        return [(tuple(kind.pop() for kind in kinds), None)]
    positions: dict[tuple, list[int]] = {}
    for i, kind in enumerate(zip(map(_DEVICE, params), map(_DTYPE, params), map(_DTYPE, state_steps), strict=True)):
        positions.setdefault(kind, []).append(i)
    return list(positions.items())


def _match_torch_threads() -> None:
    """Use as many threads as torch does (``torch.set_num_threads``), within numba's pool."""
    import numba

    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
