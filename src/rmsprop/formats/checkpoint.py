"""Low-precision entries in state dicts: kept as saved through ``Optimizer.load_state_dict``, and checked."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from rmsprop.formats.layout import ABSMAX_SUFFIX, STORED, num_blocks

__all__ = ["check_encoded_entries", "exact_entries", "restore_entries", "state_bytes"]


def exact_entries(state_dict: Mapping[str, Any]) -> dict[Any, dict[str, Tensor]]:
    """The buffers of a state dict, which ``Optimizer.load_state_dict`` would cast to the parameter's dtype:
    bfloat16 buffers, 8-bit codes and their absmax must stay as they are."""
    kept = {}
    for param_id, param_state in state_dict["state"].items():
        entries = {key: value for key, value in param_state.items() if key != "step" and isinstance(value, Tensor)}
        if entries:
            kept[param_id] = entries
    return kept


def restore_entries(
    kept: Mapping[Any, Mapping[str, Tensor]], saved_ids: Iterable[Any], params: Iterable[Tensor], state: Mapping
) -> None:
    """Put ``kept`` entries back, on their parameter's device, into the loaded ``state``."""
    for param_id, p in zip(saved_ids, params):
        for key, value in kept.get(param_id, {}).items():
            state[p][key] = value.to(device=p.device)


def check_encoded_entries(p_state: Mapping[str, Any], p: Tensor, where: str) -> None:
    """``ValueError`` unless the low-precision entries of a loaded state fit parameter ``p``."""
    if "grad_variance" in p_state:
        if "grad_avg" not in p_state or "square_avg" in p_state:
            raise ValueError(f"{where}: 'grad_variance' needs 'grad_avg' and replaces 'square_avg'")
        value = p_state["grad_variance"]
        if not (isinstance(value, Tensor) and value.shape == p.shape):
            raise ValueError(f"{where}: 'grad_variance' must be a tensor of shape {tuple(p.shape)}")
    for key in STORED:
        absmax = p_state.get(key + ABSMAX_SUFFIX)
        if absmax is None:
            continue
        codes = p_state.get(key)
        if not (isinstance(codes, Tensor) and codes.dtype == torch.uint8):
            raise ValueError(f"{where}: {key!r} has an absmax entry, so it must hold uint8 codes")
        blocks = num_blocks(p.numel())
        if not (isinstance(absmax, Tensor) and absmax.shape == (blocks,) and absmax.dtype == torch.float32):
            raise ValueError(f"{where}: {key + ABSMAX_SUFFIX!r} must be a float32 tensor of shape ({blocks},)")


def state_bytes(states: Iterable[Mapping[str, Any]]) -> int:
    """Bytes held by the tensors of optimizer states (``step`` included)."""
    return sum(
        value.numel() * value.element_size()
        for state in states
        for value in state.values()
        if isinstance(value, Tensor)
    )
