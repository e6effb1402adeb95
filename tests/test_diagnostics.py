"""Effective step sizes against values worked out by hand from each optimizer's documented rule."""

import math

import pytest
import torch

from rmsprop import RMSprop
from rmsprop.diagnostics import effective_step_size_tensors, effective_step_sizes, has_step_sizes


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
