"""The dynamic 8-bit maps of blockwise quantization, and a fast search in them."""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

__all__ = ["KEY_SHIFT", "SIGNED_MAP", "UNSIGNED_MAP", "dynamic_map", "interval_table", "lower_index"]


def dynamic_map(signed: bool, decades: int = 7) -> Tensor:
    """The 256 sorted values of a dynamic 8-bit map on [-1, 1] (signed) or [0, 1].

    Decade ``k = 0 .. decades-1`` covers ``[0.1, 1] * 10^(k - decades + 1)``
    with ``2^k`` (signed, per sign) or ``2^(k+1)`` (unsigned) equal bins, each
    represented by its midpoint; 0 and 1 complete the map. The top decade thus
    has a relative spacing of 0.7% (unsigned) to 1.4% (signed) at 1, and
    elements below about ``10^-(decades-1) / 10`` of the block maximum round to 0.
    This is the layout of bitsandbytes' ``create_dynamic_map``, except that the
    signed map trades its negative value nearest 0 for -1: the block's largest
    magnitude is then exact for either sign, where bitsandbytes shrinks a
    negative one by 0.7% at every encoding.
    """
    magnitudes = []
    for k in range(decades):
        bins = 2 ** (k if signed else k + 1)
        edges = torch.linspace(0.1, 1.0, bins + 1, dtype=torch.float64)
        midpoints = (edges[:-1] + edges[1:]) / 2
        magnitudes.append(midpoints * 10.0 ** (k - decades + 1))
    magnitudes = torch.cat(magnitudes)
    values = [magnitudes, -magnitudes[1:], torch.tensor([-1.0], dtype=torch.float64)] if signed else [magnitudes]
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float64))
    qmap = torch.sort(torch.cat(values)).values.to(torch.float32)
    if qmap.numel() != 256:
        raise ValueError(f"a dynamic map with decades={decades} has {qmap.numel()} values, not 256")
    return qmap


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)

# A faster searchsorted on a map: the fp32 bit pattern of x, less its 13 lowest
# bits, selects an interval 2^-10 wide (relative) that holds at most one map
# value, so the count of map values below the interval, plus one comparison,
# gives the map index.
KEY_SHIFT = 13
_KEY_MASK = (1 << (32 - KEY_SHIFT)) - 1


def _interval_table(qmap: Tensor) -> Tensor:
    keys = torch.arange(_KEY_MASK + 1, dtype=torch.int32)
    low_end = (keys << KEY_SHIFT).view(torch.float32)
    high_end = ((keys << KEY_SHIFT) | ((1 << KEY_SHIFT) - 1)).view(torch.float32)
    lows, highs = torch.minimum(low_end, high_end), torch.maximum(low_end, high_end)
    below = torch.searchsorted(qmap, lows)
    finite = torch.isfinite(lows) & torch.isfinite(highs)
    if (torch.searchsorted(qmap, highs, right=True) - below)[finite].max() > 1:
        raise ValueError("map values closer than the interval table resolves")
    return below.clamp_(max=qmap.numel() - 1).to(torch.int32)


@cache
def _interval_tables() -> dict[int, Tensor]:
    """Made on first use: they take a noticeable part of a second."""
    return {id(SIGNED_MAP): _interval_table(SIGNED_MAP), id(UNSIGNED_MAP): _interval_table(UNSIGNED_MAP)}


def interval_table(qmap: Tensor) -> Tensor:
    """The int32 table of :func:`lower_index` for :data:`SIGNED_MAP` or :data:`UNSIGNED_MAP`
    (entry ``key`` of ``x``: the fp32 bits of ``x`` shifted right by :data:`KEY_SHIFT`, unsigned)."""
    return _interval_tables()[id(qmap)]


def lower_index(qmap: Tensor, x: Tensor) -> Tensor:
    """int32 ``i`` in [0, 254] with ``qmap[i] < x <= qmap[i+1]``, or the nearest end of the map."""
    table = _interval_tables().get(id(qmap))
    if table is None or x.device.type != "cpu":
        return torch.searchsorted(qmap, x, out_int32=True).clamp_(1, qmap.numel() - 1).sub_(1)
    keys = (x.view(torch.int32) >> KEY_SHIFT).bitwise_and_(_KEY_MASK)
    below = torch.index_select(table, 0, keys)
    return below.add_(torch.index_select(qmap, 0, below) < x).clamp_(1, qmap.numel() - 1).sub_(1)
