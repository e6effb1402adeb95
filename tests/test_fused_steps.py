"""Steps after the first: the CPU kernel gathers a fused group's tensors itself.

From the second step of a full-precision CPU group, ``RMSprop.step`` hands
the group's params and the optimizer's state mapping to the CPU kernel,
which reads each gradient and state buffer and checks them, or declines the
group (to the Python gathering, its errors and state creation). Each
scenario changes something between steps behind the optimizer's back and
runs the same script on the fused path and on the for-loop path (which
gathers in Python, as torch.optim.RMSprop does); the parameters and state
must agree within float32 rounding.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rmsprop.backends.cpu.kernel
from rmsprop import RMSprop


SIZES = (7, 64, 3, 130)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(size, generator=generator)) for size in SIZES]


def _new_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def _run(fused: bool, change: Callable[[RMSprop, list[torch.nn.Parameter], int], None], **settings):
    params = _params()
    path = {} if fused else {"fused": False, "foreach": False}
    optimizer = RMSprop(params, lr=0.01, **settings, **path)
    for step in range(6):
        _new_grads(params, step)
        change(optimizer, params, step)
        optimizer.step()
    return params, optimizer


def _assert_close_in_float32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within float32 rounding at the scale of the tensor's largest values: a sum such as
    ``momentum * b + u`` rounds at the scale of its largest term (the centered form's ``u``
    reaches ~30 here), so a value that cancels to ~1e-3 carries an absolute error of an ulp of 30."""
    scale = max(1.0, expected.abs().max().item()) if expected.dim() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale)


def _assert_same_run(change, **settings) -> None:
    params, optimizer = _run(True, change, **settings)
    expected_params, expected_optimizer = _run(False, change, **settings)
    for p, expected in zip(params, expected_params, strict=True):
        _assert_close_in_float32(p, expected)
        state, expected_state = optimizer.state[p], expected_optimizer.state[expected]
        assert state.keys() == expected_state.keys()
        for key in state:
            _assert_close_in_float32(state[key], expected_state[key])


def _unchanged(optimizer, params, step):
    pass


def _drop_some_grads(optimizer, params, step):
    if step in (2, 3):
        params[step - 1].grad = None


def _move_a_param(optimizer, params, step):
    if step == 3:
        params[1].data = params[1].data.clone()


def _replace_a_buffer(optimizer, params, step):
    if step == 2:
        state = optimizer.state[params[0]]
        state["square_avg"] = state["square_avg"].clone()


def _replace_param_states(optimizer, params, step):
    # What ZeroRedundancyOptimizer.load_state_dict does to its local optimizer.
    if step == 3:
        for p in params:
            optimizer.state[p] = {key: value.clone() for key, value in optimizer.state[p].items()}


def _reload_state(optimizer, params, step):
    if step == 2:
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))


def _switch_on_momentum_and_centered(optimizer, params, step):
    if step == 3:
        optimizer.param_groups[0]["momentum"] = 0.9
        optimizer.param_groups[0]["centered"] = True


def _change_lr(optimizer, params, step):
    optimizer.param_groups[0]["lr"] = 0.01 / (step + 1)


def _add_a_param(optimizer, params, step):
    if step == 3:
        extra = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        extra.grad = torch.ones(5)
        params.append(extra)
        optimizer.param_groups[0]["params"].append(extra)


def _non_contiguous_grad(optimizer, params, step):
    if step == 3:
        params[1].grad = torch.linspace(-1, 1, 128)[::2]


def _drop_a_param_state(optimizer, params, step):
    if step == 3:
        del optimizer.state[params[2]]


def _transposed_param(optimizer, params, step):
    if step == 2:
        params[1].data = torch.linspace(-1, 1, 64).reshape(8, 8).t()
        params[1].grad = torch.ones(8, 8)
        for key in ("square_avg", "momentum_buffer", "grad_avg"):
            if key in optimizer.state[params[1]]:
                optimizer.state[params[1]][key] = torch.zeros(8, 8)


@pytest.mark.parametrize(
    "change",
    [
        _unchanged,
        _drop_some_grads,
        _move_a_param,
        _replace_a_buffer,
        _replace_param_states,
        _reload_state,
        _switch_on_momentum_and_centered,
        _change_lr,
        _add_a_param,
        _non_contiguous_grad,
        _drop_a_param_state,
        _transposed_param,
    ],
)
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"momentum": 0.5, "centered": True, "weight_decay": 0.1},
        {"momentum": 0.5, "nesterov": True, "bias_correction": True, "maximize": True},
    ],
)
def test_a_change_between_steps_is_seen(change, settings):
    _assert_same_run(change, **settings)


def test_later_steps_are_gathered_by_the_cpu_kernel_not_in_python(monkeypatch):
    params = _params()
    optimizer = RMSprop(params)
    gathered = []
    original = RMSprop._init_group

    def spy(self, *args):
        gathered.append(1)
        return original(self, *args)

    monkeypatch.setattr(RMSprop, "_init_group", spy)
    for step in range(3):
        _new_grads(params, step)
        optimizer.step()
    assert len(gathered) == 1


def test_the_optimizer_does_not_keep_gradients_alive():
    params = _params()
    optimizer = RMSprop(params)
    _new_grads(params, 0)
    optimizer.step()
    grad = weakref.ref(params[0].grad)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    assert grad() is None


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_a_copied_optimizer_steps_its_own_tensors(duplicate):
    model = torch.nn.Linear(4, 3)
    optimizer = RMSprop(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    twin_model, twin_optimizer = duplicate((model, optimizer))
    twin_model(torch.ones(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    twin_optimizer.step()
    for p, old, twin in zip(model.parameters(), before, twin_model.parameters(), strict=True):
        assert torch.equal(p, old)
        assert not torch.equal(twin, old)


def _after_two_steps() -> tuple[list[torch.nn.Parameter], RMSprop]:
    params = _params()
    optimizer = RMSprop(params)
    for step in range(2):
        _new_grads(params, step)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("sparse_group", [0, 1])
def test_a_sparse_gradient_in_any_group_is_refused_before_any_change(sparse_group):
    params = _params()
    optimizer = RMSprop([{"params": params[:2]}, {"params": params[2:], "momentum": 0.5}])
    for step in range(3):
        _new_grads(params, step)
        if step == 2:
            params[2 * sparse_group].grad = params[2 * sparse_group].grad.to_sparse()
            break
        optimizer.step()
    before = copy.deepcopy(optimizer.state_dict())
    values = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
    for p, value in zip(params, values, strict=True):
        assert torch.equal(p, value)
    torch.testing.assert_close(optimizer.state_dict()["state"], before["state"], rtol=0, atol=0)


def test_a_model_changed_after_two_steps_gets_the_state_error():
    params, optimizer = _after_two_steps()
    for p in params:
        p.data = p.data.double()
    _new_grads(params, 2)
    with pytest.raises(ValueError, match="was the model changed"):
        optimizer.step()


# Changes a training script may make between steps, drawn in any order by hypothesis.
_CHANGES = {
    "new gradients": lambda optimizer, params, step: None,
    "drop a gradient": _drop_some_grads,
    "move a param": lambda optimizer, params, step: _move_a_param(optimizer, params, 3),
    "replace a buffer": lambda optimizer, params, step: _replace_a_buffer(optimizer, params, 2),
    "replace the state dicts": lambda optimizer, params, step: _replace_param_states(optimizer, params, 3),
    "reload the state": lambda optimizer, params, step: _reload_state(optimizer, params, 2),
    "switch on momentum and centered": lambda optimizer, params, step: _switch_on_momentum_and_centered(
        optimizer, params, 3
    ),
    "change lr": _change_lr,
    "non-contiguous gradient": lambda optimizer, params, step: _non_contiguous_grad(optimizer, params, 3),
    "drop a param's state": lambda optimizer, params, step: _drop_a_param_state(optimizer, params, 3),
}


@settings(max_examples=25, deadline=None)
@given(
    script=st.lists(st.sampled_from(sorted(_CHANGES)), min_size=1, max_size=6),
    settings_index=st.integers(0, 2),
)
def test_any_sequence_of_changes_gives_the_for_loop_result(script, settings_index):
    settings_ = [{}, {"momentum": 0.5, "centered": True, "weight_decay": 0.1}, {"nesterov": True, "momentum": 0.5}]

    def change(optimizer, params, step):
        # From the second step, when there is state to change.
        if step > 0:
            _CHANGES[script[(step - 1) % len(script)]](optimizer, params, step)

    _assert_same_run(change, **settings_[settings_index])


def test_a_group_off_the_cpu_never_asks_the_cpu_kernel(monkeypatch):
    def fail(*args):
        raise AssertionError("the CPU kernel was asked for a group on another device")

    param = torch.nn.Parameter(torch.ones(3, device="meta"))
    optimizer = RMSprop([param])
    monkeypatch.setattr(rmsprop.backends.cpu.kernel, "gather_group", fail)
    for _ in range(2):
        param.grad = torch.ones(3, device="meta")
        optimizer.step()
