r"""numba kernels of the fused CPU path: the whole RMSProp step in one pass over memory.

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

import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

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
    """Increment each tensor's step; ``inverse_corrections[i] = 1 / (1 - alpha^t)`` (1 without bias correction)."""
    for i in range(steps.size):
        step = carray(_pointer(steps[i], step_like), 1)
        step[0] += 1
        # In float64, then rounded to the compute type, like the for-loop path.
        # A multiplication per element instead of a division: the kernel already divides once and
        # takes a root per element, which on 2 cores is close to the time memory takes.
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
    alpha = scalars[ALPHA]
    rate = scalars[RATE]
    lr = scalars[LR]
    eps_inside = scalars[EPS_INSIDE]
    eps_outside = scalars[EPS_OUTSIDE]
    weight_decay = scalars[WEIGHT_DECAY]
    decay_factor = scalars[DECAY_FACTOR]
    momentum = scalars[MOMENTUM]
    sign = scalars[SIGN]
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
            p = _widen(p_chunk[i]) * decay_factor
            g = _widen(g_chunk[i]) * sign
            if coupled_weight_decay:
                g = g + weight_decay * p
            v = alpha * _widen(v_chunk[i]) + rate * (g * g)
            v_chunk[i] = _narrow(v, like)
            second_moment = v * inverse_correction
            if grad_avgs is not None:
                m = _widen(m_chunk[i])
                m = m + rate * (g - m)
                m_chunk[i] = _narrow(m, like)
                mean = m * inverse_correction
                second_moment = second_moment - mean * mean
                # NaN stays NaN, as with torch's clamp_min.
                second_moment = zero if second_moment < zero else second_moment
            u = g / (np.sqrt(second_moment + eps_inside) + eps_outside)
            if momentum_buffers is not None:
                if lr_in_momentum:
                    b = momentum * _widen(b_chunk[i]) + lr * u
                    update = momentum * b + lr * u if nesterov else b
                else:
                    b = momentum * _widen(b_chunk[i]) + u
                    update = lr * (u + momentum * b) if nesterov else lr * b
                b_chunk[i] = _narrow(b, like)
            else:
                update = lr * u
            p_chunk[i] = _narrow(p - update, like)


@njit(parallel=True, cache=True)
def stream_three_read_two_written(firsts, seconds, thirds, sizes, like):
    """Memory traffic of a plain RMSProp step and nothing else: the benchmark's bound.

    Reads the three tensors at each address triple and writes the first and
    third back, chunked and threaded as :func:`rmsprop_step`. Adding
    ``second - second`` leaves finite values as they were (up to the sign of
    zero) but cannot be optimised away without fast-math.
    """
    owners, starts, ends = _chunks(sizes)
    for chunk in prange(owners.size):
        tensor = owners[chunk]
        size = sizes[tensor]
        start = starts[chunk]
        end = ends[chunk]
        a_chunk = carray(_pointer(firsts[tensor], like), size)[start:end]
        b_chunk = carray(_pointer(seconds[tensor], like), size)[start:end]
        c_chunk = carray(_pointer(thirds[tensor], like), size)[start:end]
        for i in range(end - start):
            second = b_chunk[i]
            nothing = second - second
            a_chunk[i] = a_chunk[i] + nothing
            c_chunk[i] = c_chunk[i] + nothing
