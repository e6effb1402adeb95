r"""numba kernels of the fused CPU path: the whole RMSProp step in one pass over memory.

Two jobs: the kernels of low-precision state (bfloat16 and 8-bit, with
stochastic rounding), and :func:`rmsprop_step`, the full-precision kernel on
machines where the C++ kernel (``csrc/fused_step.cpp``) cannot be built; the
two full-precision kernels compute the same operations in the same order and
agree bit for bit.

Imported lazily by :mod:`rmsprop.fused` (importing numba takes about a second). The
kernels are compiled on first use and cached on disk (``cache=True``), so a
later process loads them in milliseconds.

Tensors reach the kernel as raw addresses (``Tensor.data_ptr()``) with their
element counts: one call updates any number of tensors without building a
list of arrays per step. The work is split into chunks of at most
``CHUNK`` elements, spread over numba's threads.

Storage types and the type each element is computed in:

========================  ==============  ========
tensor dtype              array passed    computed
========================  ==============  ========
``torch.float64``         ``float64``     float64
``torch.float32``         ``float32``     float32
``torch.bfloat16`` bits   ``uint16``      float32
``torch.float16`` bits    ``int16``       float32
========================  ==============  ========

numpy has no bfloat16 and numba no float16 on CPU, so both travel as 16-bit
integers and are converted here: bfloat16 is the upper half of a float32
(rounded to nearest even, as torch rounds), float16 goes through LLVM's
``half`` type.
"""

from __future__ import annotations

import os
import platform

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

from rmsprop.state_precision import BLOCK_SIZE, KEY_SHIFT, SPLITMIX_GAMMA, SPLITMIX_MIX_1, SPLITMIX_MIX_2, STORED

# numba's own thread pool, unless the user chose one. Its OpenMP layer runs a
# second OpenMP pool beside torch's, and the two spin against each other: on
# 2 cores a fused step of 4M parameters next to torch matmuls took 8.1-10.1 ms
# with "omp" and 2.2-3.1 ms with "workqueue" (docs/benchmark.md).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# Elements per work item: large enough to amortise the per-chunk set-up,
# small enough to balance the threads on tensors of a few million elements.
CHUNK = 1 << 16

# Positions in the ``scalars`` argument of :func:`rmsprop_step`.
LR, ALPHA, RATE, EPS_INSIDE, EPS_OUTSIDE, WEIGHT_DECAY, DECAY_FACTOR, MOMENTUM, SIGN = range(9)
NUM_SCALARS = 9


@intrinsic
def _pointer(typingctx, address, like):
    """A pointer to elements of ``like``'s dtype at the integer ``address``."""
    signature = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


def _has_fused_multiply_add() -> bool:
    """Whether this machine's CPU has fused multiply-adds: the C++ kernel, built for it
    (``-march=native``), uses them exactly where this module's :func:`mul_add` does."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return bool(llvmlite.binding.get_host_cpu_features().get("fma", False))


@intrinsic
def _fused_multiply_add(typingctx, a, b, c):
    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


@njit(inline="always")
def _separate_multiply_add(a, b, c):
    return a * b + c


# a * b + c, rounded once where the machine has fused multiply-adds (where not, LLVM would
# call a slow library function): a float32 step on one large tensor was 4-6% faster with them.
mul_add = _fused_multiply_add if _has_fused_multiply_add() else _separate_multiply_add


@intrinsic
def _float32_from_bits(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_float32(typingctx, value):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _float32_from_half(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _half_from_float32(typingctx, value):
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


def _widen(stored):
    """The stored element as the type it is computed in."""


@overload(_widen, inline="always")
def _widen_overload(stored):
    if stored == types.uint16:
        return lambda stored: _float32_from_bits(np.uint32(stored) << np.uint32(16))
    if stored == types.int16:
        return lambda stored: _float32_from_half(stored)
    return lambda stored: stored


def _narrow(value, like):
    """``value`` rounded to nearest even into the storage type of ``like``."""


@overload(_narrow, inline="always")
def _narrow_overload(value, like):
    if like.dtype == types.uint16:
        return _bfloat16_bits
    if like.dtype == types.int16:
        return lambda value, like: _half_from_float32(value)
    return lambda value, like: value


def _bfloat16_bits(value, like):
    if value != value:
        return np.uint16(0x7FC0)  # the NaN of torch's round_to_nearest_even
    bits = _bits_from_float32(value)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16((bits + rounding) >> np.uint32(16))


@njit(cache=True)
def _advance_steps(steps, step_like, alpha, bias_correction, inverse_corrections):
    """Increment each tensor's step; ``inverse_corrections[i] = 1 / (1 - alpha^t)`` (1 without bias
    correction): the rule multiplies by it, as the C++ kernel does, where a quotient per element would cost more."""
    for i in range(steps.size):
        step = carray(_pointer(steps[i], step_like), 1)
        step[0] += 1
        # In float64, then rounded to the compute type.
        inverse_corrections[i] = 1.0 / (1.0 - alpha ** np.float64(step[0])) if bias_correction else 1.0


@njit(cache=True)
def _chunks(sizes):
    """(tensor index, first element, end) of every chunk of at most CHUNK elements."""
    count = 0
    for size in sizes:
        count += (size + CHUNK - 1) // CHUNK
    owners = np.empty(count, np.int64)
    starts = np.empty(count, np.int64)
    ends = np.empty(count, np.int64)
    chunk = 0
    for tensor in range(sizes.size):
        for start in range(0, sizes[tensor], CHUNK):
            owners[chunk] = tensor
            starts[chunk] = start
            ends[chunk] = min(start + CHUNK, sizes[tensor])
            chunk += 1
    return owners, starts, ends


@njit(inline="always")
def _constants(scalars):
    """The rule's numbers (see :func:`rmsprop.fused.kernel_scalars`) as a tuple of values.

    Read once per kernel call into registers: the array itself could alias the
    tensors written through raw pointers, so LLVM would reload it per element.
    """
    return (
        scalars[LR],
        scalars[ALPHA],
        scalars[RATE],
        scalars[EPS_INSIDE],
        scalars[EPS_OUTSIDE],
        scalars[WEIGHT_DECAY],
        scalars[DECAY_FACTOR],
        scalars[MOMENTUM],
        scalars[SIGN],
    )


@njit(inline="always")
def _rule(p, g, v, m, b, inverse_correction, constants, grad_avgs, momentum_buffers, flags):
    """One element of the rule of :mod:`rmsprop.functional`: the new ``(p, v, m, b)``.

    ``m`` (``b``) is used and updated only if the kernel's ``grad_avgs``
    (``momentum_buffers``) is not ``None``; both are passed so that numba
    compiles the unused code away. ``flags`` is ``(coupled_weight_decay,
    nesterov, lr_in_momentum)``. Inlined: a call per element would stop vectorisation.
    """
    lr, alpha, rate, eps_inside, eps_outside, weight_decay, decay_factor, momentum, sign = constants
    coupled_weight_decay, nesterov, lr_in_momentum = flags
    p = p * decay_factor
    g = g * sign
    if coupled_weight_decay:
        g = mul_add(weight_decay, p, g)
    v = mul_add(alpha, v, rate * (g * g))
    second_moment = v * inverse_correction
    if grad_avgs is not None:
        m = mul_add(rate, g - m, m)
        mean = m * inverse_correction
        second_moment = mul_add(-mean, mean, second_moment)
        # clamp_min(0), as the C++ kernel: NaN stays NaN. ``sign - sign`` is a zero of the compute type.
        second_moment = sign - sign if second_moment < 0 else second_moment
    u = g / (np.sqrt(second_moment + eps_inside) + eps_outside)
    if momentum_buffers is not None and lr_in_momentum:
        lr_u = lr * u
        b = mul_add(momentum, b, lr_u)
        return p - (mul_add(momentum, b, lr_u) if nesterov else b), v, m, b
    direction = u
    if momentum_buffers is not None:
        b = mul_add(momentum, b, u)
        direction = mul_add(momentum, b, u) if nesterov else b
    return mul_add(-lr, direction, p), v, m, b


@njit(parallel=True, cache=True)
def rmsprop_step(
    params,
    grads,
    square_avgs,
    grad_avgs,
    momentum_buffers,
    sizes,
    steps,
    like,
    step_like,
    scalars,
    alpha_exact,
    coupled_weight_decay,
    bias_correction,
    nesterov,
    lr_in_momentum,
):
    """One RMSProp step over every tensor, in place (the rule of :mod:`rmsprop.functional`).

    ``params``, ``grads``, ``square_avgs`` and, when present,
    ``grad_avgs`` (centered) and ``momentum_buffers`` (momentum > 0) hold the
    addresses of the tensors, all of ``like``'s storage type; ``None`` for an
    absent state removes its code and its memory traffic at compile time.
    ``steps`` holds the addresses of the 0-dim step tensors, of
    ``step_like``'s dtype. Maximize, the two weight decays and the eps
    placement are folded into ``scalars``, of the compute type (see
    :func:`rmsprop.fused.kernel_scalars`); ``alpha_exact`` is alpha as a
    float64, for the bias correction.
    """
    constants = _constants(scalars)
    flags = (coupled_weight_decay, nesterov, lr_in_momentum)
    zero = np.zeros_like(scalars[:1])[0]

    inverse_corrections = np.empty(sizes.size, scalars.dtype)
    _advance_steps(steps, step_like, alpha_exact, bias_correction, inverse_corrections)
    owners, starts, ends = _chunks(sizes)

    for chunk in prange(owners.size):
        tensor = owners[chunk]
        size = sizes[tensor]
        start = starts[chunk]
        end = ends[chunk]
        inverse_correction = inverse_corrections[tensor]
        # Slicing each chunk before the loop lets LLVM vectorise it.
        p_chunk = carray(_pointer(params[tensor], like), size)[start:end]
        g_chunk = carray(_pointer(grads[tensor], like), size)[start:end]
        v_chunk = carray(_pointer(square_avgs[tensor], like), size)[start:end]
        if grad_avgs is not None:
            m_chunk = carray(_pointer(grad_avgs[tensor], like), size)[start:end]
        if momentum_buffers is not None:
            b_chunk = carray(_pointer(momentum_buffers[tensor], like), size)[start:end]
        for i in range(end - start):
            m = b = zero
            if grad_avgs is not None:
                m = _widen(m_chunk[i])
            if momentum_buffers is not None:
                b = _widen(b_chunk[i])
            p, v, m, b = _rule(
                _widen(p_chunk[i]),
                _widen(g_chunk[i]),
                _widen(v_chunk[i]),
                m,
                b,
                inverse_correction,
                constants,
                grad_avgs,
                momentum_buffers,
                flags,
            )
            p_chunk[i] = _narrow(p, like)
            v_chunk[i] = _narrow(v, like)
            if grad_avgs is not None:
                m_chunk[i] = _narrow(m, like)
            if momentum_buffers is not None:
                b_chunk[i] = _narrow(b, like)


# --- low-precision state (rmsprop.state_precision) ---------------------------

# SplitMix64's constants, as rmsprop.state_precision.rounding_bits uses them.
_GAMMA, _MIX_1, _MIX_2 = map(np.uint64, (SPLITMIX_GAMMA, SPLITMIX_MIX_1, SPLITMIX_MIX_2))
# Indices of the buffer names in STORED, which seed the noise.
GRAD_AVG_KEY, MOMENTUM_KEY, SQUARE_AVG_KEY, GRAD_VARIANCE_KEY = map(
    STORED.index, ("grad_avg", "momentum_buffer", "square_avg", "grad_variance")
)


@njit(inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _random_bits(seed, index):
    """Output ``index + 1`` of SplitMix64 from state ``seed``: the noise of element ``index``."""
    return _mix64(seed + np.uint64(index + 1) * _GAMMA)


@njit(inline="always")
def _rounding_seed(param_index, key, step):
    """rmsprop.state_precision.rounding_seed."""
    seed = _random_bits(np.uint64(param_index), 0)
    seed = _random_bits(seed ^ np.uint64(key), 0)
    return _random_bits(seed ^ np.uint64(step), 0)


def _store(value, like, seed, index):
    """``value`` as a state element of ``like``'s type: float32 as it is, bfloat16 bits rounded
    stochastically with the bits of element ``index`` (rmsprop.state_precision.stochastic_round_bf16)."""


@overload(_store, inline="always")
def _store_overload(value, like, seed, index):
    if like.dtype == types.uint16:
        return _stochastic_bfloat16_bits
    return lambda value, like, seed, index: np.float32(value)


def _is_bfloat16(like):
    """Whether ``like`` holds bfloat16 bits, as a compile-time constant."""


@overload(_is_bfloat16, inline="always")
def _is_bfloat16_overload(like):
    answer = like.dtype == types.uint16
    return lambda like: answer


def _stochastic_bfloat16_bits(value, like, seed, index):
    value = np.float32(value)
    if value != value:
        return np.uint16(0x7FC0)
    noise = np.uint32(_random_bits(seed, index) >> np.uint64(48))
    return np.uint16((_bits_from_float32(value) + noise) >> np.uint32(16))


@njit(cache=True)
def _advance_encoded_steps(
    steps, step_like, param_indices, alpha, bias_correction, keys, inverse_corrections, weights, seeds
):
    """:func:`_advance_steps`, plus per tensor the weights of m^2 in ``grad_variance`` before and after
    the step (rmsprop.state_precision.mean_weight) and the seed of each buffer's noise (``keys``)."""
    _advance_steps(steps, step_like, alpha, bias_correction, inverse_corrections)
    for i in range(steps.size):
        step = np.int64(carray(_pointer(steps[i], step_like), 1)[0])
        weights[i, 0] = 1.0 / (1.0 - alpha ** np.float64(step - 1)) if bias_correction and step > 1 else 1.0
        weights[i, 1] = 1.0 / (1.0 - alpha ** np.float64(step)) if bias_correction else 1.0
        for slot in range(keys.size):
            seeds[i, slot] = _rounding_seed(param_indices[i], keys[slot], step)


@njit(parallel=True, cache=True)
def rmsprop_step_bf16(
    params,
    grads,
    square_avgs,
    grad_avgs,
    momentum_buffers,
    sizes,
    steps,
    param_indices,
    like,
    state_like,
    step_like,
    scalars,
    alpha_exact,
    coupled_weight_decay,
    bias_correction,
    nesterov,
    lr_in_momentum,
):
    """:func:`rmsprop_step` with the state in ``state_like``'s storage type: ``uint16``, bfloat16
    bits rounded stochastically, or ``float32`` (the state of bfloat16 and float16 parameters
    below ``min_8bit_size`` in 8-bit mode).

    bfloat16 state with ``grad_avgs`` holds ``grad_variance`` in place of
    ``square_avg`` (rmsprop.state_precision). ``param_indices`` (int64) are
    the parameters' positions in the optimizer, which seed the noise.
    """
    constants = _constants(scalars)
    flags = (coupled_weight_decay, nesterov, lr_in_momentum)
    zero = np.zeros_like(scalars[:1])[0]
    stores_variance = grad_avgs is not None and _is_bfloat16(state_like)
    keys = np.array([GRAD_VARIANCE_KEY if stores_variance else SQUARE_AVG_KEY, GRAD_AVG_KEY, MOMENTUM_KEY])

    inverse_corrections = np.empty(sizes.size, scalars.dtype)
    weights = np.empty((sizes.size, 2), scalars.dtype)
    seeds = np.empty((sizes.size, 3), np.uint64)
    _advance_encoded_steps(
        steps, step_like, param_indices, alpha_exact, bias_correction, keys, inverse_corrections, weights, seeds
    )
    owners, starts, ends = _chunks(sizes)

    for chunk in prange(owners.size):
        tensor = owners[chunk]
        size = sizes[tensor]
        start = starts[chunk]
        end = ends[chunk]
        inverse_correction = inverse_corrections[tensor]
        weight_before = weights[tensor, 0]
        weight_after = weights[tensor, 1]
        # Read once: loads in the loop, which the loop's stores might alias, kept it scalar (AVX2).
        v_seed, m_seed, b_seed = seeds[tensor, 0], seeds[tensor, 1], seeds[tensor, 2]
        p_chunk = carray(_pointer(params[tensor], like), size)[start:end]
        g_chunk = carray(_pointer(grads[tensor], like), size)[start:end]
        v_chunk = carray(_pointer(square_avgs[tensor], state_like), size)[start:end]
        if grad_avgs is not None:
            m_chunk = carray(_pointer(grad_avgs[tensor], state_like), size)[start:end]
        if momentum_buffers is not None:
            b_chunk = carray(_pointer(momentum_buffers[tensor], state_like), size)[start:end]
        for i in range(end - start):
            v = _widen(v_chunk[i])
            m = b = zero
            if grad_avgs is not None:
                m = _widen(m_chunk[i])
                if stores_variance:
                    v = v + weight_before * (m * m)
            if momentum_buffers is not None:
                b = _widen(b_chunk[i])
            p, v, m, b = _rule(
                _widen(p_chunk[i]),
                _widen(g_chunk[i]),
                v,
                m,
                b,
                inverse_correction,
                constants,
                grad_avgs,
                momentum_buffers,
                flags,
            )
            p_chunk[i] = _narrow(p, like)
            index = start + i
            if stores_variance:
                v = v - weight_after * (m * m)
                # clamp_min(0) as in _rule and the per-tensor path: NaN stays NaN.
                v = zero if v < 0 else v
            v_chunk[i] = _store(v, state_like, v_seed, index)
            if grad_avgs is not None:
                m_chunk[i] = _store(m, state_like, m_seed, index)
            if momentum_buffers is not None:
                b_chunk[i] = _store(b, state_like, b_seed, index)


@njit(inline="always")
def _lower_index(qmap, table, x):
    """``i`` in [0, 254] with ``qmap[i] < x <= qmap[i+1]``, or the nearest end of the map: the
    lookup of rmsprop.state_precision._lower_index, in its table (``interval_table``)."""
    below = table[_bits_from_float32(x) >> np.uint32(KEY_SHIFT)]
    below += np.int32(qmap[below] < x)
    return min(max(below, 1), 255) - 1


@njit(inline="always")
def _encode_block(values, count, codes, absmaxes, block, qmap, table, seed, first_index, uniforms):
    """rmsprop.state_precision.quantize_blockwise of one block, with the noise of its elements.
    ``values`` are overwritten, ``uniforms`` is scratch space for the block."""
    # The largest magnitude as the largest bit pattern of |x|: a NaN's lies above inf's, so a NaN
    # anywhere becomes the absmax, as in torch's amax; and an integer maximum vectorises.
    largest = np.uint32(0)
    for i in range(count):
        magnitude = _bits_from_float32(values[i]) & np.uint32(0x7FFFFFFF)
        largest = magnitude if magnitude > largest else largest
    absmax = _float32_from_bits(largest)
    absmaxes[block] = absmax
    divisor = absmax if absmax > 0 else np.float32(1)
    # Scaling and noise in a loop of their own, which vectorises; the lookups below do not.
    for i in range(count):
        values[i] = values[i] / divisor
        uniforms[i] = np.float32(_random_bits(seed, first_index + i) >> np.uint64(40)) * np.float32(2.0**-24)
    for i in range(count):
        scaled = values[i]
        lower = _lower_index(qmap, table, scaled)
        low = qmap[lower]
        fraction = (scaled - low) / (qmap[lower + 1] - low)
        codes[i] = lower + np.int32(uniforms[i] < fraction)  # branch-free: a coin flip


@njit(parallel=True, cache=True)
def rmsprop_step_8bit(
    params,
    grads,
    square_avgs,
    square_absmaxes,
    grad_avgs,
    grad_absmaxes,
    momentum_buffers,
    momentum_absmaxes,
    sizes,
    steps,
    param_indices,
    like,
    step_like,
    scalars,
    alpha_exact,
    coupled_weight_decay,
    bias_correction,
    nesterov,
    lr_in_momentum,
    signed_map,
    signed_table,
    unsigned_map,
    unsigned_table,
):
    """:func:`rmsprop_step` with the state as blockwise 8-bit codes (rmsprop.state_precision).

    Each buffer is two address arrays: its ``uint8`` codes and its float32
    absmax per block of :data:`BLOCK_SIZE`. ``square_avgs`` holds
    ``sqrt(square_avg)``, or with ``grad_avgs`` ``sqrt(grad_variance)``, with
    ``unsigned_map``; the others use ``signed_map`` (each with its
    ``interval_table``). Per block: decode,
    apply the rule, keep the new values in fp32, reduce their absmax, encode.
    Chunks start at multiples of ``CHUNK``, so blocks never straddle them.
    """
    constants = _constants(scalars)
    flags = (coupled_weight_decay, nesterov, lr_in_momentum)
    zero = np.zeros_like(scalars[:1])[0]
    codes_like = np.empty(0, np.uint8)
    absmax_like = np.empty(0, np.float32)
    keys = np.array([GRAD_VARIANCE_KEY if grad_avgs is not None else SQUARE_AVG_KEY, GRAD_AVG_KEY, MOMENTUM_KEY])

    inverse_corrections = np.empty(sizes.size, scalars.dtype)
    weights = np.empty((sizes.size, 2), scalars.dtype)
    seeds = np.empty((sizes.size, 3), np.uint64)
    _advance_encoded_steps(
        steps, step_like, param_indices, alpha_exact, bias_correction, keys, inverse_corrections, weights, seeds
    )
    owners, starts, ends = _chunks(sizes)

    for chunk in prange(owners.size):
        tensor = owners[chunk]
        size = sizes[tensor]
        blocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        inverse_correction = inverse_corrections[tensor]
        weight_before = weights[tensor, 0]
        weight_after = weights[tensor, 1]
        p_all = carray(_pointer(params[tensor], like), size)
        g_all = carray(_pointer(grads[tensor], like), size)
        v_codes = carray(_pointer(square_avgs[tensor], codes_like), size)
        v_absmax = carray(_pointer(square_absmaxes[tensor], absmax_like), blocks)
        if grad_avgs is not None:
            m_codes = carray(_pointer(grad_avgs[tensor], codes_like), size)
            m_absmax = carray(_pointer(grad_absmaxes[tensor], absmax_like), blocks)
        if momentum_buffers is not None:
            b_codes = carray(_pointer(momentum_buffers[tensor], codes_like), size)
            b_absmax = carray(_pointer(momentum_absmaxes[tensor], absmax_like), blocks)
        # One block's decoded map values, then its new values in fp32 until their absmax is known.
        new_v = np.empty(BLOCK_SIZE, np.float32)
        new_m = np.empty(BLOCK_SIZE, np.float32)
        new_b = np.empty(BLOCK_SIZE, np.float32)
        uniforms = np.empty(BLOCK_SIZE, np.float32)
        for first in range(starts[chunk], ends[chunk], BLOCK_SIZE):
            block = first // BLOCK_SIZE
            count = min(BLOCK_SIZE, size - first)
            p_block = p_all[first : first + count]
            g_block = g_all[first : first + count]
            v_block = v_codes[first : first + count]
            if grad_avgs is not None:
                m_block = m_codes[first : first + count]
            if momentum_buffers is not None:
                b_block = b_codes[first : first + count]
            # Loaded once: the loop's stores to p might alias them, which kept it scalar.
            v_scale = v_absmax[block]
            m_scale = m_absmax[block] if grad_avgs is not None else np.float32(0)
            b_scale = b_absmax[block] if momentum_buffers is not None else np.float32(0)
            # The map lookups in a loop of their own: in the rule's loop they kept it scalar.
            for i in range(count):
                new_v[i] = unsigned_map[v_block[i]]
                if grad_avgs is not None:
                    new_m[i] = signed_map[m_block[i]]
                if momentum_buffers is not None:
                    new_b[i] = signed_map[b_block[i]]
            for i in range(count):
                # Decoded in fp32, then computed in the compute type, as the per-tensor
                # path does (adding zero widens to float64, and is exact for float32).
                root = zero + new_v[i] * v_scale
                v = root * root
                m = b = zero
                if grad_avgs is not None:
                    m = zero + new_m[i] * m_scale
                    v = v + weight_before * (m * m)
                if momentum_buffers is not None:
                    b = zero + new_b[i] * b_scale
                p, v, m, b = _rule(
                    _widen(p_block[i]),
                    _widen(g_block[i]),
                    v,
                    m,
                    b,
                    inverse_correction,
                    constants,
                    grad_avgs,
                    momentum_buffers,
                    flags,
                )
                p_block[i] = _narrow(p, like)
                if grad_avgs is not None:
                    v = v - weight_after * (m * m)
                    new_m[i] = m
                if momentum_buffers is not None:
                    new_b[i] = b
                # sqrt(clamp_min(v, 0)), NaN staying NaN, as the per-tensor path.
                new_v[i] = np.sqrt(zero if v < 0 else v)
            _encode_block(new_v, count, v_block, v_absmax, block, unsigned_map, unsigned_table, seeds[tensor, 0], first, uniforms)
            if grad_avgs is not None:
                _encode_block(new_m, count, m_block, m_absmax, block, signed_map, signed_table, seeds[tensor, 1], first, uniforms)
            if momentum_buffers is not None:
                _encode_block(new_b, count, b_block, b_absmax, block, signed_map, signed_table, seeds[tensor, 2], first, uniforms)
