r"""State formats: how ``square_avg``, ``momentum_buffer`` and ``grad_avg`` are stored.

``state_precision="full"``
    A tensor of the parameter's dtype, exactly as ``torch.optim.RMSprop``.
``"bf16"``
    A ``bfloat16`` tensor of the parameter's shape, rounded stochastically from
    the fp32 result: a value between neighbouring bfloat16 numbers
    ``lo < x < hi`` becomes ``hi`` with probability ``(x - lo) / (hi - lo)``,
    so ``E[round(x)] = x``.
``"8bit"``
    ``uint8`` codes of the parameter's shape plus ``<key>_absmax``, one fp32
    per block of 256 consecutive elements: an element decodes as
    ``qmap[code] * absmax[block]`` with a dynamic map (:mod:`.maps`), codes
    rounded stochastically between the two neighbouring map values.
    ``square_avg`` is stored as its square root, with the unsigned map.

With ``grad_avg`` (centered), bf16 and 8-bit state store
``grad_variance = max(v - m^2/c, 0)`` (``c = 1 - alpha^t`` with bias
correction, else 1) in place of ``square_avg`` and decode
``v = grad_variance + m^2/c``. Tensors with fewer than ``min_8bit_size``
elements, and complex parameters, keep fp32 (or wider) state.

The rounding noise of buffer ``key`` of the parameter at position ``i`` at
step ``t`` is a SplitMix64 stream seeded by ``(i, key, t)``, one output per
element (:mod:`.noise`): no global RNG is touched, and a run resumed from a
state dict rounds exactly as the uninterrupted run.

Modules: :mod:`.layout` (entries and dtypes of each format), :mod:`.maps`,
:mod:`.noise`, :mod:`.codecs` (encode and decode), :mod:`.checkpoint` (state
dicts). Why the formats are built this way: docs/design/state-formats.md.
"""
