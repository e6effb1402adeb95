"""Bad input: a clear error naming the argument and its range, raised before anything changes."""

import copy
import math

import pytest
import torch

from rmsprop import RMSprop

BAD_SETTINGS = [
    ("lr", -1e-3, "Invalid learning rate.*lr must be finite and >= 0"),
    ("lr", math.nan, "Invalid learning rate.*lr must be finite"),
    ("lr", math.inf, "Invalid learning rate.*lr must be finite"),
    ("lr", torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element"),
    ("lr", "0.1", "Invalid lr.*must be a real number"),
    ("eps", -1e-8, "Invalid epsilon value.*eps must be finite and >= 0"),
    ("momentum", -0.9, "Invalid momentum value.*momentum must be finite and >= 0"),
    ("momentum", math.inf, "Invalid momentum value"),
    ("weight_decay", -0.1, "Invalid weight_decay value.*weight_decay must be finite and >= 0"),
    ("initial_scale", -1.0, "Invalid initial_scale value.*initial_scale must be finite and >= 0"),
    ("initial_scale", math.nan, "Invalid initial_scale value"),
    ("alpha", -0.1, r"Invalid alpha value.*alpha must be in \[0, 1\]"),
    ("alpha", 1.5, r"Invalid alpha value.*alpha must be in \[0, 1\]"),
    ("alpha", math.nan, "Invalid alpha value"),
    ("centered", "yes", "Invalid centered.*must be True or False"),
    ("foreach", 1, "Invalid foreach.*must be None, True or False"),
    ("nesterov", True, "Nesterov momentum requires a momentum > 0"),
]


@pytest.mark.parametrize("name,value,message", BAD_SETTINGS, ids=lambda x: str(x)[:20])
def test_constructor_rejects(name, value, message):
    with pytest.raises(ValueError, match=message):
        RMSprop([torch.ones(1)], **{name: value})


def test_alpha_one_needs_no_bias_correction():
    RMSprop([torch.ones(1)], alpha=1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\) with bias_correction=True"):
        RMSprop([torch.ones(1)], alpha=1.0, bias_correction=True)


def test_foreach_with_differentiable_is_refused_up_front():
    with pytest.raises(ValueError, match="foreach=True does not support differentiable=True"):
        RMSprop([torch.ones(1)], foreach=True, differentiable=True)


@pytest.mark.parametrize("name,value,message", BAD_SETTINGS, ids=lambda x: str(x)[:20])
def test_add_param_group_rejects_and_changes_nothing(name, value, message):
    optimizer = RMSprop([torch.ones(1)])
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": [torch.ones(2)], name: value})
    assert len(optimizer.param_groups) == 1
    assert optimizer.state_dict() == before


def test_group_settings_merge_with_defaults_before_checking():
    optimizer = RMSprop([torch.ones(1)], momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        optimizer.add_param_group({"params": [torch.ones(1)], "momentum": 0.0})
    optimizer.add_param_group({"params": [torch.ones(1)], "momentum": 0.5})


def test_sparse_gradient_is_refused_and_nothing_moves():
    dense, embedding = torch.ones(3), torch.ones(4, 2)
    optimizer = RMSprop([{"params": [dense]}, {"params": [embedding]}], momentum=0.9)
    dense.grad = torch.ones(3)
    embedding.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 2), (4, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match="RMSprop does not support sparse gradients.*group 1"):
        optimizer.step()
    assert torch.equal(dense, torch.ones(3)) and torch.equal(embedding, torch.ones(4, 2))
    assert len(optimizer.state) == 0


def _trained(**settings):
    params = [torch.ones(2, 2), torch.ones(3)]
    optimizer = RMSprop(params, **settings)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    return params, optimizer


def _failed_load_leaves_optimizer_unchanged(optimizer, bad_state_dict, message):
    before = copy.deepcopy(optimizer.state_dict())
    state_before, groups_before = optimizer.state, optimizer.param_groups
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(bad_state_dict)
    assert optimizer.state is state_before and optimizer.param_groups is groups_before
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entries in before["state"].items():
        for key, value in entries.items():
            assert torch.equal(after["state"][index][key], value)


def test_load_with_wrong_shapes_fails_cleanly():
    _, optimizer = _trained(momentum=0.9)
    bad = copy.deepcopy(optimizer.state_dict())
    bad["state"][1]["momentum_buffer"] = torch.zeros(4)
    _failed_load_leaves_optimizer_unchanged(optimizer, bad, r"parameter 1 in group 0: 'momentum_buffer' has shape \(4,\), the parameter has \(3,\)")


def test_load_with_missing_entry_fails_cleanly():
    _, optimizer = _trained()
    bad = copy.deepcopy(optimizer.state_dict())
    del bad["state"][0]["square_avg"]
    _failed_load_leaves_optimizer_unchanged(optimizer, bad, "'square_avg' is missing")


def test_load_with_mistyped_entry_fails_cleanly():
    _, optimizer = _trained()
    bad = copy.deepcopy(optimizer.state_dict())
    bad["state"][0]["square_avg"] = [1.0, 2.0]
    _failed_load_leaves_optimizer_unchanged(optimizer, bad, "'square_avg' must be a tensor, got list")


def test_load_with_invalid_settings_fails_cleanly():
    _, optimizer = _trained()
    bad = copy.deepcopy(optimizer.state_dict())
    bad["param_groups"][0]["alpha"] = 2.0
    _failed_load_leaves_optimizer_unchanged(optimizer, bad, "Invalid alpha value")


def test_load_from_another_model_fails_cleanly():
    _, optimizer = _trained()
    other = RMSprop([torch.ones(2, 2), torch.ones(3), torch.ones(1)])
    _failed_load_leaves_optimizer_unchanged(optimizer, other.state_dict(), "doesn't match the size")
