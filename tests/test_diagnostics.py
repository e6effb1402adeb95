"""Effective step sizes against values worked out by hand from each optimizer's documented rule."""

import itertools
import math

import pytest
import torch

from rmsprop import RMSprop
from rmsprop.core.diagnostics import effective_step_size_tensors, effective_step_sizes, has_step_sizes
from rmsprop.formats.layout import BLOCK_SIZE
from rmsprop.formats.maps import UNSIGNED_MAP


def _stepped(optimizer_class, grads, values=(1.0, 2.0, 3.0), **settings):
    """An optimizer over one parameter after one step per gradient in ``grads``."""
    p = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_class([p], **settings)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    return optimizer, p


def _elements(optimizer):
    [[tensor]] = effective_step_size_tensors(optimizer)
    return tensor.tolist()


def test_ours_default_rule():
    # v = (1 - 0.9) g^2 = [0.1, 0.4, 0.025]; step = 0.1 / sqrt(v) (eps=1e-8 is below the tolerance).
    optimizer, _ = _stepped(RMSprop, [[1.0, -2.0, 0.5]], lr=0.1, alpha=0.9, eps=1e-8)
    expected = [0.31622776601683794, 0.15811388300841897, 0.6324555320336759]
    assert _elements(optimizer) == pytest.approx(expected, rel=1e-6)
    [summary] = effective_step_sizes(optimizer)
    assert summary.count == 3
    assert (summary.min, summary.median, summary.max) == pytest.approx(
        (0.15811388300841897, 0.31622776601683794, 0.6324555320336759), rel=1e-6
    )
    assert summary.histogram is None


def test_ours_bias_correction_and_eps_in_sqrt():
    # t = 1: v_hat = v / (1 - 0.9) = g^2; d = sqrt(g^2 + 16) = [5, 4].
    optimizer, _ = _stepped(
        RMSprop, [[3.0, 0.0]], values=(0.0, 0.0), lr=1.0, alpha=0.9, eps=16.0, bias_correction=True, eps_in_sqrt=True
    )
    assert _elements(optimizer) == pytest.approx([0.2, 0.25], rel=1e-12)


def test_ours_centered_with_bias_correction():
    # alpha=0.5, g=2 then 0: v = 1, m = 0.5, c = 1 - 0.25 = 0.75;
    # s = 1/0.75 - (0.5/0.75)^2 = 4/3 - 4/9 = 8/9; step = 0.1 / sqrt(8/9).
    optimizer, _ = _stepped(
        RMSprop, [[2.0], [0.0]], values=(0.0,), lr=0.1, alpha=0.5, eps=0.0, centered=True, bias_correction=True
    )
    assert _elements(optimizer) == pytest.approx([0.1 / math.sqrt(8 / 9)], rel=1e-12)


def test_torch_rmsprop_centered():
    # alpha=0.5, g=2 then 0: v = 0.5*2 = 1, m = 0.5*1 = 0.5; s = 1 - 0.25; step = 0.1 / sqrt(0.75).
    optimizer, _ = _stepped(torch.optim.RMSprop, [[2.0], [0.0]], values=(0.0,), lr=0.1, alpha=0.5, eps=0.0, centered=True)
    assert _elements(optimizer) == pytest.approx([0.11547005383792516], rel=1e-12)


def test_adagrad_with_lr_decay():
    # g=3 then 4: sum = 0.5 + 9 + 16 = 25.5; lr at step 2 = 0.1 / (1 + 0.5).
    optimizer, _ = _stepped(
        torch.optim.Adagrad, [[3.0], [4.0]], values=(0.0,), lr=0.1, lr_decay=0.5, initial_accumulator_value=0.5, eps=0.0
    )
    assert _elements(optimizer) == pytest.approx([(0.1 / 1.5) / math.sqrt(25.5)], rel=1e-12)


def test_adam_bias_corrected_second_moment():
    # g=2 twice: v = 0.99 * 0.04 + 0.04 = 4 (1 - 0.99^2), so v_hat = 4 and step = lr / 2.
    optimizer, _ = _stepped(torch.optim.Adam, [[2.0], [2.0]], values=(0.0,), lr=0.01, betas=(0.9, 0.99), eps=0.0)
    assert _elements(optimizer) == pytest.approx([0.005], rel=1e-12)


def test_adam_amsgrad_uses_the_running_maximum():
    # g=2 then 0: v1 = 0.04, v2 = 0.0396, max = 0.04; v_hat = 0.04 / (1 - 0.99^2) = 0.04 / 0.0199.
    optimizer, _ = _stepped(
        torch.optim.Adam, [[2.0], [0.0]], values=(0.0,), lr=0.01, betas=(0.9, 0.99), eps=0.0, amsgrad=True
    )
    assert _elements(optimizer) == pytest.approx([0.01 / math.sqrt(0.04 / 0.0199)], rel=1e-12)


def test_adamw_is_read_as_adam():
    optimizer, _ = _stepped(torch.optim.AdamW, [[2.0], [2.0]], values=(0.0,), lr=0.01, betas=(0.9, 0.99), eps=0.0)
    assert _elements(optimizer) == pytest.approx([0.005], rel=1e-12)


@pytest.mark.parametrize(
    "optimizer_class, settings",
    [
        (RMSprop, {"lr": 0.01}),
        (RMSprop, {"lr": 0.01, "centered": True, "eps_in_sqrt": True, "bias_correction": True}),
        (torch.optim.RMSprop, {"lr": 0.01, "centered": True}),
        (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1}),
        (torch.optim.Adam, {"lr": 0.01}),
    ],
)
def test_step_size_times_gradient_is_the_parameter_change(optimizer_class, settings):
    # After earlier steps with other gradients, the next plain update is step_size * g
    # (for Adam the first step, where the corrected first moment is g).
    grads = [[0.3, -1.0, 2.0]] if optimizer_class is torch.optim.Adam else [[1.0, 2.0, -0.5], [0.3, -1.0, 2.0]]
    optimizer, p = _stepped(optimizer_class, grads[:-1], **settings)
    before = p.detach().clone()
    p.grad = torch.tensor(grads[-1], dtype=torch.float64)
    optimizer.step()
    change = (before - p.detach()).tolist()
    expected = [s * g for s, g in zip(_elements(optimizer), grads[-1])]
    assert change == pytest.approx(expected, rel=1e-9)


def test_histogram_in_log10_bins():
    # Step sizes 1 / sqrt(v) = 1e-3, 1e-2, 1e-1; two bins: [1e-3, 1e-2) and [1e-2, 1e-1].
    optimizer, p = _stepped(RMSprop, [[1.0, 1.0, 1.0]], lr=1.0, eps=0.0)
    optimizer.state[p]["square_avg"] = torch.tensor([1e6, 1e4, 1e2], dtype=torch.float64)
    [summary] = effective_step_sizes(optimizer, histogram_bins=2)
    assert summary.histogram.counts == (1, 2)
    assert summary.histogram.edges == pytest.approx((1e-3, 1e-2, 1e-1), rel=1e-9)


def test_histogram_of_equal_values_holds_them_all():
    optimizer, _ = _stepped(RMSprop, [[1.0, 1.0]], values=(0.0, 0.0), lr=1.0, eps=0.0, alpha=0.75)
    [summary] = effective_step_sizes(optimizer, histogram_bins=3)
    assert summary.histogram.counts == (0, 2, 0)
    assert summary.min == summary.max == pytest.approx(2.0)


def test_groups_and_parameters_without_state():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    c = torch.zeros(4, requires_grad=True)
    optimizer = RMSprop([{"params": [a, b]}, {"params": [c], "lr": 0.5}], lr=0.1, alpha=0.5, eps=0.0)
    assert [s.count for s in effective_step_sizes(optimizer)] == [0, 0]
    assert all(math.isnan(s.median) for s in effective_step_sizes(optimizer))

    a.grad = torch.tensor([2.0, 4.0])  # v = 0.5 g^2 = [2, 8]
    c.grad = torch.full((4,), 2.0)
    optimizer.step()
    first, second = effective_step_sizes(optimizer)
    assert first.count == 2  # b has no gradient, so no state
    assert (first.min, first.max) == pytest.approx((0.1 / math.sqrt(8), 0.1 / math.sqrt(2)), rel=1e-6)
    # With an even count the median is the lower of the two middle values.
    assert first.median == pytest.approx(0.1 / math.sqrt(8), rel=1e-6)
    assert second.count == 4 and second.median == pytest.approx(0.5 / math.sqrt(2), rel=1e-6)


def test_complex_parameters_count_real_and_imaginary_parts():
    p = torch.zeros(1, dtype=torch.complex64, requires_grad=True)
    optimizer = torch.optim.RMSprop([p], lr=0.1, alpha=0.5, eps=0.0)
    p.grad = torch.tensor([complex(2.0, 4.0)], dtype=torch.complex64)
    optimizer.step()  # v = 0.5 * (re^2, im^2) = (2, 8)
    [summary] = effective_step_sizes(optimizer)
    assert summary.count == 2
    assert (summary.min, summary.max) == pytest.approx((0.1 / math.sqrt(8), 0.1 / math.sqrt(2)), rel=1e-6)


def test_unsupported_optimizer_is_refused():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        effective_step_sizes(optimizer)


@pytest.mark.parametrize("bins", [0, -1, 2.5, True])
def test_invalid_histogram_bins(bins):
    optimizer = RMSprop([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="histogram_bins"):
        effective_step_sizes(optimizer, histogram_bins=bins)


def test_has_step_sizes():
    params = [torch.zeros(1, requires_grad=True)]
    assert has_step_sizes(RMSprop(params))
    assert has_step_sizes(torch.optim.AdamW(params))
    assert not has_step_sizes(torch.optim.SGD(params, lr=0.1))


# The flags that change the denominator, and momentum, which adds a stored buffer.
_DENOMINATOR_FLAGS = [
    dict(zip(("centered", "bias_correction", "eps_in_sqrt", "momentum"), values, strict=True))
    for values in itertools.product([False, True], [False, True], [False, True], [0.0, 0.9])
]


def _fp32_state_after_steps(settings, steps=6):
    """An fp32-state optimizer over a 2-block and a small parameter, after ``steps`` steps."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.zeros(512, requires_grad=True), torch.zeros(300, requires_grad=True)]
    optimizer = RMSprop(params, lr=0.01, alpha=0.9, **settings)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * torch.logspace(-3, 1, p.numel())
        optimizer.step()
    return optimizer


def _map_gaps(stored: torch.Tensor) -> torch.Tensor:
    """Relative gap between the two codes of the 8-bit map around each element of ``stored``,
    scaled by its block's absmax: how far stochastic rounding can move the element."""
    blocks = torch.nn.functional.pad(stored, (0, -stored.numel() % BLOCK_SIZE)).reshape(-1, BLOCK_SIZE)
    scaled = (blocks / blocks.amax(dim=1, keepdim=True)).reshape(-1)[: stored.numel()]
    codes = UNSIGNED_MAP[UNSIGNED_MAP > 0]
    upper = torch.searchsorted(codes, scaled).clamp(1, codes.numel() - 1)
    return (codes[upper] - codes[upper - 1]) / codes[upper - 1]


def _rounding_bound(state_precision, full_optimizer):
    """How far one rounding of each element's denominator can move it, relative.

    bf16: stochastic rounding goes to a neighbour, at most 2^-7 away. 8-bit: the
    stored root of v (of the variance v - m^2/c when centered, which is all the
    denominator reads) moves by at most the gap between its two codes.
    """
    group = full_optimizer.param_groups[0]
    big, small = group["params"]
    if state_precision == "bf16":
        return torch.full((big.numel() + small.numel(),), 2.0**-7)
    state = full_optimizer.state[big]
    stored = state["square_avg"]
    if group["centered"]:
        weight = 1 / (1 - group["alpha"] ** state["step"].item()) if group["bias_correction"] else 1.0
        stored = (stored - weight * state["grad_avg"] ** 2).clamp(min=0)
    # The small tensor keeps fp32 state (min_8bit_size): no rounding.
    return torch.cat([_map_gaps(stored.sqrt()), torch.full((small.numel(),), 1e-6)])


@pytest.mark.parametrize("state_precision", ["bf16", "8bit"])
@pytest.mark.parametrize("settings", _DENOMINATOR_FLAGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_low_precision_state_gives_the_step_sizes_of_full_precision_state(settings, state_precision):
    """Reference: fp32 state, and its step sizes. Loaded into a low-precision optimizer, the
    state is rounded once; the step sizes read from it differ by that rounding only (the
    step size is lr / sqrt(v) to first order, so by the root's relative rounding)."""
    full_optimizer = _fp32_state_after_steps(settings)
    params = [p.detach().clone().requires_grad_() for p in full_optimizer.param_groups[0]["params"]]
    low_optimizer = RMSprop(params, lr=0.01, state_precision=state_precision, min_8bit_size=400)
    low_optimizer.load_state_dict(full_optimizer.state_dict())
    assert any(key.endswith("_absmax") for key in low_optimizer.state[params[0]]) == (state_precision == "8bit")
    assert ("grad_variance" in low_optimizer.state[params[0]]) == settings["centered"]

    [[*full]], [[*low]] = effective_step_size_tensors(full_optimizer), effective_step_size_tensors(low_optimizer)
    full, low = torch.cat(full), torch.cat(low)
    relative = (low / full - 1).abs()
    bound = _rounding_bound(state_precision, full_optimizer)
    assert (relative <= bound).all(), f"{(relative / bound).max():.2f} times the rounding bound"
    [got], [expected] = effective_step_sizes(low_optimizer), effective_step_sizes(full_optimizer)
    assert got.count == expected.count
    assert got.median == pytest.approx(expected.median, rel=bound.max().item())
