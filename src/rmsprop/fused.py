r"""The fused CPU path: the whole RMSProp step in one pass over memory.

The for-loop and foreach paths of :mod:`rmsprop.functional` make one pass
over memory per tensor operation (5 to 9 per step) and allocate temporaries.
Here one numba kernel (:mod:`rmsprop._numba_kernels`) reads each element of
``p``, ``g``, ``v`` (and ``m``, ``b`` where used) once, applies the whole rule
of :mod:`rmsprop.functional` in registers and writes ``p``, ``v`` (``m``,
``b``) back: a plain fp32 step moves 20 bytes per parameter, the minimum.
All the tensors of a step go to one kernel call, spread over numba's threads.

Elements are computed in float32 (float64 for float64 tensors), so results
equal the for-loop path within that type's rounding, not bit for bit: torch
rounds every intermediate tensor to the parameter's dtype, uses fused
multiply-adds in some kernels (``add`` with ``alpha``, ``addcmul``, ``lerp``)
and, on this AVX512 CPU, a float32 ``sqrt`` that is not correctly rounded
(20% of its results on uniform inputs in [0.1, 1.1) differed by an ulp from
IEEE ``sqrt``, which numba uses). ``fused=False`` keeps torch's numbers bit
for bit.

Supported: dense contiguous CPU tensors of float32, float64, bfloat16, float16,
complex64 or complex128 (as pairs of reals), parameter, gradient and state of
one dtype, with every flag of the rule. :func:`unsupported_reason` says why
other inputs are not; the optimizer then falls back to the other paths.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from operator import attrgetter
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from rmsprop.functional import Hyperparameters

__all__ = [
    "KernelCall",
    "fused_rmsprop",
    "kernel_calls",
    "kernel_scalars",
    "launch",
    "numba_available",
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
_DTYPE, _SHAPE, _LAYOUT, _IS_CPU = (attrgetter(name) for name in ("dtype", "shape", "layout", "is_cpu"))


@cache
def numba_available() -> bool:
    """Whether numba can be imported (checked without importing it)."""
    return importlib.util.find_spec("numba") is not None


@cache
def _kernels() -> ModuleType:
    """The numba kernels, imported on the first fused step (importing numba takes ~1 s)."""
    from rmsprop import _numba_kernels

    return _numba_kernels


def unsupported_dtype_or_layout(tensor: Tensor, what: str) -> str | None:
    """Why the fused kernel cannot update ``tensor`` in place, or ``None`` if it can."""
    if type(tensor) not in _PLAIN_TYPES:
        return f"{what} is a {type(tensor).__name__}, not a plain tensor"
    if tensor.device.type != "cpu":
        return f"{what} is on {tensor.device}; the fused path runs on CPU tensors"
    if tensor.layout != torch.strided:
        return f"{what} has layout {tensor.layout}, not torch.strided"
    if tensor.dtype not in _SUPPORTED_DTYPES:
        return f"{what} has dtype {tensor.dtype}; supported: float32, float64, bfloat16, float16, complex64, complex128"
    if not tensor.is_contiguous():
        return f"{what} is not contiguous"
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

    The kernel writes through raw pointers, so every tensor is checked: its
    device, layout, dtype, contiguity and shape. The optimizer calls this on a
    group's first fused step and after any change :mod:`rmsprop.fused_cache`
    sees; in between, that module checks the new gradients and that nothing
    else changed.
    """
    if not numba_available():
        return "numba is not installed"
    if differentiable:
        return "differentiable=True needs autograd through the step"
    if capturable:
        return "capturable=True is for graph capture on accelerators"
    buffers = {"gradient": grads, "'square_avg'": square_avgs}
    if grad_avgs:
        buffers["'grad_avg'"] = grad_avgs
    if momentum_buffers:
        buffers["'momentum_buffer'"] = momentum_buffers
    if _all_supported(params, list(buffers.values()), state_steps):
        return None
    return _first_unsupported(params, buffers, state_steps)


def _all_supported(params: list[Tensor], buffers: list[list[Tensor]], state_steps: list[Tensor]) -> bool:
    """The check of :func:`unsupported_reason`, one C-level pass per property (~1 us per parameter)."""
    for tensors in (params, *buffers):
        if not (
            set(map(type, tensors)) <= _PLAIN_TYPES
            and all(map(_IS_CPU, tensors))
            and set(map(_LAYOUT, tensors)) <= {torch.strided}
            and all(map(Tensor.is_contiguous, tensors))
        ):
            return False
    dtypes, shapes = list(map(_DTYPE, params)), list(map(_SHAPE, params))
    if not set(dtypes) <= _SUPPORTED_DTYPES:
        return False
    if any(list(map(_DTYPE, tensors)) != dtypes or list(map(_SHAPE, tensors)) != shapes for tensors in buffers):
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
            reason = reason or unsupported_dtype_or_layout(tensor, f"the {what} of parameter {i}")
        step = state_steps[i]
        if reason is None and not (step.device.type == "cpu" and step.dtype in _STEP_TYPES and step.numel() == 1):
            reason = f"the 'step' of parameter {i} is not a 1-element float32 or float64 CPU tensor"
        if reason is not None:
            return reason
    return None


class KernelCall(NamedTuple):
    """One kernel launch: the tensors of one (parameter dtype, step dtype) pair, as addresses.

    Everything but the gradients' addresses, so that a group whose tensors
    have not changed can launch again with new gradients (see
    :mod:`rmsprop.fused_cache`).
    """

    positions: list[int] | None  # of the step's tensors; None: all of them
    storage: type  # numpy type the kernel sees the elements as
    compute: type  # numpy type the rule is computed in
    step_type: type  # numpy type of the 'step' tensors
    sizes: np.ndarray  # elements per tensor (complex: twice the numel)
    params: np.ndarray
    square_avgs: np.ndarray
    grad_avgs: np.ndarray | None
    momentum_buffers: np.ndarray | None
    steps: np.ndarray


def kernel_calls(
    params: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
) -> list[KernelCall]:
    """The kernel launches that step these tensors: one per dtype pair.

    ``grad_avgs`` and ``momentum_buffers`` are empty where the rule does not
    use them. The inputs must pass :func:`unsupported_reason`.
    """
    calls = []
    for (dtype, step_dtype), positions in _split_by_dtype(params, state_steps):

        def addresses(tensors: list[Tensor]) -> np.ndarray | None:
            if not tensors:
                return None
            chosen = tensors if positions is None else [tensors[i] for i in positions]
            return np.fromiter(map(Tensor.data_ptr, chosen), np.int64, len(chosen))

        chosen_params = params if positions is None else [params[i] for i in positions]
        # Complex tensors are updated as pairs of reals, like the for-loop path.
        sizes = np.fromiter(map(Tensor.numel, chosen_params), np.int64, len(chosen_params))
        storage, compute = _KERNEL_TYPES[_REAL_OF_COMPLEX.get(dtype, dtype)]
        calls.append(
            KernelCall(
                positions,
                storage,
                compute,
                _STEP_TYPES[step_dtype],
                sizes * (2 if dtype.is_complex else 1),
                addresses(params),
                addresses(square_avgs),
                addresses(grad_avgs),
                addresses(momentum_buffers),
                addresses(state_steps),
            )
        )
    return calls


def fused_rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
) -> None:
    """Apply one RMSProp step in place, in one kernel call per dtype.

    Same contract as :func:`rmsprop.functional.rmsprop`; the inputs must pass
    :func:`unsupported_reason`.
    """
    if params:
        calls = kernel_calls(
            params, square_avgs, grad_avgs if hp.centered else [], momentum_buffers if hp.momentum > 0 else [], state_steps
        )
        launch(calls, params, grads, hp)


def launch(calls: list[KernelCall], params: list[Tensor], grads: list[Tensor], hp: Hyperparameters) -> None:
    """Run ``calls`` (from :func:`kernel_calls` on ``params`` and their state) with these gradients."""
    kernels = _kernels()
    _match_torch_threads()
    lr = float(hp.lr)
    for call in calls:
        chosen = grads if call.positions is None else [grads[i] for i in call.positions]
        kernels.rmsprop_step(
            call.params,
            np.fromiter(map(Tensor.data_ptr, chosen), np.int64, len(chosen)),
            call.square_avgs,
            call.grad_avgs,
            call.momentum_buffers,
            call.sizes,
            call.steps,
            np.empty(0, call.storage),
            np.empty(0, call.step_type),
            kernel_scalars(hp, lr, call.compute),
            float(hp.alpha),
            hp.weight_decay != 0 and not hp.decoupled_weight_decay,
            hp.bias_correction,
            hp.nesterov,
            hp.lr_in_momentum,
        )
    # Writes through raw pointers are invisible to autograd's check that saved tensors are unchanged.
    torch.autograd.graph.increment_version(params)


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


def _split_by_dtype(params: list[Tensor], state_steps: list[Tensor]) -> list[tuple[tuple, list[int] | None]]:
    """((parameter dtype, step dtype), positions) for each kernel call; ``None`` means all."""
    param_dtypes, step_dtypes = set(map(_DTYPE, params)), set(map(_DTYPE, state_steps))
    if len(param_dtypes) == len(step_dtypes) == 1:
        return [((param_dtypes.pop(), step_dtypes.pop()), None)]
    kinds = list(zip(map(_DTYPE, params), map(_DTYPE, state_steps), strict=True))
    positions: dict[tuple, list[int]] = {}
    for i, kind in enumerate(kinds):
        positions.setdefault(kind, []).append(i)
    return list(positions.items())


def _match_torch_threads() -> None:
    """Use as many threads as torch does (``torch.set_num_threads``), within numba's pool."""
    import numba

    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
