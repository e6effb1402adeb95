"""Which entries a parameter's state holds in each format, and their dtypes.

Formats (:func:`target_format`): ``"full"`` (the parameter's dtype, as
``torch.optim.RMSprop``), ``"wide"`` (fp32, or the parameter's dtype if
wider), ``"bf16"`` and ``"8bit"`` (``uint8`` codes plus ``<key>_absmax``, one
fp32 per block of :data:`BLOCK_SIZE` elements). With ``grad_avg``, bf16 and
8-bit state store ``grad_variance`` in place of ``square_avg``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ABSMAX_SUFFIX",
    "BLOCK_SIZE",
    "ROOTS",
    "STORED",
    "compute_dtype",
    "holds_group_layout",
    "is_in_format",
    "mean_weight",
    "num_blocks",
    "stored_dtype",
    "stored_keys",
    "target_format",
]

BLOCK_SIZE = 256
# Entries that can hold a buffer; grad_variance replaces square_avg in centered low-precision state.
STORED = ("grad_avg", "momentum_buffer", "square_avg", "grad_variance")
# 8-bit entries stored as their square root, with the unsigned map.
ROOTS = ("square_avg", "grad_variance")
# The entry beside an 8-bit buffer that holds its blocks' absmax.
ABSMAX_SUFFIX = "_absmax"




def num_blocks(numel: int) -> int:
    """The number of 8-bit blocks of a tensor of ``numel`` elements."""
    return math.ceil(numel / BLOCK_SIZE)


def compute_dtype(p: Tensor) -> torch.dtype:
    """The dtype of the temporaries: fp32, or the parameter's if wider."""
    return torch.promote_types(p.dtype, torch.float32) if p.is_floating_point() else p.dtype


def target_format(p: Tensor, state_precision: str, min_8bit_size: int) -> str:
    """How the state of ``p`` is stored: ``"full"``, ``"wide"`` (fp32 or wider), ``"bf16"`` or ``"8bit"``."""
    if state_precision == "full":
        return "full"
    if p.is_complex():
        return "wide"
    if state_precision == "bf16":
        return "bf16"
    return "8bit" if p.numel() >= min_8bit_size else "wide"


def stored_dtype(p: Tensor, fmt: str) -> torch.dtype | None:
    """The dtype of a buffer stored as ``fmt``; None for 8-bit codes."""
    return {"full": p.dtype, "wide": compute_dtype(p), "bf16": torch.bfloat16}.get(fmt)


def is_in_format(state: Mapping[str, Any], p: Tensor, fmt: str) -> bool:
    """Whether every buffer of ``p``'s state is stored as ``fmt``."""
    expects_variance = fmt in ("bf16", "8bit") and "grad_avg" in state
    if ("grad_variance" in state) != expects_variance or ("square_avg" in state) == expects_variance:
        return False
    dtype = stored_dtype(p, fmt)
    for key in STORED:
        if key not in state:
            continue
        quantized = key + ABSMAX_SUFFIX in state
        if quantized != (dtype is None) or (dtype is not None and state[key].dtype != dtype):
            return False
    return True


def stored_keys(state: Mapping[str, Any]) -> list[str]:
    """The buffers held in ``state`` (each 8-bit one with its ``<key>_absmax`` beside it)."""
    return [key for key in STORED if key in state]


def holds_group_layout(state: Mapping[str, Any], p: Tensor, group: Mapping[str, Any], fmt: str) -> bool:
    """Whether ``p``'s state is stored as ``fmt`` with exactly the buffers ``group``'s settings use,
    so that a step needs neither to convert nor to create any."""
    if not state or not is_in_format(state, p, fmt):
        return False
    return ("grad_avg" in state) == group["centered"] and ("momentum_buffer" in state) == (group["momentum"] > 0)


def mean_weight(group: Mapping[str, Any], state: Mapping[str, Any]) -> float:
    """``1/c`` with bias correction ``c = 1 - alpha^t`` at the state's step, else 1.

    Centered RMSProp divides by ``sqrt(v/c - m^2/c^2) = sqrt((v - m^2/c) / c)``,
    so ``v - m^2/c`` is the variance that low-precision state stores.
    """
    step = int(state["step"].item()) if "step" in state else 0
    if group["bias_correction"] and step > 0:
        return 1.0 / (1.0 - group["alpha"] ** step)
    return 1.0
