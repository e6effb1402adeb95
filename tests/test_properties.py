"""Property tests: whatever is thrown at the optimizer, it steps by the rule or refuses cleanly.

"By the rule" is checked against the float64 NumPy reference; "refuses cleanly"
means a ValueError naming the problem, raised before any tensor changed.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmsprop import RMSprop, reference

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"float32": torch.float32, "float64": torch.float64, "complex64": torch.complex64}
# Relative resolution of each dtype's arithmetic, for comparing with float64.
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-9, torch.complex64: 2e-4}
GRAD_MAGNITUDES = [0.0, 1e-6, 1.0, 1e12]  # 1e12 squared still fits float32


@st.composite
def flag_combinations(draw) -> dict:
    flags = {
        "momentum": draw(st.sampled_from([0.0, 0.5, 0.9])),
        "weight_decay": draw(st.sampled_from([0.0, 0.1])),
        "eps": draw(st.floats(1e-8, 1e-2)),
        "initial_scale": draw(st.sampled_from([0.0, 1.0])),
        "maximize": draw(st.booleans()),
        "eps_in_sqrt": draw(st.booleans()),
        "decoupled_weight_decay": draw(st.booleans()),
        "lr_in_momentum": draw(st.booleans()),
        "centered": draw(st.booleans()),
        "foreach": draw(st.booleans()),
    }
    flags["nesterov"] = flags["momentum"] > 0 and draw(st.booleans())
    if flags["centered"]:
        # v - m^2 cancels when the gradient barely varies (alpha near 0, or a
        # bias-corrected first step): rounding noise then decides the step in
        # any precision, so those regions have no meaningful float32 oracle.
        flags["alpha"] = draw(st.floats(0.5, 0.99))
        flags["bias_correction"] = False
    else:
        flags["bias_correction"] = draw(st.booleans())
        upper = 0.999 if flags["bias_correction"] else 1.0
        flags["alpha"] = draw(st.sampled_from([0.0, upper]) | st.floats(0.0, upper))
    return flags


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().resolve_conj().numpy().astype(np.complex128 if t.is_complex() else np.float64)


@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(list(DTYPES.values())),
    flags=flag_combinations(),
    magnitudes=st.lists(st.sampled_from(GRAD_MAGNITUDES), min_size=1, max_size=4),
    lrs=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_steps_follow_the_reference(shape, dtype, flags, magnitudes, lrs, seed):
    generator = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
    optimizer = RMSprop([param], lr=lrs[0], **flags)
    reference_flags = {k: v for k, v in flags.items() if k not in ("foreach", "initial_scale")}
    expected = _to_numpy(param)
    state = reference.init_state(expected, flags["initial_scale"])
    for lr, magnitude in zip(lrs, magnitudes):
        optimizer.param_groups[0]["lr"] = lr  # lr may change between steps
        param.grad = torch.randn(shape, generator=generator, dtype=dtype) * magnitude
        expected, state = reference.step(expected, _to_numpy(param.grad), state, lr=lr, **reference_flags)
        optimizer.step()
    scale = 1.0 + float(np.max(np.abs(expected), initial=0.0))
    np.testing.assert_allclose(_to_numpy(param), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


# One invalid setting each; the optimizer must refuse it with a message naming it.
INVALID_SETTINGS = [
    ({"lr": -0.1}, "learning rate"),
    ({"lr": float("nan")}, "learning rate"),
    ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"alpha": 1.0, "bias_correction": True}, "alpha"),
    ({"eps": -1e-8}, "epsilon"),
    ({"eps": float("inf")}, "epsilon"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"momentum": -0.5}, "momentum"),
    ({"initial_scale": -1.0}, "initial_scale"),
    ({"nesterov": True}, "Nesterov momentum requires a momentum"),
    ({"centered": "yes"}, "centered"),
    ({"foreach": True, "differentiable": True}, "foreach"),
    ({"lr": "0.1"}, "lr"),
]


@given(case=st.sampled_from(INVALID_SETTINGS), where=st.sampled_from(["constructor", "add_param_group"]))
@settings(max_examples=40, deadline=None)
def test_invalid_settings_are_refused_before_anything_changes(case, where):
    bad, message = case
    first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    if where == "constructor":
        with pytest.raises(ValueError, match=message):
            RMSprop([first], **bad)
        return
    optimizer = RMSprop([first], lr=0.1)
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": [second], **bad})
    assert len(optimizer.param_groups) == 1


def _mismatch(kind: str, p: torch.nn.Parameter, p_state: dict) -> str:
    """Break the fit between ``p`` and its state the way ``kind`` says; the expected message."""
    if kind == "param dtype":
        p.data = p.data.double()
        p.grad = torch.ones_like(p)
        return "has dtype torch.float32, the parameter has torch.float64"
    if kind == "param shape":
        p.data = torch.ones(p.numel() + 1)
        p.grad = torch.ones_like(p)
        return r"has shape \(\d+,\), the parameter has \(\d+,\)"
    if kind == "state device":
        p_state["square_avg"] = p_state["square_avg"].to("meta")
        return "'square_avg' has device meta, the parameter has cpu"
    if kind == "state dtype":
        for key in ("square_avg", "momentum_buffer"):
            p_state[key] = p_state[key].half()
        return "'square_avg' has dtype torch.float16"
    p_state["step"] = 3  # "step type"
    return "'step' must be a 1-element tensor"


@given(
    kind=st.sampled_from(["param dtype", "param shape", "state device", "state dtype", "step type"]),
    foreach=st.booleans(),
    size=st.integers(1, 5),
)
@settings(max_examples=30, deadline=None)
def test_param_state_mismatch_is_a_clear_error_before_any_change(kind, foreach, size):
    healthy, broken = torch.nn.Parameter(torch.ones(size)), torch.nn.Parameter(torch.ones(size))
    # The broken parameter is in the second group: the first must not step either.
    optimizer = RMSprop([{"params": [healthy]}, {"params": [broken]}], lr=0.1, momentum=0.9, foreach=foreach)
    for p in (healthy, broken):
        p.grad = torch.ones_like(p)
    optimizer.step()
    message = _mismatch(kind, broken, optimizer.state[broken])
    healthy.grad = torch.ones_like(healthy)
    healthy_before = healthy.detach().clone()
    state_before = {key: value.clone() for key, value in optimizer.state[healthy].items()}
    with pytest.raises(ValueError, match=rf"parameter 0 in group 1: .*{message}"):
        optimizer.step()
    assert torch.equal(healthy, healthy_before)
    assert all(torch.equal(optimizer.state[healthy][key], value) for key, value in state_before.items())


@given(foreach=st.booleans())
@settings(max_examples=4, deadline=None)
def test_sparse_gradients_are_refused_before_any_change(foreach):
    dense, sparse = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    optimizer = RMSprop([{"params": [dense]}, {"params": [sparse]}], lr=0.1, foreach=foreach)
    dense.grad = torch.ones(3)
    sparse.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    assert torch.equal(dense, torch.ones(3)) and not optimizer.state


@given(
    size=st.integers(1, 8),
    flags=flag_combinations(),
    bad_value=st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    data=st.data(),
)
@SETTINGS
def test_non_finite_gradients_propagate_only_where_they_are(size, flags, bad_value, data):
    """The documented policy: no filtering. Entries with a non-finite gradient become
    non-finite; the rule is elementwise, so every other entry steps as the reference says."""
    bad_index = data.draw(st.integers(0, size - 1))
    generator = torch.Generator().manual_seed(size)
    param = torch.nn.Parameter(torch.randn(size, generator=generator, dtype=torch.float64))
    grad = torch.randn(size, generator=generator, dtype=torch.float64)
    reference_flags = {k: v for k, v in flags.items() if k not in ("foreach", "initial_scale")}
    expected, _ = reference.step(
        param.detach().numpy().copy(),
        grad.numpy(),
        reference.init_state(param.detach().numpy(), flags["initial_scale"]),
        lr=0.01,
        **reference_flags,
    )
    grad[bad_index] = bad_value
    optimizer = RMSprop([param], lr=0.01, **flags)
    param.grad = grad
    optimizer.step()
    stepped = param.detach().numpy()
    assert not np.isfinite(stepped[bad_index])
    finite = np.arange(size) != bad_index
    np.testing.assert_allclose(stepped[finite], expected[finite], rtol=1e-9, atol=1e-9)
