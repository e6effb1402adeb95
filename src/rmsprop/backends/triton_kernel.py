r"""The Triton kernel of the fused CUDA path: the whole RMSProp step in one pass over memory.

Imported lazily by :mod:`rmsprop.backends.fused` on the first fused step on CUDA
tensors. It is the GPU twin of the CPU kernel (:mod:`rmsprop.backends.cpu.kernel`): the same rule,
every flag, each element of ``p``, ``g``, ``v`` (and ``m``, ``b`` where used)
read once and written once. The flags are the bits of one ``tl.constexpr``
(``VARIANT``), so each combination compiles to straight-line code without the
others' branches.

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

Low-precision state (:mod:`rmsprop.formats`: bfloat16, 8-bit blocks, or
float32 beside a 16-bit parameter) takes a second kernel,
:func:`step_encoded`, with the same rule (:func:`_rule`, which both kernels
call): each program decodes whole blocks of 256 elements, applies the rule,
and encodes them again with the noise of
:func:`rmsprop.formats.noise.rounding_noise`, drawn in the kernel from the
seeds computed here. Its table has the same sections, with
``ENCODED_FIELDS`` per tensor (the fields of the ``E_*`` positions).
The design: docs/design/triton-kernel.md.
"""

from __future__ import annotations

import contextlib
from functools import cache

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from rmsprop.core.hyperparameters import Hyperparameters, KernelScalars
from rmsprop.formats.layout import BLOCK_SIZE
from rmsprop.formats.maps import SIGNED_MAP, UNSIGNED_MAP
from rmsprop.formats.noise import HASH_MULTIPLIER_1, HASH_MULTIPLIER_2, NOISE_BITS, rounding_seed

__all__ = ["BLOCK", "BLOCKS_PER_CHUNK", "BLOCKS_PER_PROGRAM", "rmsprop_step", "step_encoded"]

# Elements per program: BLOCK at a time, BLOCKS_PER_CHUNK times. A 32M-element
# tensor makes 8192 programs, enough to fill any GPU.
BLOCK = 1024
BLOCKS_PER_CHUNK = 4
# 8-bit blocks (of BLOCK_SIZE elements) per program of step_encoded, as the rows of one tile.
BLOCKS_PER_PROGRAM = 4

# Positions in the table (see the module docstring); constexpr so that the kernel may read them.
# The table starts with the shared packing of the rule's numbers (KernelScalars), as float64.
LR, ALPHA, RATE, EPS_INSIDE, EPS_OUTSIDE, WEIGHT_DECAY, DECAY_FACTOR, MOMENTUM = (
    tl.constexpr(KernelScalars._fields.index(name))
    for name in ("lr", "alpha", "rate", "eps_inside", "eps_outside", "weight_decay", "decay_factor", "momentum")
)
NUM_SCALARS = tl.constexpr(len(KernelScalars._fields))
P, G, V, M, B, NUMEL, CORRECTION = (tl.constexpr(i) for i in range(7))
TENSOR_FIELDS = tl.constexpr(7)
# The fields of a tensor of step_encoded: addresses of the parameter, its gradient, each buffer and
# its absmax (8-bit); element count; 1 - alpha^t, and the weights of m^2 in the variance before and
# after the step (float64); the noise seed of each buffer (uint64 bits).
(
    E_P, E_G, E_V, E_V_ABSMAX, E_M, E_M_ABSMAX, E_B, E_B_ABSMAX, E_NUMEL, E_CORRECTION, E_WEIGHT_BEFORE,
    E_WEIGHT_AFTER, E_V_SEED, E_M_SEED, E_B_SEED,
) = (tl.constexpr(i) for i in range(15))
ENCODED_FIELDS = tl.constexpr(15)

# The rule's flags: bits of the kernels' VARIANT, a constexpr, so that each combination compiles
# to straight-line code without the others' branches.
(
    MAXIMIZE, COUPLED_WEIGHT_DECAY, DECOUPLED_WEIGHT_DECAY, CENTERED, BIAS_CORRECTION, EPS_IN_SQRT, MOMENTUM_BUFFER,
    NESTEROV, LR_IN_MOMENTUM,
) = (tl.constexpr(1 << i) for i in range(9))

# State formats of step_encoded, as the kernel's STATE.
FLOAT32_STATE, BF16_STATE, BLOCKWISE_STATE = (tl.constexpr(i) for i in range(3))
_STATES = {"float32": FLOAT32_STATE, "bf16": BF16_STATE, "8bit": BLOCKWISE_STATE}
_BLOCK_SIZE = tl.constexpr(BLOCK_SIZE)
_NOISE_BITS = tl.constexpr(NOISE_BITS)
_HASH_MULTIPLIER_1 = tl.constexpr(HASH_MULTIPLIER_1)
_HASH_MULTIPLIER_2 = tl.constexpr(HASH_MULTIPLIER_2)
# uniform_noise: 16 noise bits as a float32 in [0, 1).
_NOISE_SCALE = tl.constexpr(2.0**-NOISE_BITS)
# The absmax range whose reciprocal is a normal float (quantize_blockwise).
_SMALLEST_NORMAL = tl.constexpr(2.0**-126)
_LARGEST_UNSCALED = tl.constexpr(2.0**126)

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
        return (stored.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(COMPUTE)
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
def _clamp_to_zero(value):
    """``clamp_min(value, 0)``; NaN stays NaN, as with torch's clamp_min."""
    return tl.where(value < 0, 0.0, value)


@triton.jit
def _chunk(table, chunks_at, FIELDS: tl.constexpr):
    """This program's chunk: where its tensor's ``FIELDS`` fields start in the table, and its first element."""
    program = tl.program_id(0).to(tl.int64)
    tensor = tl.load(table + chunks_at + 2 * program)
    return NUM_SCALARS + FIELDS * tensor, tl.load(table + chunks_at + 2 * program + 1)


@triton.jit
def _scalars(numbers, COMPUTE: tl.constexpr):
    """The rule's numbers, rounded from float64 to the compute type like the for-loop path's Python floats."""
    return (
        tl.load(numbers + LR).to(COMPUTE),
        tl.load(numbers + ALPHA).to(COMPUTE),
        tl.load(numbers + RATE).to(COMPUTE),
        # One of the two is 0, as the place of eps is a flag: their sum is the other, exactly.
        (tl.load(numbers + EPS_INSIDE) + tl.load(numbers + EPS_OUTSIDE)).to(COMPUTE),
        tl.load(numbers + WEIGHT_DECAY).to(COMPUTE),
        tl.load(numbers + DECAY_FACTOR).to(COMPUTE),
        tl.load(numbers + MOMENTUM).to(COMPUTE),
    )


@triton.jit
def _rule(
    p,
    g,
    v,
    m,
    b,
    lr,
    alpha,
    rate,
    eps,
    weight_decay,
    decay_factor,
    momentum,
    correction,
    COMPUTE: tl.constexpr,
    VARIANT: tl.constexpr,
):
    """The rule of :mod:`rmsprop.core.functional` on elements of the compute type: the new ``p, v, m, b``
    (``m`` and ``b`` returned as given where the flags do not use them)."""
    if MAXIMIZE & VARIANT:
        g = -g
    if DECOUPLED_WEIGHT_DECAY & VARIANT:
        p = p * decay_factor
    if COUPLED_WEIGHT_DECAY & VARIANT:
        g = g + weight_decay * p
    v = alpha * v + rate * (g * g)
    second_moment = v
    if BIAS_CORRECTION & VARIANT:
        second_moment = _div(v, correction, COMPUTE)
    if CENTERED & VARIANT:
        m = m + rate * (g - m)
        mean = m
        if BIAS_CORRECTION & VARIANT:
            mean = _div(m, correction, COMPUTE)
        second_moment = _clamp_to_zero(second_moment - mean * mean)
    if EPS_IN_SQRT & VARIANT:
        u = _div(g, _sqrt(second_moment + eps, COMPUTE), COMPUTE)
    else:
        u = _div(g, _sqrt(second_moment, COMPUTE) + eps, COMPUTE)
    if MOMENTUM_BUFFER & VARIANT:
        b = momentum * b
        if LR_IN_MOMENTUM & VARIANT:
            b = b + lr * u
            update = momentum * b + lr * u if NESTEROV & VARIANT else b
        else:
            b = b + u
            update = lr * (u + momentum * b) if NESTEROV & VARIANT else lr * b
    else:
        update = lr * u
    return p - update, v, m, b


@triton.jit
def _rmsprop_kernel(
    table,
    numbers,
    chunks_at,
    STORAGE: tl.constexpr,
    COMPUTE: tl.constexpr,
    VARIANT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """One chunk of one tensor: the rule of :mod:`rmsprop.core.functional`, in place."""
    at, first = _chunk(table, chunks_at, TENSOR_FIELDS)
    fields = table + at
    lr, alpha, rate, eps, weight_decay, decay_factor, momentum = _scalars(numbers, COMPUTE)
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
        v = _widen(tl.load(v_ptr + offsets, mask=mask), STORAGE, COMPUTE)
        m = v  # read only where used
        if CENTERED & VARIANT:
            m = _widen(tl.load(m_ptr + offsets, mask=mask), STORAGE, COMPUTE)
        b = v
        if MOMENTUM_BUFFER & VARIANT:
            b = _widen(tl.load(b_ptr + offsets, mask=mask), STORAGE, COMPUTE)
        p, v, m, b = _rule(
            p, g, v, m, b, lr, alpha, rate, eps, weight_decay, decay_factor, momentum, correction, COMPUTE, VARIANT
        )
        tl.store(v_ptr + offsets, _narrow(v, STORAGE), mask=mask)
        if CENTERED & VARIANT:
            tl.store(m_ptr + offsets, _narrow(m, STORAGE), mask=mask)
        if MOMENTUM_BUFFER & VARIANT:
            tl.store(b_ptr + offsets, _narrow(b, STORAGE), mask=mask)
        tl.store(p_ptr + offsets, _narrow(p, STORAGE), mask=mask)


@triton.jit
def _noise(seed, offsets):
    """The 16 noise bits of each element (:func:`rmsprop.formats.noise.rounding_noise`): bits
    ``16 (i mod 2)`` and up of output ``i // 2`` of the hash stream of ``seed`` (uint64)."""
    index = offsets.to(tl.uint64)
    x = ((index >> 1) + (seed & 0xFFFFFFFF)).to(tl.uint32) ^ (seed >> 32).to(tl.uint32)
    x = (x ^ (x >> 16)) * _HASH_MULTIPLIER_1
    x = (x ^ (x >> 15)) * _HASH_MULTIPLIER_2
    x = x ^ (x >> 16)
    return (x >> ((index & 1) * _NOISE_BITS).to(tl.uint32)) & 0xFFFF


@triton.jit
def _lower_index(qmap, x):
    """``i`` in [0, 254] with ``qmap[i] < x <= qmap[i+1]``, or the nearest end (:func:`rmsprop.formats.maps.lower_index`).

    A binary search for the count of map values below ``x``: 8 loads from the 256-entry map.
    """
    below = tl.full(x.shape, 0, tl.int32)
    for level in tl.static_range(8):
        probe = below + (128 >> level)
        below = tl.where(tl.load(qmap + probe - 1) < x, probe, below)
    return tl.minimum(tl.maximum(below, 1), 255) - 1


@triton.jit
def _decode(address, absmax_address, offsets, mask, blocks, block_mask, qmap, STATE: tl.constexpr,
            ROOT: tl.constexpr, COMPUTE: tl.constexpr):
    """One buffer's elements as the compute type (:func:`rmsprop.formats.codecs.decode_state`)."""
    if STATE == FLOAT32_STATE:
        return tl.load(address.to(tl.pointer_type(tl.float32)) + offsets, mask=mask).to(COMPUTE)
    elif STATE == BF16_STATE:
        return _widen(tl.load(address.to(tl.pointer_type(tl.uint16)) + offsets, mask=mask), tl.uint16, COMPUTE)
    else:
        codes = tl.load(address.to(tl.pointer_type(tl.uint8)) + offsets, mask=mask, other=0)
        absmax = tl.load(absmax_address.to(tl.pointer_type(tl.float32)) + blocks, mask=block_mask, other=0.0)
        value = (tl.load(qmap + codes.to(tl.int32)) * absmax[:, None]).to(COMPUTE)
        if ROOT:
            value = value * value
        return value


@triton.jit
def _larger(a, b):
    # A combine function of this module: triton.language.standard (tl.max, tl.zeros) is defined when triton is
    # imported, before the tests' interpreter flag is set, and the interpreter cannot run it.
    return tl.maximum(a, b)


@triton.jit
def _encode(value, address, absmax_address, offsets, mask, blocks, block_mask, qmap, seed,
            STATE: tl.constexpr, ROOT: tl.constexpr, COMPUTE: tl.constexpr):
    """Store one buffer's new elements (:func:`rmsprop.formats.codecs.encode_state`); a tile's rows are
    whole 8-bit blocks."""
    if STATE == FLOAT32_STATE:
        tl.store(address.to(tl.pointer_type(tl.float32)) + offsets, value.to(tl.float32), mask=mask)
    elif STATE == BF16_STATE:
        # stochastic_round_bf16: the noise added to the 16 bits that the rounding drops.
        x = value.to(tl.float32)
        rounded = (x.to(tl.uint32, bitcast=True) + _noise(seed, offsets)) >> 16
        stored = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        tl.store(address.to(tl.pointer_type(tl.uint16)) + offsets, stored, mask=mask)
    else:
        if ROOT:
            value = _sqrt(_clamp_to_zero(value), COMPUTE)
        x = value.to(tl.float32)
        # The largest magnitude as the largest bit pattern of |x|: a NaN's lies above inf's, so a
        # NaN anywhere in a block becomes its absmax, as in torch's amax.
        magnitudes = tl.where(mask, x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, 0)
        absmax = tl.reduce(magnitudes, 1, _larger).to(tl.float32, bitcast=True)
        tl.store(absmax_address.to(tl.pointer_type(tl.float32)) + blocks, absmax, mask=block_mask)
        # quantize_blockwise: times the reciprocal of the absmax (rounded up where rounding to
        # nearest fell below it), a block whose absmax lies outside [2^-126, 2^126) times 2^32 or
        # 2^-32 first; up where uniform * gap < scaled - low.
        prescale = tl.where(absmax < _SMALLEST_NORMAL, 4294967296.0, tl.where(absmax >= _LARGEST_UNSCALED, 2.0**-32, 1.0))
        divisor = tl.where(absmax > 0, absmax * prescale, 1.0)
        reciprocal = tl.div_rn(tl.full(divisor.shape, 1.0, tl.float32), divisor)
        next_up = (reciprocal.to(tl.uint32, bitcast=True) + 1).to(tl.float32, bitcast=True)
        reciprocal = tl.where(divisor * reciprocal < 1.0, next_up, reciprocal)
        scaled = x * prescale[:, None] * reciprocal[:, None]
        lower = _lower_index(qmap, scaled)
        low = tl.load(qmap + lower)
        gap = tl.load(qmap + lower + 1) - low
        uniform = _noise(seed, offsets).to(tl.float32) * _NOISE_SCALE
        codes = (lower + (uniform * gap < scaled - low).to(tl.int32)).to(tl.uint8)
        tl.store(address.to(tl.pointer_type(tl.uint8)) + offsets, codes, mask=mask)


@triton.jit
def _rmsprop_encoded_kernel(
    table,
    numbers,
    chunks_at,
    signed_map,
    unsigned_map,
    STORAGE: tl.constexpr,
    COMPUTE: tl.constexpr,
    STATE: tl.constexpr,
    VARIANT: tl.constexpr,
    ROWS: tl.constexpr,
):
    """``ROWS`` blocks of one tensor with low-precision state: decode, the rule, encode, in place.

    Centered bf16 and 8-bit state hold ``grad_variance = max(v - w m^2, 0)`` in
    place of ``v`` (``w``: 1/c at the step that wrote it); 8-bit ``v`` and
    ``grad_variance`` are stored as their square roots with the unsigned map.
    """
    at, first = _chunk(table, chunks_at, ENCODED_FIELDS)
    fields = table + at
    lr, alpha, rate, eps, weight_decay, decay_factor, momentum = _scalars(numbers, COMPUTE)
    pointer = tl.pointer_type(STORAGE)
    p_ptr = tl.load(fields + E_P).to(pointer)
    g_ptr = tl.load(fields + E_G).to(pointer)
    numel = tl.load(fields + E_NUMEL)
    correction = tl.load(numbers + at + E_CORRECTION).to(COMPUTE)

    blocks = first // _BLOCK_SIZE + tl.arange(0, ROWS)
    offsets = blocks[:, None] * _BLOCK_SIZE + tl.arange(0, _BLOCK_SIZE)[None, :]
    mask = offsets < numel
    block_mask = blocks * _BLOCK_SIZE < numel
    variance = (CENTERED & VARIANT) != 0 and STATE != FLOAT32_STATE

    p = _widen(tl.load(p_ptr + offsets, mask=mask), STORAGE, COMPUTE)
    g = _widen(tl.load(g_ptr + offsets, mask=mask), STORAGE, COMPUTE)
    v_at, v_absmax_at = tl.load(fields + E_V), tl.load(fields + E_V_ABSMAX)
    v = _decode(v_at, v_absmax_at, offsets, mask, blocks, block_mask, unsigned_map, STATE, True, COMPUTE)
    m = v  # read only where used
    if CENTERED & VARIANT:
        m_at, m_absmax_at = tl.load(fields + E_M), tl.load(fields + E_M_ABSMAX)
        m = _decode(m_at, m_absmax_at, offsets, mask, blocks, block_mask, signed_map, STATE, False, COMPUTE)
        if variance:
            v = v + tl.load(numbers + at + E_WEIGHT_BEFORE).to(COMPUTE) * (m * m)
    b = v
    if MOMENTUM_BUFFER & VARIANT:
        b_at, b_absmax_at = tl.load(fields + E_B), tl.load(fields + E_B_ABSMAX)
        b = _decode(b_at, b_absmax_at, offsets, mask, blocks, block_mask, signed_map, STATE, False, COMPUTE)

    p, v, m, b = _rule(
        p, g, v, m, b, lr, alpha, rate, eps, weight_decay, decay_factor, momentum, correction, COMPUTE, VARIANT
    )
    tl.store(p_ptr + offsets, _narrow(p, STORAGE), mask=mask)

    if variance:
        v = _clamp_to_zero(v - tl.load(numbers + at + E_WEIGHT_AFTER).to(COMPUTE) * (m * m))
    v_seed = tl.load(fields + E_V_SEED).to(tl.uint64, bitcast=True)
    _encode(v, v_at, v_absmax_at, offsets, mask, blocks, block_mask, unsigned_map, v_seed, STATE, True, COMPUTE)
    if CENTERED & VARIANT:
        m_seed = tl.load(fields + E_M_SEED).to(tl.uint64, bitcast=True)
        _encode(m, m_at, m_absmax_at, offsets, mask, blocks, block_mask, signed_map, m_seed, STATE, False, COMPUTE)
    if MOMENTUM_BUFFER & VARIANT:
        b_seed = tl.load(fields + E_B_SEED).to(tl.uint64, bitcast=True)
        _encode(b, b_at, b_absmax_at, offsets, mask, blocks, block_mask, signed_map, b_seed, STATE, False, COMPUTE)


def _variant(hp: Hyperparameters) -> int:
    """The kernels' ``VARIANT``: the bits of the flags that ``hp`` sets."""
    flags = (
        (MAXIMIZE, hp.maximize),
        (COUPLED_WEIGHT_DECAY, hp.weight_decay != 0 and not hp.decoupled_weight_decay),
        (DECOUPLED_WEIGHT_DECAY, hp.weight_decay != 0 and hp.decoupled_weight_decay),
        (CENTERED, hp.centered),
        (BIAS_CORRECTION, hp.bias_correction),
        (EPS_IN_SQRT, hp.eps_in_sqrt),
        (MOMENTUM_BUFFER, hp.momentum > 0),
        (NESTEROV, hp.nesterov),
        (LR_IN_MOMENTUM, hp.lr_in_momentum),
    )
    return sum(bit.value for bit, is_set in flags if is_set)


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
    steps = _incremented(state_steps)
    # Complex tensors are updated as pairs of reals, like the for-loop path.
    sizes = np.fromiter(map(Tensor.numel, params), np.int64, len(params)) * (2 if params[0].is_complex() else 1)
    chunk = block * blocks_per_chunk
    chunk_counts = -(-sizes // chunk)
    if not chunk_counts.sum():
        return
    fields = np.zeros((len(params), TENSOR_FIELDS.value), np.int64)
    for column, tensors in ((P, params), (G, grads), (V, square_avgs), (M, grad_avgs), (B, momentum_buffers)):
        if tensors:  # absent state (no centered, no momentum) stays at address 0 and is never read
            fields[:, column.value] = list(map(Tensor.data_ptr, tensors))
    fields[:, NUMEL.value] = sizes
    fields[:, CORRECTION.value] = _corrections(hp, steps).view(np.int64)
    _launch(_rmsprop_kernel, params, hp, lr, fields, chunk, chunk_counts, BLOCK_SIZE=block, BLOCKS=blocks_per_chunk)


def step_encoded(
    params: list[Tensor],
    states: list[dict],
    fmt: str,
    param_indices: list[int],
    hp: Hyperparameters,
    *,
    blocks_per_program: int = BLOCKS_PER_PROGRAM,
) -> None:
    """One step of parameters of one dtype on one device whose state is stored as ``fmt``: ``"bf16"``,
    ``"8bit"`` or ``"float32"`` (the "wide" state of 16-bit parameters); ``param_indices`` seed the noise.

    The contract of :func:`rmsprop.backends.cpu.kernel.step_encoded`: the
    inputs must pass :func:`rmsprop.backends.fused.encoded_unsupported_reason`
    and hold exactly the buffers the settings use; the steps (CPU) are
    incremented. Each program steps ``blocks_per_program`` (a power of two)
    blocks of 256 elements. Under ``TRITON_INTERPRET=1`` the tensors may be CPU tensors.
    """
    variance = hp.centered and fmt in ("bf16", "8bit")
    square = "grad_variance" if variance else "square_avg"
    steps = _incremented([state["step"] for state in states])
    sizes = np.fromiter(map(Tensor.numel, params), np.int64, len(params))
    chunk = BLOCK_SIZE * blocks_per_program
    chunk_counts = -(-sizes // chunk)
    if not chunk_counts.sum():
        return
    fields = np.zeros((len(params), ENCODED_FIELDS.value), np.int64)
    used = [(E_V, E_V_ABSMAX, E_V_SEED, square, True), (E_M, E_M_ABSMAX, E_M_SEED, "grad_avg", hp.centered),
            (E_B, E_B_ABSMAX, E_B_SEED, "momentum_buffer", hp.momentum > 0)]
    fields[:, E_P.value] = list(map(Tensor.data_ptr, params))
    fields[:, E_G.value] = [p.grad.data_ptr() for p in params]
    for column, absmax_column, seed_column, key, needed in used:
        if not needed:  # absent state stays at address 0 and is never read
            continue
        fields[:, column.value] = [state[key].data_ptr() for state in states]
        if fmt == "8bit":
            fields[:, absmax_column.value] = [state[key + "_absmax"].data_ptr() for state in states]
        if fmt != "float32":
            seeds = [rounding_seed(index, key, int(t)) for index, t in zip(param_indices, steps, strict=True)]
            fields[:, seed_column.value] = np.array(seeds, np.uint64).view(np.int64)
    fields[:, E_NUMEL.value] = sizes
    fields[:, E_CORRECTION.value] = _corrections(hp, steps).view(np.int64)
    # mean_weight before and after the step: 1/c at the step that encoded the variance.
    fields[:, E_WEIGHT_BEFORE.value] = _inverse_corrections(hp, steps - 1).view(np.int64)
    fields[:, E_WEIGHT_AFTER.value] = _inverse_corrections(hp, steps).view(np.int64)
    maps = _maps(params[0].device)
    _launch(
        _rmsprop_encoded_kernel, params, hp, float(hp.lr), fields, chunk, chunk_counts, *maps,
        STATE=_STATES[fmt], ROWS=blocks_per_program,
    )
    # Writes through raw pointers are invisible to autograd's check that saved tensors are unchanged.
    torch.autograd.graph.increment_version(params)


def _incremented(state_steps: list[Tensor]) -> np.ndarray:
    """Increment the steps; their new values (float64)."""
    torch._foreach_add_(state_steps, 1)
    return torch.stack(state_steps).double().numpy()


def _corrections(hp: Hyperparameters, steps: np.ndarray) -> np.ndarray:
    """``1 - alpha^t`` (1 without bias correction), in float64, rounded to the compute type in the
    kernel like the for-loop path's."""
    return 1.0 - hp.alpha**steps if hp.bias_correction else np.ones(steps.size)


def _inverse_corrections(hp: Hyperparameters, steps: np.ndarray) -> np.ndarray:
    """:func:`rmsprop.formats.layout.mean_weight` at ``steps``: ``1 / (1 - alpha^t)`` with bias correction
    and ``t > 0``, else 1."""
    if not hp.bias_correction:
        return np.ones(steps.size)
    with np.errstate(divide="ignore"):
        return np.where(steps > 0, 1.0 / (1.0 - hp.alpha**steps), 1.0)


@cache
def _maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """The signed and unsigned 8-bit maps on ``device``, copied there once."""
    return SIGNED_MAP.to(device), UNSIGNED_MAP.to(device)


def _launch(
    kernel: triton.JITFunction,
    params: list[Tensor],
    hp: Hyperparameters,
    lr: float,
    fields: np.ndarray,
    chunk: int,
    chunk_counts: np.ndarray,
    *arguments: Tensor,
    **constants: object,
) -> None:
    """Launch ``kernel``, one program per chunk, with its table (see the module docstring): the rule's
    numbers, ``fields`` (one row per tensor of ``params``), then each program's tensor and first element."""
    scalars = np.array(KernelScalars.of(hp, lr), np.float64)
    owners = np.repeat(np.arange(len(fields)), chunk_counts)
    # The first element of each chunk: its rank within its tensor, times the chunk size.
    firsts = (np.arange(owners.size) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)) * chunk
    chunks = np.stack([owners, firsts], axis=1)
    table = torch.from_numpy(np.concatenate([scalars.view(np.int64), fields.ravel(), chunks.ravel()]))
    device = params[0].device
    if device.type == "cuda":
        # From pinned memory without blocking: a plain copy would wait for the GPU's queue (the backward pass).
        table = table.pin_memory().to(device, non_blocking=True)
    storage, compute = _TYPES[params[0].dtype]
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(owners.size,)](
            table,
            table.view(torch.float64),
            NUM_SCALARS.value + fields.shape[1] * len(params),
            *arguments,
            STORAGE=storage,
            COMPUTE=compute,
            VARIANT=_variant(hp),
            **constants,
        )
