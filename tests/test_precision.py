"""Half-precision parameters, and ``torch.amp.GradScaler`` driving RMSprop."""

import math

import numpy as np
import pytest
import torch

from rmsprop import RMSprop, reference

LOW_PRECISION = [torch.float16, torch.bfloat16]
FLAG_COMBOS = [
    {},
    {"momentum": 0.9, "centered": True, "weight_decay": 0.1},
    {"eps_in_sqrt": True, "lr_in_momentum": True, "momentum": 0.9, "nesterov": True, "eps": 1e-3},
    {"bias_correction": True, "decoupled_weight_decay": True, "weight_decay": 0.1, "maximize": True},
]


def _grads(shape: tuple[int, ...], steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(steps)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_params_step_as_torch(dtype, foreach):
    def trajectory(optimizer_class):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4).to(dtype))
        optimizer = optimizer_class([param], lr=0.01, alpha=0.9, momentum=0.5, foreach=foreach)
        for grad in _grads((3, 4), 4, dtype):
            param.grad = grad
            optimizer.step()
        assert all(t.dtype == dtype for t in optimizer.state[param].values() if t.dim() > 0)
        return param.detach()

    assert torch.equal(trajectory(RMSprop), trajectory(torch.optim.RMSprop))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=str)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_step_is_the_rule_within_rounding(dtype, flags, foreach):
    """One step from a low-precision param equals the float64 rule, up to the dtype's rounding."""
    param = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4).to(dtype))
    (grad,) = _grads((3, 4), 1, dtype)
    expected, _ = reference.step(
        param.detach().double().numpy(),
        grad.double().numpy(),
        reference.init_state(param.detach().double().numpy()),
        lr=0.01,
        alpha=0.9,
        **flags,
    )
    optimizer = RMSprop([param], lr=0.01, alpha=0.9, foreach=foreach, **flags)
    param.grad = grad
    optimizer.step()
    resolution = torch.finfo(dtype).eps
    # A few roundings of intermediates, each relative to the update's size (lr/sqrt(1-alpha) at most).
    np.testing.assert_allclose(param.detach().double().numpy(), expected, rtol=2 * resolution, atol=0.05 * resolution)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 4, generator=generator) for _ in range(n)]


@pytest.mark.parametrize("bad_value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=str)
def test_grad_scaler_skips_non_finite_steps_and_otherwise_matches_fp32(flags, bad_value):
    batches = _batches(5)
    poisoned = 2  # the batch whose gradient is made non-finite

    # Reference: plain fp32 training that never sees the poisoned batch.
    model = _model()
    optimizer = RMSprop(model.parameters(), lr=0.01, **flags)
    for index, x in enumerate(batches):
        if index == poisoned:
            continue
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    expected = [p.detach() for p in model.parameters()]

    scaled_model = _model()
    scaled_optimizer = RMSprop(scaled_model.parameters(), lr=0.01, **flags)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for index, x in enumerate(batches):
        scaled_optimizer.zero_grad()
        scaler.scale(scaled_model(x).pow(2).mean()).backward()
        if index == poisoned:
            scaled_model[0].weight.grad[0, 0] = bad_value
            params_before = [p.detach().clone() for p in scaled_model.parameters()]
            steps_before = [state["step"].item() for state in scaled_optimizer.state.values()]
        scaler.step(scaled_optimizer)
        scale_before_update = scaler.get_scale()
        scaler.update()
        if index == poisoned:
            assert all(torch.equal(p, q) for p, q in zip(scaled_model.parameters(), params_before))
            assert [state["step"].item() for state in scaled_optimizer.state.values()] == steps_before
            assert scaler.get_scale() == scale_before_update / 2
    for p, q in zip(scaled_model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad_value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_non_finite_gradients_propagate_as_in_torch(bad_value, foreach):
    """The documented policy: no filtering, as torch.optim (GradScaler is the tool that skips)."""

    def after_step(optimizer_class):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = optimizer_class([param], lr=0.01, momentum=0.9, foreach=foreach)
        param.grad = torch.tensor([0.5, bad_value, -0.5])
        optimizer.step()
        return param.detach()

    ours = after_step(RMSprop)
    assert torch.equal(ours.isnan(), after_step(torch.optim.RMSprop).isnan())
    assert not ours[1].isfinite()
    assert ours[0].isfinite() and ours[2].isfinite()
