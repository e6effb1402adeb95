"""The NumPy reference against hand-derived values, and the torch optimizer against the reference."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rmsprop import RMSprop, reference

FLAGS = (
    "centered",
    "maximize",
    "eps_in_sqrt",
    "bias_correction",
    "nesterov",
    "decoupled_weight_decay",
    "lr_in_momentum",
)


# --- the reference against values worked out by hand -------------------------------


def test_first_step_of_plain_rmsprop_by_hand():
    # v1 = (1 - alpha) g^2, so the step is lr * g / (|g| sqrt(1 - alpha) + eps).
    g = np.array([0.5, -2.0, 0.0])
    with np.errstate(invalid="ignore"):
        param, state = reference.step(np.zeros(3), g, reference.init_state(np.zeros(3)), lr=0.1, alpha=0.75, eps=0.0)
    np.testing.assert_allclose(param, [-0.2, 0.2, np.nan], equal_nan=True)  # 0/0 with eps=0
    np.testing.assert_allclose(state.square_avg, [0.0625, 1.0, 0.0])


def test_two_steps_eps_in_sqrt_by_hand():
    # alpha = 0.5: v1 = g1^2/2 = 2, v2 = (2 + 4^2)/2 = 9; eps=7 inside the root: sqrt(9 + 7) = 4.
    param, state = reference.step(np.array([1.0]), np.array([2.0]), reference.init_state(np.ones(1)), lr=1.0, alpha=0.5, eps=7.0, eps_in_sqrt=True)
    np.testing.assert_allclose(param, [1.0 - 2.0 / 3.0])  # sqrt(2 + 7) = 3
    param, state = reference.step(param, np.array([4.0]), state, lr=1.0, alpha=0.5, eps=7.0, eps_in_sqrt=True)
    np.testing.assert_allclose(param, [1.0 - 2.0 / 3.0 - 4.0 / 4.0])
    assert state.step == 2


def test_centered_bias_corrected_by_hand():
    # alpha = 0.5, g = 2 then 4: v2 = (2 + 16)/2 = 9, m2 = (1 + 4)/2 = 2.5, c2 = 1 - 1/4 = 0.75.
    # s = 9/0.75 - (2.5/0.75)^2 = 12 - 100/9 = 8/9.
    settings_ = dict(lr=1.0, alpha=0.5, eps=0.0, centered=True, bias_correction=True)
    with np.errstate(divide="ignore"):
        param, state = reference.step(np.zeros(1), np.array([2.0]), reference.init_state(np.zeros(1)), **settings_)
    # Step 1: v/c = g^2, m/c = g, so s = 0 and the update is g / 0.
    assert np.isinf(param[0])
    param, state = reference.step(np.zeros(1), np.array([4.0]), state, **settings_)
    np.testing.assert_allclose(param, [-4.0 / np.sqrt(8.0 / 9.0)])


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_lr_placement_by_hand(nesterov):
    # With a constant update u = 1 (v = g^2 when alpha = 0, eps = 0, g = 1) and mu = 0.5:
    # torch style: b1 = 1, b2 = 1.5; TF style with lr = 0.1: b1 = 0.1, b2 = 0.15.
    common = dict(alpha=0.0, eps=0.0, momentum=0.5, nesterov=nesterov)
    torch_style = tf_style = np.zeros(1)
    torch_state = tf_state = reference.init_state(np.zeros(1))
    for _ in range(2):
        torch_style, torch_state = reference.step(torch_style, np.ones(1), torch_state, lr=0.1, **common)
        tf_style, tf_state = reference.step(tf_style, np.ones(1), tf_state, lr=0.1, lr_in_momentum=True, **common)
    np.testing.assert_allclose(torch_state.momentum_buffer, [1.5])
    np.testing.assert_allclose(tf_state.momentum_buffer, [0.15])
    expected = -0.1 * ((1 + 0.5 * 1) + (1 + 0.5 * 1.5)) if nesterov else -0.1 * (1 + 1.5)
    np.testing.assert_allclose(torch_style, [expected])
    np.testing.assert_allclose(tf_style, [expected])  # same while lr is constant


def test_decoupled_weight_decay_shrinks_before_the_step():
    # alpha = 0, eps = 0: u = sign(g); p = 2 * (1 - 0.1 * 0.5) - 0.1 = 1.8.
    param, _ = reference.step(np.array([2.0]), np.array([3.0]), reference.init_state(np.zeros(1)), lr=0.1, alpha=0.0, eps=0.0, weight_decay=0.5, decoupled_weight_decay=True)
    np.testing.assert_allclose(param, [1.8])
    # Coupled: g = 3 + 0.5 * 2 = 4, u = 1, p = 2 - 0.1.
    param, _ = reference.step(np.array([2.0]), np.array([3.0]), reference.init_state(np.zeros(1)), lr=0.1, alpha=0.0, eps=0.0, weight_decay=0.5)
    np.testing.assert_allclose(param, [1.9])


def test_reference_matches_torch_optim_rmsprop_for_its_flags():
    rng = np.random.default_rng(0)
    param = rng.standard_normal(7)
    torch_param = torch.tensor(param, requires_grad=True)
    optimizer = torch.optim.RMSprop([torch_param], lr=0.03, alpha=0.8, eps=1e-6, weight_decay=0.1, momentum=0.7, centered=True, maximize=True)
    state = reference.init_state(param)
    for _ in range(25):
        grad = rng.standard_normal(7)
        torch_param.grad = torch.tensor(grad)
        optimizer.step()
        param, state = reference.step(param, grad, state, lr=0.03, alpha=0.8, eps=1e-6, weight_decay=0.1, momentum=0.7, centered=True, maximize=True)
    np.testing.assert_allclose(torch_param.detach().numpy(), param, rtol=1e-12, atol=1e-12)


# --- the torch optimizer against the reference, over random settings --------------


@st.composite
def configurations(draw):
    flags = {name: draw(st.booleans()) for name in FLAGS}
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    if momentum == 0:
        flags["nesterov"] = False
    alphas = [0.0, 0.5, 0.9, 0.99] + ([] if flags["bias_correction"] else [1.0])
    epsilons = [0.0, 1e-8, 1e-3]
    if flags["centered"]:
        # The variance estimate v - m^2 cancels to rounding noise when alpha = 0;
        # the step would then depend on that noise alone.
        alphas = [0.5, 0.9, 0.99]
        if flags["bias_correction"]:
            epsilons = [1e-3]  # see _tolerance: step 1 divides by little more than eps
    return {
        **flags,
        "lr": draw(st.sampled_from([1e-3, 1e-2, 0.1])),
        "alpha": draw(st.sampled_from(alphas)),
        "eps": draw(st.sampled_from(epsilons)),
        "weight_decay": draw(st.sampled_from([0.0, 0.1])),
        "momentum": momentum,
        "initial_scale": draw(st.sampled_from([0.0, 1.0])),
    }


def _tolerance(config):
    """Float64 agreement, except where the centered variance is pure rounding noise.

    With bias correction, step 1 has v/c = g^2 and m/c = g, so s = v/c - (m/c)^2 is
    ~1e-17 (torch's fused multiply-add) or 0; sqrt(s) ~ 3e-9 then shifts the
    denominator sqrt(s) + eps by up to 3e-9/eps relative.
    """
    if config["centered"] and config["bias_correction"]:
        # Observed up to 2.6e-4 relative after 30 steps with eps = 1e-3.
        return dict(rtol=1e-3, atol=1e-6)
    return dict(rtol=1e-9, atol=1e-9)


def _run_both(config, shape, steps, seed, dtype, foreach, complex_param=False):
    rng = np.random.default_rng(seed)

    def draw():
        x = rng.standard_normal(shape) + 0.1  # away from 0, where eps=0 divides 0 by 0
        return x + 1j * (rng.standard_normal(shape) + 0.1) if complex_param else x

    param = draw()
    torch_param = torch.tensor(param).to(dtype)
    optimizer = RMSprop([torch_param], foreach=foreach, **config)
    rule = {k: v for k, v in config.items() if k != "initial_scale"}
    state = reference.init_state(param, config["initial_scale"])
    for _ in range(steps):
        grad = draw()
        torch_param.grad = torch.tensor(grad).to(dtype)
        optimizer.step()
        param, state = reference.step(param, grad, state, **rule)
    return torch_param, param


@settings(max_examples=150, deadline=None)
@given(
    config=configurations(),
    shape=st.sampled_from([(1,), (3,), (4, 5), (2, 3, 2)]),
    steps=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    foreach=st.booleans(),
)
def test_float64_optimizer_equals_reference(config, shape, steps, seed, foreach):
    ours, expected = _run_both(config, shape, steps, seed, torch.float64, foreach)
    np.testing.assert_allclose(ours.numpy(), expected, **_tolerance(config))


@settings(max_examples=60, deadline=None)
@given(config=configurations(), steps=st.integers(1, 30), seed=st.integers(0, 2**16), foreach=st.booleans())
def test_float32_optimizer_equals_reference_to_fp32_tolerance(config, steps, seed, foreach):
    # In fp32 the step-1 cancellation of _tolerance leaves sqrt(s) ~ 1e-4: no eps hides it.
    assume(not (config["centered"] and config["bias_correction"]))
    ours, expected = _run_both(config, (16,), steps, seed, torch.float32, foreach)
    # E.g. alpha = 1 with v = 0 divides by eps alone: float64 reaches 1e40, float32 overflows.
    assume(np.all(np.abs(expected) < 1e30))
    # Each step moves p by at most ~lr/sqrt(1-alpha) per unit; fp32 rounding of that
    # accumulates over the steps, so the bound scales with it.
    scale = 1 + np.abs(expected).max()
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-5 * scale * steps**0.5)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "flags",
    [dict(), dict(centered=True, momentum=0.9, nesterov=True, bias_correction=True), dict(eps_in_sqrt=True, lr_in_momentum=True, momentum=0.5, decoupled_weight_decay=True)],
)
def test_complex_params_equal_reference(flags, foreach):
    config = dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.1, momentum=0.0, initial_scale=0.5)
    config.update(flags)
    config = {**{name: False for name in FLAGS}, **config}
    ours, expected = _run_both(config, (3, 2), 12, 1, torch.complex128, foreach, complex_param=True)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_params_track_reference(dtype, tolerance):
    config = {**{name: False for name in FLAGS}, "lr": 1e-2, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.0, "momentum": 0.9, "initial_scale": 0.0}
    ours, expected = _run_both(config, (32,), 10, 3, dtype, foreach=False)
    np.testing.assert_allclose(ours.float().numpy(), expected, rtol=0, atol=tolerance)


_NON_NESTEROV = tuple(name for name in FLAGS if name != "nesterov")


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.5, False), (0.5, True)])
@pytest.mark.parametrize("values", list(itertools.product([False, True], repeat=len(_NON_NESTEROV))))
def test_every_flag_combination_equals_reference(values, momentum, nesterov, foreach):
    config = dict(zip(_NON_NESTEROV, values), nesterov=nesterov, momentum=momentum)
    config.update(lr=0.05, alpha=0.8, eps=1e-4, weight_decay=0.1, initial_scale=0.5)
    ours, expected = _run_both(config, (2, 3), 6, 7, torch.float64, foreach)
    np.testing.assert_allclose(ours.numpy(), expected, **_tolerance(config))
