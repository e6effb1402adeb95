"""Encoding and decoding a parameter's state: stochastic bf16 rounding and blockwise 8-bit quantization.

See :mod:`rmsprop.formats` for the formats and docs/design/state-formats.md
for why they are built as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rmsprop.formats.layout import (
    ABSMAX_SUFFIX,
    BLOCK_SIZE,
    ROOTS,
    STORED,
    compute_dtype,
    is_in_format,
    stored_dtype,
)
from rmsprop.formats.maps import SIGNED_MAP, UNSIGNED_MAP, lower_index
from rmsprop.formats.noise import rounding_noise, rounding_seed, uniform_noise

__all__ = [
    "convert_state",
    "decode_state",
    "dequantize_blockwise",
    "encode_state",
    "quantize_blockwise",
    "stochastic_round_bf16",
]


def stochastic_round_bf16(x: Tensor, noise: Tensor) -> Tensor:
    """``x`` (fp32) rounded to bfloat16, up with probability proportional to the dropped bits.

    ``noise`` holds int32 values uniform in ``[0, 2^16)``, one per element:
    adding it to the 16 low bits of the fp32 pattern carries into the kept bits
    exactly when it exceeds their complement. NaN stays NaN.
    """
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + noise).bitwise_and_(-(1 << 16)).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def quantize_blockwise(x: Tensor, qmap: Tensor, uniform: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Codes (uint8, shape of ``x``) and per-block absmax (fp32) of ``x``.

    Each block of :data:`BLOCK_SIZE` flattened elements is multiplied by the
    reciprocal of its largest magnitude (fp32, rounded up where rounding to
    nearest falls below it, so that the largest magnitude scales to 1 or beyond
    and is encoded exactly; a block whose largest magnitude lies outside
    [2^-126, 2^126) is first multiplied by 2^32 or 2^-32, so that the
    reciprocal is a normal float) and rounded to one of the two neighbouring values ``low < high`` of the sorted
    ``qmap``: up where ``uniform * (high - low) < scaled - low`` when ``uniform``
    (U[0, 1) noise, one per element) is given, so with probability
    proportional to the distance from ``low``; otherwise to the nearest.
    Values outside the map's range clamp to its ends.
    """
    flat = x.reshape(-1).to(torch.float32)
    blocks = _pad_to_blocks(flat)
    absmax = blocks.abs().amax(dim=1)
    prescale = torch.ones_like(absmax).masked_fill_(absmax < 2.0**-126, 2.0**32).masked_fill_(absmax >= 2.0**126, 2.0**-32)
    divisor = (absmax * prescale).masked_fill_(~(absmax > 0), 1.0)
    reciprocal = torch.ones_like(divisor).div_(divisor)
    reciprocal = torch.where(divisor * reciprocal < 1, torch.nextafter(reciprocal, torch.full_like(reciprocal, math.inf)), reciprocal)
    scaled = blocks.mul(prescale.unsqueeze(1)).mul_(reciprocal.unsqueeze(1))
    scaled = scaled.reshape(-1)[: flat.numel()]
    qmap = qmap.to(x.device)
    lower = lower_index(qmap, scaled)
    low = torch.index_select(qmap, 0, lower)
    gap = torch.index_select(qmap, 0, lower + 1).sub_(low)
    distance = scaled.sub_(low)
    round_up = distance >= gap.mul_(0.5) if uniform is None else uniform.reshape(-1) * gap < distance
    codes = lower.add_(round_up).to(torch.uint8)
    return codes.reshape(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``qmap[code] * absmax[block]``, shaped like ``codes``."""
    values = torch.index_select(qmap.to(device=codes.device), 0, codes.reshape(-1).int())
    blocks = _pad_to_blocks(values)
    decoded = (blocks * absmax.to(torch.float32).unsqueeze(1)).reshape(-1)[: codes.numel()]
    return decoded.to(dtype).reshape(codes.shape)


def _pad_to_blocks(flat: Tensor) -> Tensor:
    padding = -flat.numel() % BLOCK_SIZE
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.reshape(-1, BLOCK_SIZE)


def decode_state(state: Mapping[str, Any], p: Tensor, weight: float = 1.0) -> dict[str, Tensor]:
    """The buffers of ``p``'s state (``square_avg``, and ``momentum_buffer`` and ``grad_avg`` where
    present) as tensors of the compute dtype (fp32 or wider); ``weight`` is :func:`mean_weight`.

    A buffer already stored in that dtype is returned itself, not copied, so
    that it is updated in place.
    """
    dtype = compute_dtype(p)
    decoded = {}
    for key in STORED:
        if key not in state:
            continue
        if key + ABSMAX_SUFFIX in state:
            qmap = UNSIGNED_MAP if key in ROOTS else SIGNED_MAP
            value = dequantize_blockwise(state[key], state[key + ABSMAX_SUFFIX], qmap, dtype)
            if key in ROOTS:
                value.square_()
        else:
            value = state[key] if state[key].dtype == dtype else state[key].to(dtype)
        decoded[key] = value
    if "grad_variance" in decoded:
        mean = decoded["grad_avg"]
        decoded["square_avg"] = decoded.pop("grad_variance").addcmul_(mean, mean, value=weight)
    return decoded


def encode_state(
    state: dict[str, Any],
    p: Tensor,
    values: Mapping[str, Tensor],
    fmt: str,
    param_index: int,
    weight: float = 1.0,
) -> None:
    """Store ``values`` (compute dtype, as :func:`decode_state` returns) as ``p``'s buffers in format ``fmt``.

    In ``"bf16"`` and ``"8bit"`` with a ``grad_avg``, ``square_avg`` is stored
    as ``grad_variance = max(square_avg - weight * grad_avg^2, 0)``. The
    rounding noise comes from :func:`rmsprop.formats.noise.rounding_noise` at the state's step.
    """
    stored = dict(values)
    if fmt in ("bf16", "8bit") and "grad_avg" in stored:
        mean = stored["grad_avg"]
        stored["grad_variance"] = stored.pop("square_avg").addcmul(mean, mean, value=-weight).clamp_(min=0)
    for key in STORED:
        state.pop(key, None)
        state.pop(key + ABSMAX_SUFFIX, None)
    step = int(state["step"].item()) if "step" in state else 0
    for key, value in stored.items():
        if fmt in ("full", "wide"):
            state[key] = value.to(stored_dtype(p, fmt))
            continue
        noise = rounding_noise(rounding_seed(param_index, key, step), value.shape, value.device)
        if fmt == "bf16":
            state[key] = stochastic_round_bf16(value.to(torch.float32), noise)
            continue
        uniform = uniform_noise(noise)
        if key in ROOTS:
            state[key], state[key + ABSMAX_SUFFIX] = quantize_blockwise(value.clamp(min=0).sqrt_(), UNSIGNED_MAP, uniform)
        else:
            state[key], state[key + ABSMAX_SUFFIX] = quantize_blockwise(value, SIGNED_MAP, uniform)


def convert_state(state: dict[str, Any], p: Tensor, fmt: str, param_index: int, weight: float = 1.0) -> None:
    """Re-store ``p``'s buffers in format ``fmt`` if they are in another one."""
    if not is_in_format(state, p, fmt):
        encode_state(state, p, decode_state(state, p, weight), fmt, param_index, weight)
