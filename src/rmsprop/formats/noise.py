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
    "HASH_MULTIPLIER_1",
    "HASH_MULTIPLIER_2",
    "NOISE_BITS",
    "rounding_bits",
    "rounding_noise",
    "rounding_seed",
    "uniform_noise",
]


# SplitMix64 (Steele, Lea and Flood, 2014; reference C code: Vigna's splitmix64.c), which derives
# the seeds: the state advances by SPLITMIX_GAMMA and each output is the state mixed by the two multipliers.
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MIX_1 = 0xBF58476D1CE4E5B9
SPLITMIX_MIX_2 = 0x94D049BB133111EB
_UINT64 = (1 << 64) - 1
_UINT32 = (1 << 32) - 1

# lowbias32's multipliers (https://nullprogram.com/blog/2018/07/31/), the noise's hash.
HASH_MULTIPLIER_1 = 0x7FEB352D
HASH_MULTIPLIER_2 = 0x846CA68B


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


def rounding_bits(seed: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """Outputs ``0 .. count - 1`` of the noise stream of ``seed``, as int64 holding uint32 values:
    output ``o`` is lowbias32 (C. Wellons' 32-bit multiply-xorshift hash, a bijection of 32-bit words)
    of ``(o + seed mod 2^32) mod 2^32`` xor ``seed // 2^32``.

    A hash of a counter, so that any output can be computed on its own; 32-bit multiplies, which
    every vector instruction set has (AVX2 has no 64-bit multiply).
    """
    x = torch.arange(count, dtype=torch.int64, device=device).add_(seed & _UINT32).bitwise_and_(_UINT32)
    x.bitwise_xor_(seed >> 32)
    x.bitwise_xor_(x >> 16).mul_(HASH_MULTIPLIER_1).bitwise_and_(_UINT32)
    x.bitwise_xor_(x >> 15).mul_(HASH_MULTIPLIER_2).bitwise_and_(_UINT32)
    return x.bitwise_xor_(x >> 16)


# Noise bits per element: each 32-bit output serves this many consecutive elements.
NOISE_BITS = 16
ELEMENTS_PER_OUTPUT = 32 // NOISE_BITS


def rounding_noise(seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """int32 noise uniform in ``[0, 2^16)``, one per element of ``shape``: element ``i`` of the flattened
    shape gets bits ``16 (i mod 2)`` to ``16 (i mod 2) + 15`` of output ``i // 2`` of :func:`rounding_bits`.

    That is the stream's outputs read as little-endian 16-bit words, in order.
    Counter-based, so any element's noise can be computed on its own: the
    fused kernels draw the same noise for the same element, block by block.
    Elements 2^33 apart in one tensor get the same noise.
    """
    numel = math.prod(shape)
    outputs = rounding_bits(seed, -(-numel // ELEMENTS_PER_OUTPUT), device)
    words = torch.stack([(outputs >> (NOISE_BITS * k)) & 0xFFFF for k in range(ELEMENTS_PER_OUTPUT)], dim=1)
    return words.reshape(-1)[:numel].to(torch.int32).reshape(shape)


def uniform_noise(noise: Tensor) -> Tensor:
    """fp32 noise uniform in ``[0, 1)`` from :func:`rounding_noise` (exact in fp32)."""
    return noise.to(torch.float32) * 2.0**-NOISE_BITS
