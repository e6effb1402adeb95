r"""The Triton kernel of the fused CUDA path: the whole RMSProp step in one pass over memory.

Imported lazily by :mod:`rmsprop.backends.fused` on the first fused step on CUDA
tensors. It is the GPU twin of the CPU kernel (:mod:`rmsprop.backends.cpu.kernel`): the same rule,
every flag, each element of ``p``, ``g``, ``v`` (and ``m``, ``b`` where used)
read once and written once. The flags are ``tl.constexpr``, so each
combination compiles to straight-line code without the others' branches.

One launch updates every tensor of one dtype on one device, however many:
with hundreds of tensors, one launch each would cost more than the work. The
tensors reach the kernel as raw addresses in one int64 table, copied to the
device once per step from pinned memory (queued on the stream: no host sync)::

    [0, NUM_SCALARS)              the rule's numbers (float64)
    then TENSOR_FIELDS per tensor addresses of p, g, v, m, b; element count;
                                  1 - alpha^t (float64)
    then 2 per program            tensor index, first element of its chunk

The kernel gets the table twice, as int64 and as float64, and reads each
entry through the pointer of its type.

Each program updates one chunk of at most ``BLOCK * BLOCKS_PER_CHUNK`` elements of one tensor.
The 0-dim ``step`` tensors stay on the CPU, as torch keeps them without
``capturable``: they are incremented there and ``1 - alpha^t`` goes into the
table, so the step never waits for the GPU.

Elements are computed in float32 (float64 for float64 tensors) with
correctly rounded division and square root (``div_rn``, ``sqrt_rn``; Triton's
float32 ``/`` and ``sqrt`` are approximate on GPUs), as the CPU kernel
computes. bfloat16 travels as its 16-bit pattern and is rounded to nearest
even with integer operations, as torch rounds: Triton's interpreter, which
runs this kernel on CPU tensors in the tests (``TRITON_INTERPRET=1``),
truncates a plain float32 to bfloat16 cast, so the bits would differ between
the tests and a GPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from rmsprop.core.hyperparameters import Hyperparameters

__all__ = ["BLOCK", "BLOCKS_PER_CHUNK", "rmsprop_step"]

# Elements per program: BLOCK at a time, BLOCKS_PER_CHUNK times. A 32M-element
# tensor makes 8192 programs, enough to fill any GPU.
BLOCK = 1024
BLOCKS_PER_CHUNK = 4

# Positions in the table (see the module docstring); constexpr so that the kernel may read them.
LR, ALPHA, RATE, EPS, WEIGHT_DECAY, DECAY_FACTOR, MOMENTUM = (tl.constexpr(i) for i in range(7))
NUM_SCALARS = tl.constexpr(7)
P, G, V, M, B, NUMEL, CORRECTION = (tl.constexpr(i) for i in range(7))
TENSOR_FIELDS = tl.constexpr(7)

# Parameter dtype -> (type stored in memory, type computed in). Complex tensors are pairs of reals.
_TYPES = {
    torch.float32: (tl.float32, tl.float32),
    torch.float64: (tl.float64, tl.float64),
    torch.bfloat16: (tl.uint16, tl.float32),
    torch.float16: (tl.float16, tl.float32),
    torch.complex64: (tl.float32, tl.float32),
    torch.complex128: (tl.float64, tl.float64),
}


@triton.jit
def _div(numerator, denominator, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return numerator / denominator  # float64 division is correctly rounded
    else:
        return tl.div_rn(numerator, denominator)


@triton.jit
def _sqrt(value, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return tl.sqrt(value)  # float64 sqrt is correctly rounded
    else:
        return tl.sqrt_rn(value)


@triton.jit
def _widen(stored, STORAGE: tl.constexpr, COMPUTE: tl.constexpr):
    """The stored element as the type it is computed in."""
    if STORAGE == tl.uint16:  # bfloat16 bits: the upper half of a float32
        return (stored.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return stored.to(COMPUTE)


@triton.jit
def _narrow(value, STORAGE: tl.constexpr):
    """``value`` rounded to nearest even into the storage type."""
    if STORAGE == tl.uint16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN as torch's round_to_nearest_even writes it.
        return tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)
    else:
        return value.to(STORAGE)


@triton.jit
def _rmsprop_kernel(
    table,
    numbers,
    chunks_at,
    STORAGE: tl.constexpr,
    COMPUTE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    COUPLED_WEIGHT_DECAY: tl.constexpr,
    DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    CENTERED: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
    EPS_IN_SQRT: tl.constexpr,
    MOMENTUM_BUFFER: tl.constexpr,
    NESTEROV: tl.constexpr,
    LR_IN_MOMENTUM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """One chunk of one tensor: the rule of :mod:`rmsprop.core.functional`, in place."""
    program = tl.program_id(0).to(tl.int64)
    tensor = tl.load(table + chunks_at + 2 * program)
    first = tl.load(table + chunks_at + 2 * program + 1)
    # Rounded from float64 to the compute type, like the for-loop path's Python floats.
    lr = tl.load(numbers + LR).to(COMPUTE)
    alpha = tl.load(numbers + ALPHA).to(COMPUTE)
    rate = tl.load(numbers + RATE).to(COMPUTE)
    eps = tl.load(numbers + EPS).to(COMPUTE)
    weight_decay = tl.load(numbers + WEIGHT_DECAY).to(COMPUTE)
    decay_factor = tl.load(numbers + DECAY_FACTOR).to(COMPUTE)
    momentum = tl.load(numbers + MOMENTUM).to(COMPUTE)

    at = NUM_SCALARS + TENSOR_FIELDS * tensor
    fields = table + at
    pointer = tl.pointer_type(STORAGE)
    p_ptr = tl.load(fields + P).to(pointer)
    g_ptr = tl.load(fields + G).to(pointer)
    v_ptr = tl.load(fields + V).to(pointer)
    m_ptr = tl.load(fields + M).to(pointer)
    b_ptr = tl.load(fields + B).to(pointer)
    numel = tl.load(fields + NUMEL)
    correction = tl.load(numbers + at + CORRECTION).to(COMPUTE)

    for block in tl.static_range(BLOCKS):
        offsets = first + block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < numel
        p = _widen(tl.load(p_ptr + offsets, mask=mask), STORAGE, COMPUTE)
        g = _widen(tl.load(g_ptr + offsets, mask=mask), STORAGE, COMPUTE)
        if MAXIMIZE:
            g = -g
        if DECOUPLED_WEIGHT_DECAY:
            p = p * decay_factor
        if COUPLED_WEIGHT_DECAY:
            g = g + weight_decay * p
        v = alpha * _widen(tl.load(v_ptr + offsets, mask=mask), STORAGE, COMPUTE) + rate * (g * g)
        tl.store(v_ptr + offsets, _narrow(v, STORAGE), mask=mask)
        second_moment = v
        if BIAS_CORRECTION:
            second_moment = _div(v, correction, COMPUTE)
        if CENTERED:
            m = _widen(tl.load(m_ptr + offsets, mask=mask), STORAGE, COMPUTE)
            m = m + rate * (g - m)
            tl.store(m_ptr + offsets, _narrow(m, STORAGE), mask=mask)
            mean = m
            if BIAS_CORRECTION:
                mean = _div(m, correction, COMPUTE)
            second_moment = second_moment - mean * mean
            # NaN stays NaN, as with torch's clamp_min.
            second_moment = tl.where(second_moment < 0, 0.0, second_moment)
        if EPS_IN_SQRT:
            u = _div(g, _sqrt(second_moment + eps, COMPUTE), COMPUTE)
        else:
            u = _div(g, _sqrt(second_moment, COMPUTE) + eps, COMPUTE)
        if MOMENTUM_BUFFER:
            b = momentum * _widen(tl.load(b_ptr + offsets, mask=mask), STORAGE, COMPUTE)
            if LR_IN_MOMENTUM:
                b = b + lr * u
                update = momentum * b + lr * u if NESTEROV else b
            else:
                b = b + u
                update = lr * (u + momentum * b) if NESTEROV else lr * b
            tl.store(b_ptr + offsets, _narrow(b, STORAGE), mask=mask)
        else:
            update = lr * u
        tl.store(p_ptr + offsets, _narrow(p - update, STORAGE), mask=mask)


def rmsprop_step(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    lr: float,
    *,
    block: int = BLOCK,
    blocks_per_chunk: int = BLOCKS_PER_CHUNK,
) -> None:
    """One RMSProp step, in place, in one launch, over tensors of one dtype on one device.

    The inputs must pass :func:`rmsprop.backends.fused.unsupported_reason`; the
    ``state_steps`` (CPU, one dtype) are incremented. Each program updates
    ``block * blocks_per_chunk`` elements. Under ``TRITON_INTERPRET=1`` the
    tensors may be CPU tensors.
    """
    torch._foreach_add_(state_steps, 1)
    if hp.bias_correction:
        # In float64, then rounded to the compute type in the kernel, like the for-loop path.
        corrections = 1.0 - hp.alpha ** torch.stack(state_steps).double().numpy()
    else:
        corrections = np.ones(len(params))
    # Complex tensors are updated as pairs of reals, like the for-loop path.
    sizes = np.fromiter(map(Tensor.numel, params), np.int64, len(params)) * (2 if params[0].is_complex() else 1)
    chunk = block * blocks_per_chunk
    chunk_counts = -(-sizes // chunk)
    if not chunk_counts.sum():
        return
    table = torch.from_numpy(
        _table(hp, lr, params, grads, square_avgs, grad_avgs, momentum_buffers, sizes, corrections, chunk, chunk_counts)
    )
    device = params[0].device
    if device.type == "cuda":
        # From pinned memory without blocking: a plain copy would wait for the GPU's queue (the backward pass).
        table = table.pin_memory().to(device, non_blocking=True)
    chunks_at = NUM_SCALARS.value + TENSOR_FIELDS.value * len(params)
    storage, compute = _TYPES[params[0].dtype]
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _rmsprop_kernel[(int(chunk_counts.sum()),)](
            table,
            table.view(torch.float64),
            chunks_at,
            STORAGE=storage,
            COMPUTE=compute,
            MAXIMIZE=hp.maximize,
            COUPLED_WEIGHT_DECAY=hp.weight_decay != 0 and not hp.decoupled_weight_decay,
            DECOUPLED_WEIGHT_DECAY=hp.weight_decay != 0 and hp.decoupled_weight_decay,
            CENTERED=hp.centered,
            BIAS_CORRECTION=hp.bias_correction,
            EPS_IN_SQRT=hp.eps_in_sqrt,
            MOMENTUM_BUFFER=hp.momentum > 0,
            NESTEROV=hp.nesterov,
            LR_IN_MOMENTUM=hp.lr_in_momentum,
            BLOCK_SIZE=block,
            BLOCKS=blocks_per_chunk,
        )


def _table(
    hp: Hyperparameters,
    lr: float,
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    sizes: np.ndarray,
    corrections: np.ndarray,
    chunk: int,
    chunk_counts: np.ndarray,
) -> np.ndarray:
    """The kernel's int64 table (see the module docstring)."""
    scalars = np.array(
        [lr, hp.alpha, 1 - hp.alpha, hp.eps, hp.weight_decay, 1 - lr * hp.weight_decay, hp.momentum], np.float64
    )
    fields = np.zeros((len(params), TENSOR_FIELDS.value), np.int64)
    for column, tensors in ((P, params), (G, grads), (V, square_avgs), (M, grad_avgs), (B, momentum_buffers)):
        if tensors:  # absent state (no centered, no momentum) stays at address 0 and is never read
            fields[:, column.value] = list(map(Tensor.data_ptr, tensors))
    fields[:, NUMEL.value] = sizes
    fields[:, CORRECTION.value] = corrections.view(np.int64)
    owners = np.repeat(np.arange(len(params)), chunk_counts)
    # The first element of each chunk: its rank within its tensor, times the chunk size.
    firsts = (np.arange(owners.size) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)) * chunk
    chunks = np.stack([owners, firsts], axis=1)
    return np.concatenate([scalars.view(np.int64), fields.ravel(), chunks.ravel()])
