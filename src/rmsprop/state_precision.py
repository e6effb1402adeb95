r"""Low-precision optimizer state: bfloat16 and blockwise 8-bit codecs.

The update rule is not repeated here. A step with low-precision state, per
parameter tensor (so that only one tensor's state is ever held in fp32):

1. **decode** the stored state to fp32 temporaries (:func:`decode_state`),
2. run :func:`rmsprop.functional.rmsprop` on them,
3. **encode** the temporaries back to the stored form (:func:`encode_state`).

Stored forms of each buffer (``square_avg``, ``momentum_buffer``, ``grad_avg``):

``"full"``
    A tensor of the parameter's dtype, exactly as ``torch.optim.RMSprop``.
``"bf16"``
    A ``bfloat16`` tensor of the parameter's shape, rounded **stochastically**
    from the fp32 result: a value between two neighbouring bfloat16 numbers
    ``lo < x < hi`` becomes ``hi`` with probability ``(x - lo) / (hi - lo)``,
    so ``E[round(x)] = x``. Round-to-nearest would be biased: with
    ``alpha = 0.999`` the update ``v <- v + 0.001 (g^2 - v)`` moves ``v`` by
    less than half a bfloat16 ulp (``2^-9`` to ``2^-8`` of ``v``) unless
    ``g^2`` exceeds about 3 to 5 times ``v``; ``v`` could then never decrease.
    Stochastic rounding keeps every small update in expectation (Gupta et
    al., 2015, arXiv:1502.02551), at the price of a random walk of each
    element (about 2% of ``v`` with ``alpha = 0.999``, half that in the
    denominator). Kahan-compensated bf16 would be deterministic but needs a
    second bf16 buffer, i.e. fp32's memory.
``"8bit"``
    ``uint8`` codes of the parameter's shape plus ``<key>_absmax``, one fp32
    per block of :data:`BLOCK_SIZE` consecutive elements (of the flattened
    tensor). An element decodes as ``qmap[code] * absmax[block]``, where
    ``qmap`` is a dynamic map (:func:`dynamic_map`: 7 decades, more codes in
    the decades near the block maximum), the map of bitsandbytes' 8-bit
    optimizers (Dettmers et al., 2022, arXiv:2110.02861). Codes are rounded
    stochastically between the two neighbouring map values, for the same
    reason as bfloat16. ``momentum_buffer`` and ``grad_avg`` use the signed
    map; ``square_avg`` the unsigned map, on ``sqrt(square_avg)``:
    ``square_avg`` is the square of a gradient scale, so within one block it
    spans twice as many decades as the gradients, and the map's 7 decades
    would round to 0 every element with a gradient 3000 times smaller than
    the block's largest (measured by ``rmsprop bench-memory``). Its root
    rounds to 0 only below 1e-7 of the block's largest root. A code of 0 is
    not a disaster without centering: the new ``(1-alpha) g^2`` enters the
    denominator before the division, so ``|g / d| <= 1/sqrt(1 - alpha)``;
    but it is 10 to 30 times the normal step.

Centered RMSProp divides by ``sqrt(v - m^2)`` (with bias correction
``c = 1 - alpha^t``: ``sqrt((v - m^2/c) / c)``). Where gradients are steady,
``v - m^2`` is a small difference of two large terms, and two independently
rounded bf16 or 8-bit values of ``v`` and ``m^2`` cancel to 0 or below, which
sends the step to ``g / eps`` (measured: within 200-300 steps of gradients
with 1% spread). So with ``grad_avg``, low-precision state stores
``grad_variance = max(v - m^2/c, 0)`` (8-bit: its root) in place of
``square_avg`` and decodes ``v = grad_variance + m^2/c``: the rule then sees
the variance with the relative error of one code, never a cancellation.

Tensors with fewer than ``min_8bit_size`` elements, and complex parameters in
every mode, keep their state at fp32 or the parameter's dtype, whichever is
wider.

Randomness. The rounding noise of buffer ``key`` of the parameter at position
``i`` in the optimizer at step ``t`` is a SplitMix64 stream seeded by a hash of
``(i, key, t)`` (:func:`rounding_seed`), one 64-bit output per element, by its
index (:func:`rounding_bits`). It touches no global RNG (so data order and
dropout draw the same numbers as with fp32 state), and it is a function of the
state alone: a run resumed from a state dict rounds exactly as the
uninterrupted run, and two runs with the same inputs are bit-identical. Being
counter-based, it lets the fused kernels (:func:`rmsprop.fused.fused_rmsprop_encoded`)
draw each element's bits on their own, block by block on any thread, the same
bits as here.

This per-tensor path (:func:`step_encoded`, the optimizer's ``fused=False``)
is the readable reference of those kernels: they decode, apply the rule and
encode one block of :data:`BLOCK_SIZE` elements at a time, with the same maps,
code lookup (:func:`interval_table`) and noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from rmsprop.functional import Hyperparameters, rmsprop

__all__ = [
    "BLOCK_SIZE",
    "KEY_SHIFT",
    "SPLITMIX_GAMMA",
    "SPLITMIX_MIX_1",
    "SPLITMIX_MIX_2",
    "SIGNED_MAP",
    "UNSIGNED_MAP",
    "bf16_noise",
    "convert_state",
    "decode_state",
    "dequantize_blockwise",
    "dynamic_map",
    "encode_state",
    "holds_group_layout",
    "interval_table",
    "is_in_format",
    "mean_weight",
    "quantize_blockwise",
    "rounding_bits",
    "rounding_seed",
    "state_bytes",
    "step_encoded",
    "stochastic_round_bf16",
    "stored_keys",
    "target_format",
    "uniform_noise",
]

BLOCK_SIZE = 256
# Entries that can hold a buffer; grad_variance replaces square_avg in centered low-precision state.
STORED = ("grad_avg", "momentum_buffer", "square_avg", "grad_variance")
# 8-bit entries stored as their square root, with the unsigned map.
_ROOTS = ("square_avg", "grad_variance")
_ABSMAX = "_absmax"


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


_INTERVALS = {id(SIGNED_MAP): _interval_table(SIGNED_MAP), id(UNSIGNED_MAP): _interval_table(UNSIGNED_MAP)}


def interval_table(qmap: Tensor) -> Tensor:
    """The int32 table of :func:`_lower_index` for :data:`SIGNED_MAP` or :data:`UNSIGNED_MAP`
    (entry ``key`` of ``x``: the fp32 bits of ``x`` shifted right by :data:`KEY_SHIFT`, unsigned)."""
    return _INTERVALS[id(qmap)]


def _lower_index(qmap: Tensor, x: Tensor) -> Tensor:
    """int32 ``i`` in [0, 254] with ``qmap[i] < x <= qmap[i+1]``, or the nearest end of the map."""
    table = _INTERVALS.get(id(qmap))
    if table is None or x.device.type != "cpu":
        return torch.searchsorted(qmap, x, out_int32=True).clamp_(1, qmap.numel() - 1).sub_(1)
    keys = (x.view(torch.int32) >> KEY_SHIFT).bitwise_and_(_KEY_MASK)
    below = torch.index_select(table, 0, keys)
    return below.add_(torch.index_select(qmap, 0, below) < x).clamp_(1, qmap.numel() - 1).sub_(1)


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


def rounding_bits(seed: int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """64 random bits (int64) per element: element ``i`` of the flattened shape gets output ``i + 1`` of
    SplitMix64 from state ``seed``.

    Counter-based, so any element's bits can be computed on their own: the
    fused kernel (:mod:`rmsprop.cpu_kernel`) draws the same bits for the
    same element, block by block. int64 arithmetic wraps as uint64 does.
    """
    numel = math.prod(shape)
    x = torch.arange(1, numel + 1, dtype=torch.int64, device=device) * _int64(SPLITMIX_GAMMA) + _int64(seed)
    x = (x ^ _shift_right(x, 30)) * _int64(SPLITMIX_MIX_1)
    x = (x ^ _shift_right(x, 27)) * _int64(SPLITMIX_MIX_2)
    return (x ^ _shift_right(x, 31)).reshape(shape)


def bf16_noise(bits: Tensor) -> Tensor:
    """int32 noise uniform in ``[0, 2^16)`` for :func:`stochastic_round_bf16`: the top 16 of ``bits``."""
    return _shift_right(bits, 48).to(torch.int32)


def uniform_noise(bits: Tensor) -> Tensor:
    """fp32 noise uniform in ``[0, 1)`` for :func:`quantize_blockwise`: the top 24 of ``bits``, exact in fp32."""
    return _shift_right(bits, 40).to(torch.float32) * 2.0**-24


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

    Each block of :data:`BLOCK_SIZE` flattened elements is divided by its
    largest magnitude and rounded to one of the two neighbouring values of the
    sorted ``qmap``: up with probability proportional to the distance from the
    lower one when ``uniform`` (U[0, 1) noise, one per element) is given,
    otherwise to the nearest. Values outside the map's range clamp to its ends.
    """
    flat = x.reshape(-1).to(torch.float32)
    blocks = _pad_to_blocks(flat)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0).unsqueeze(1)
    scaled = scaled.reshape(-1)[: flat.numel()]
    qmap = qmap.to(x.device)
    lower = _lower_index(qmap, scaled)
    low = torch.index_select(qmap, 0, lower)
    gap = torch.index_select(qmap, 0, lower + 1).sub_(low)
    fraction = scaled.sub_(low).div_(gap)
    round_up = fraction >= 0.5 if uniform is None else uniform.reshape(-1) < fraction
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


def num_blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK_SIZE)


# --- formats of a parameter's state -----------------------------------------


def _compute_dtype(p: Tensor) -> torch.dtype:
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


def _stored_dtype(p: Tensor, fmt: str) -> torch.dtype | None:
    """The dtype of a buffer stored as ``fmt``; None for 8-bit codes."""
    return {"full": p.dtype, "wide": _compute_dtype(p), "bf16": torch.bfloat16}.get(fmt)


def is_in_format(state: Mapping[str, Any], p: Tensor, fmt: str) -> bool:
    """Whether every buffer of ``p``'s state is stored as ``fmt``."""
    expects_variance = fmt in ("bf16", "8bit") and "grad_avg" in state
    if ("grad_variance" in state) != expects_variance or ("square_avg" in state) == expects_variance:
        return False
    dtype = _stored_dtype(p, fmt)
    for key in STORED:
        if key not in state:
            continue
        quantized = key + _ABSMAX in state
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


def decode_state(state: Mapping[str, Any], p: Tensor, weight: float = 1.0) -> dict[str, Tensor]:
    """The buffers of ``p``'s state (``square_avg``, and ``momentum_buffer`` and ``grad_avg`` where
    present) as tensors of the compute dtype (fp32 or wider); ``weight`` is :func:`mean_weight`.

    A buffer already stored in that dtype is returned itself, not copied, so
    that it is updated in place.
    """
    dtype = _compute_dtype(p)
    decoded = {}
    for key in STORED:
        if key not in state:
            continue
        if key + _ABSMAX in state:
            qmap = UNSIGNED_MAP if key in _ROOTS else SIGNED_MAP
            value = dequantize_blockwise(state[key], state[key + _ABSMAX], qmap, dtype)
            if key in _ROOTS:
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
    rounding noise comes from :func:`rounding_bits` at the state's step.
    """
    stored = dict(values)
    if fmt in ("bf16", "8bit") and "grad_avg" in stored:
        mean = stored["grad_avg"]
        stored["grad_variance"] = stored.pop("square_avg").addcmul(mean, mean, value=-weight).clamp_(min=0)
    for key in STORED:
        state.pop(key, None)
        state.pop(key + _ABSMAX, None)
    step = int(state["step"].item()) if "step" in state else 0
    for key, value in stored.items():
        if fmt in ("full", "wide"):
            state[key] = value.to(_stored_dtype(p, fmt))
            continue
        bits = rounding_bits(rounding_seed(param_index, key, step), value.shape, value.device)
        if fmt == "bf16":
            state[key] = stochastic_round_bf16(value.to(torch.float32), bf16_noise(bits))
            continue
        uniform = uniform_noise(bits)
        if key in _ROOTS:
            state[key], state[key + _ABSMAX] = quantize_blockwise(value.clamp(min=0).sqrt_(), UNSIGNED_MAP, uniform)
        else:
            state[key], state[key + _ABSMAX] = quantize_blockwise(value, SIGNED_MAP, uniform)


def convert_state(state: dict[str, Any], p: Tensor, fmt: str, param_index: int, weight: float = 1.0) -> None:
    """Re-store ``p``'s buffers in format ``fmt`` if they are in another one."""
    if not is_in_format(state, p, fmt):
        encode_state(state, p, decode_state(state, p, weight), fmt, param_index, weight)


def _filled(p: Tensor, dtype: torch.dtype, value: float) -> Tensor:
    if p.is_complex():
        return torch.full(p.shape, complex(value, value), dtype=p.dtype, device=p.device)
    return torch.full(p.shape, value, dtype=dtype, device=p.device)


def step_encoded(
    params: list[Tensor],
    states: list[dict[str, Any]],
    param_indices: list[int],
    group: Mapping[str, Any],
    *,
    foreach: bool,
    new_step: Any,
) -> None:
    """One RMSProp step of ``params`` (all with grads) whose state is stored per ``group["state_precision"]``.

    ``new_step(p)`` makes the ``step`` entry of a fresh state.
    """
    hp = Hyperparameters.from_group(group)
    for p, state, index in zip(params, states, param_indices, strict=True):
        fmt = target_format(p, group["state_precision"], group["min_8bit_size"])
        dtype = _compute_dtype(p)
        if not state:
            state["step"] = new_step(p)
        values = decode_state(state, p, mean_weight(group, state))
        values.setdefault("square_avg", _filled(p, dtype, group["initial_scale"]))
        if group["momentum"] > 0:
            values.setdefault("momentum_buffer", _filled(p, dtype, 0.0))
        if group["centered"]:
            values.setdefault("grad_avg", _filled(p, dtype, 0.0))
        work_param = p if p.dtype == dtype else p.detach().to(dtype)
        grad = p.grad if p.grad.dtype == dtype else p.grad.to(dtype)
        rmsprop(
            [work_param],
            [grad],
            [values["square_avg"]],
            [values["grad_avg"]] if group["centered"] else [],
            [values["momentum_buffer"]] if group["momentum"] > 0 else [],
            [state["step"]],
            hp,
            foreach=foreach,
        )
        if work_param is not p:
            p.copy_(work_param)
        encode_state(state, p, values, fmt, index, mean_weight(group, state))


# --- state dicts --------------------------------------------------------------


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
        absmax = p_state.get(key + _ABSMAX)
        if absmax is None:
            continue
        codes = p_state.get(key)
        if not (isinstance(codes, Tensor) and codes.dtype == torch.uint8):
            raise ValueError(f"{where}: {key!r} has an absmax entry, so it must hold uint8 codes")
        blocks = num_blocks(p.numel())
        if not (isinstance(absmax, Tensor) and absmax.shape == (blocks,) and absmax.dtype == torch.float32):
            raise ValueError(f"{where}: {key + _ABSMAX!r} must be a float32 tensor of shape ({blocks},)")


def state_bytes(states: Iterable[Mapping[str, Any]]) -> int:
    """Bytes held by the tensors of optimizer states (``step`` included)."""
    return sum(
        value.numel() * value.element_size()
        for state in states
        for value in state.values()
        if isinstance(value, Tensor)
    )
