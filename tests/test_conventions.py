"""The torch.optim conventions behave as with ``torch.optim.RMSprop``.

Each test runs the same scenario with torch's RMSprop and ours (default flags)
and compares. By default ours takes the fused kernel, equal to torch within
float32 rounding (tests/test_fused.py); torch's own paths are bit-identical
(tests/test_optimizer.py).
"""

import copy
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from rmsprop import RMSprop

BOTH = pytest.mark.parametrize("optimizer_class", [torch.optim.RMSprop, RMSprop], ids=["torch", "rmsprop"])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _backward(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    model(torch.randn(5, 4, generator=generator)).pow(2).mean().backward()


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, first_seed: int = 0) -> None:
    for seed in range(first_seed, first_seed + steps):
        optimizer.zero_grad()
        _backward(model, seed)
        optimizer.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def _run_both(scenario) -> None:
    """``scenario(optimizer_class)`` returns params; ours must equal torch's within float32 rounding."""
    _assert_equal(scenario(RMSprop), scenario(torch.optim.RMSprop))


@BOTH
def test_step_hooks_see_the_optimizer_and_can_be_removed(optimizer_class):
    model = _model()
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    calls = []
    handles = [
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt))),
        optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt))),
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append(("global pre", opt))),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(("global post", opt))),
    ]
    try:
        _train(model, optimizer, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("global pre", optimizer), ("pre", optimizer), ("post", optimizer), ("global post", optimizer)]
    _train(model, optimizer, steps=1)
    assert len(calls) == 4


def test_step_pre_hook_can_replace_the_closure():
    def scenario(optimizer_class):
        model = _model()
        optimizer = optimizer_class(model.parameters(), lr=0.01)

        def closure():
            optimizer.zero_grad()
            loss = model(torch.ones(2, 4)).sum()
            loss.backward()
            return loss

        # args holds the optimizer itself first, as torch passes them.
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: ((opt, closure), kwargs))
        _backward(model)
        optimizer.step()
        return _params(model)

    _run_both(scenario)


@BOTH
def test_state_dict_hooks(optimizer_class):
    model = _model()
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    _train(model, optimizer, steps=1)
    seen = []
    optimizer.register_state_dict_pre_hook(lambda opt: seen.append("pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "note": "saved"})
    optimizer.register_load_state_dict_pre_hook(
        lambda opt, sd: {**sd, "param_groups": [{**g, "lr": 0.5} for g in sd["param_groups"]]}
    )
    optimizer.register_load_state_dict_post_hook(lambda opt: seen.append("loaded"))
    state_dict = optimizer.state_dict()
    assert state_dict["note"] == "saved"
    optimizer.load_state_dict(state_dict)
    assert seen == ["pre", "loaded"]
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_add_param_group_trains_as_torch():
    def scenario(optimizer_class):
        model = _model()
        optimizer = optimizer_class(model[0].parameters(), lr=0.01, momentum=0.9)
        _train(model, optimizer, steps=2)
        optimizer.add_param_group({"params": model[2].parameters(), "lr": 0.05, "centered": True})
        _train(model, optimizer, steps=2, first_seed=2)
        return _params(model)

    _run_both(scenario)


@BOTH
def test_add_param_group_refuses_a_parameter_already_held(optimizer_class):
    model = _model()
    optimizer = optimizer_class(model[0].parameters(), lr=0.01)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [model[0].weight]})
    assert len(optimizer.param_groups) == 1


def test_add_param_group_with_bad_settings_adds_nothing():
    model = _model()
    optimizer = RMSprop(model[0].parameters(), lr=0.01)
    with pytest.raises(ValueError, match="Invalid alpha value"):
        optimizer.add_param_group({"params": model[2].parameters(), "alpha": 2.0})
    assert len(optimizer.param_groups) == 1


def test_repr_has_torch_lines_and_ours():
    model = _model()
    ours = repr(RMSprop(model.parameters(), lr=0.01, momentum=0.9)).splitlines()
    theirs = repr(torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)).splitlines()
    assert ours[0] == theirs[0] == "RMSprop ("
    assert set(theirs) <= set(ours)
    assert "    lr_in_momentum: False" in ours


@BOTH
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(optimizer_class, set_to_none):
    model = _model()
    optimizer = optimizer_class(model.parameters())
    _backward(model)
    optimizer.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, torch.zeros_like(p))


def test_deepcopy_continues_identically_and_independently():
    model = _model()
    optimizer = RMSprop(model.parameters(), lr=0.01, momentum=0.9, centered=True, lr_in_momentum=True)
    _train(model, optimizer, steps=2)
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    state_before = copy.deepcopy(optimizer.state_dict())
    _train(model_copy, optimizer_copy, steps=2, first_seed=2)
    # The original is untouched by the copy's steps...
    _assert_equal(
        [v for s in optimizer.state_dict()["state"].values() for v in s.values()],
        [v for s in state_before["state"].values() for v in s.values()],
    )
    _train(model, optimizer, steps=2, first_seed=2)
    # ...and, given the same gradients, arrives where the copy did.
    _assert_equal(_params(model), _params(model_copy))


def test_pickled_optimizer_trains_as_torch():
    def scenario(optimizer_class):
        model = _model()
        optimizer = optimizer_class(model.parameters(), lr=0.01, momentum=0.9)
        _train(model, optimizer, steps=2)
        model, optimizer = pickle.loads(pickle.dumps((model, optimizer)))
        _train(model, optimizer, steps=2, first_seed=2)
        return _params(model)

    _run_both(scenario)


def test_named_parameters_in_groups_as_torch():
    def state_dict(optimizer_class):
        model = _model()
        groups = [{"params": model[0].named_parameters()}, {"params": model[2].named_parameters(), "lr": 0.1}]
        optimizer = optimizer_class(groups, lr=0.01)
        _train(model, optimizer, steps=1)
        return optimizer.state_dict()

    ours, theirs = state_dict(RMSprop), state_dict(torch.optim.RMSprop)
    assert [g["param_names"] for g in ours["param_groups"]] == [["weight", "bias"], ["weight", "bias"]]
    assert [g["param_names"] for g in ours["param_groups"]] == [g["param_names"] for g in theirs["param_groups"]]
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in theirs["param_groups"]]


@BOTH
def test_mixing_named_and_unnamed_parameters_is_refused(optimizer_class):
    model = _model()
    groups = [{"params": model[0].named_parameters()}, {"params": model[2].parameters()}]
    with pytest.raises(ValueError, match="with/without names"):
        optimizer_class(groups)


def test_parameters_that_never_get_gradients():
    def scenario(optimizer_class):
        model = _model()
        model[2].bias.requires_grad_(False)
        optimizer = optimizer_class(model.parameters(), lr=0.01, momentum=0.9)
        _train(model, optimizer, steps=3)
        assert model[2].bias not in optimizer.state
        assert sorted(optimizer.state_dict()["state"]) == [0, 1, 2]
        return _params(model)

    _run_both(scenario)


def test_parameter_that_gets_gradients_late():
    def scenario(optimizer_class):
        model = _model()
        optimizer = optimizer_class(model.parameters(), lr=0.01, centered=True)
        model[0].requires_grad_(False)
        _train(model, optimizer, steps=2)
        model[0].requires_grad_(True)
        _train(model, optimizer, steps=2, first_seed=2)
        return _params(model)

    _run_both(scenario)


@BOTH
def test_empty_parameter_list_is_refused(optimizer_class):
    with pytest.raises(ValueError, match="empty parameter list"):
        optimizer_class([])


def test_empty_group_and_no_gradients_step_as_torch():
    def scenario(optimizer_class):
        model = _model()
        optimizer = optimizer_class([{"params": []}, {"params": model.parameters()}], lr=0.01)
        optimizer.step()  # no gradients yet: nothing happens
        assert len(optimizer.state) == 0
        _train(model, optimizer, steps=2)
        return _params(model)

    _run_both(scenario)
