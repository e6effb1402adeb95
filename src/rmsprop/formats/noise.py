"""Counter-based rounding noise: a function of (parameter position, buffer, step, element) alone."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rmsprop.formats.layout import STORED

__all__ = [
    "SPLITMIX_GAMMA",
    "SPLITMIX_MIX_1",
    "SPLITMIX_MIX_2",
    "ELEMENTS_PER_OUTPUT",
    "NOISE_BITS",
    "rounding_bits",
    "rounding_noise",
    "rounding_seed",
    "uniform_noise",
]


# SplitMix64 (Steele, Lea and Flood, 2014; reference C code: Vigna's splitmix64.c):
# the state advances by SPLITMIX_GAMMA and each output is the state mixed by the two multipliers.
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MIX_1 = 0xBF58476D1CE4E5B9
SPLITMIX_MIX_2 = 0x94D049BB133111EB
_UINT64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """The first output of SplitMix64 from state ``value``."""
    value = (value + SPLITMIX_GAMMA) & _UINT64
    value = ((value ^ (value >> 30)) * SPLITMIX_MIX_1) & _UINT64
    value = ((value ^ (value >> 27)) * SPLITMIX_MIX_2) & _UINT64
    return value ^ (value >> 31)


def rounding_seed(param_index: int, key: str, step: int) -> int:
    """The seed (64 bits) of the rounding noise of buffer ``key`` of parameter ``param_index`` at ``step``."""
    seed = _splitmix64(param_index)
    seed = _splitmix64(seed ^ STORED.index(key))
    return _splitmix64(seed ^ step)


def _int64(value: int) -> int:
    """An unsigned 64-bit value as the signed int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def rounding_bits(seed: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """Outputs ``1 .. count`` of SplitMix64 from state ``seed``, as int64 (int64 arithmetic wraps as uint64 does)."""
    x = torch.arange(1, count + 1, dtype=torch.int64, device=device) * _int64(SPLITMIX_GAMMA) + _int64(seed)
    x = (x ^ _shift_right(x, 30)) * _int64(SPLITMIX_MIX_1)
    x = (x ^ _shift_right(x, 27)) * _int64(SPLITMIX_MIX_2)
    return x ^ _shift_right(x, 31)


# Noise bits per element: each SplitMix64 output serves this many consecutive elements.
NOISE_BITS = 16
ELEMENTS_PER_OUTPUT = 64 // NOISE_BITS


def rounding_noise(seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """int32 noise uniform in ``[0, 2^16)``, one per element of ``shape``: element ``i`` of the flattened
    shape gets bits ``16 (i mod 4)`` to ``16 (i mod 4) + 15`` of SplitMix64 output ``i // 4 + 1`` from state ``seed``.

    That is the stream's outputs read as little-endian 16-bit words, in order.
    Counter-based, so any element's noise can be computed on its own: the
    fused kernels draw the same noise for the same element, block by block.
    """
    numel = math.prod(shape)
    outputs = rounding_bits(seed, -(-numel // ELEMENTS_PER_OUTPUT), device)
    words = torch.stack([_shift_right(outputs, NOISE_BITS * k) & 0xFFFF for k in range(ELEMENTS_PER_OUTPUT)], dim=1)
    return words.reshape(-1)[:numel].to(torch.int32).reshape(shape)


def uniform_noise(noise: Tensor) -> Tensor:
    """fp32 noise uniform in ``[0, 1)`` from :func:`rounding_noise` (exact in fp32)."""
    return noise.to(torch.float32) * 2.0**-NOISE_BITS
