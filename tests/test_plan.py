"""The step plan (rmsprop.backends.plan): ``RMSprop.plan()`` names the backend each group's step takes, and the step takes it."""

import copy
import logging

import pytest
import torch

import rmsprop.core.optimizer as optimizer_module
from rmsprop import RMSprop
from rmsprop.backends.cpu import kernel as cpu_kernel
from rmsprop.backends.plan import BACKENDS, GroupPlan

needs_kernel = pytest.mark.skipif(cpu_kernel.kernel() is None, reason="the fused CPU kernel is not built here")


def _params(n=3, size=300, **kwargs):
    params = [torch.nn.Parameter(torch.randn(size, **kwargs)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _ran(monkeypatch, optimizer):
    """The backends one ``optimizer.step()`` ran, as the functions it called tell."""
    ran = set()

    def spy(name, function):
        def called(*args, **kwargs):
            if name in ("torch", "per-tensor") and not args[0]:
                return function(*args, **kwargs)
            if name == "torch":
                ran.add("foreach" if kwargs["foreach"] else "for-loop")
            else:
                ran.add(name)
            return function(*args, **kwargs)

        return called

    monkeypatch.setattr(cpu_kernel, "run", spy("cpu-kernel", cpu_kernel.run))
    monkeypatch.setattr(optimizer_module, "fused_rmsprop", spy("cpu-kernel", optimizer_module.fused_rmsprop))
    monkeypatch.setattr(optimizer_module, "rmsprop", spy("torch", optimizer_module.rmsprop))
    monkeypatch.setattr(optimizer_module, "step_encoded", spy("per-tensor", optimizer_module.step_encoded))
    encoded = optimizer_module.fused_rmsprop_encoded

    def fused_encoded(params, *args):
        if params:
            ran.add("cpu-kernel")
        return encoded(params, *args)

    monkeypatch.setattr(optimizer_module, "fused_rmsprop_encoded", fused_encoded)
    optimizer.step()
    monkeypatch.undo()
    return ran


def _planned(optimizer):
    return {name for plan in optimizer.plan() for name in plan.steps}


CASES = {
    "default": ({}, {}),
    "momentum-centered": ({"momentum": 0.9, "centered": True}, {}),
    "fused-false": ({"fused": False}, {}),
    "foreach-true": ({"foreach": True}, {}),
    "foreach-false": ({"foreach": False}, {}),
    "bf16": ({"state_precision": "bf16"}, {}),
    "8bit-momentum": ({"state_precision": "8bit", "min_8bit_size": 256, "momentum": 0.9}, {}),
    "bf16-fused-false": ({"state_precision": "bf16", "fused": False}, {}),
    "float64": ({}, {"dtype": torch.float64}),
    "complex": ({"momentum": 0.9}, {"dtype": torch.complex64}),
}


@needs_kernel
@pytest.mark.parametrize(("settings", "tensor_kwargs"), CASES.values(), ids=CASES.keys())
def test_each_step_takes_the_backends_the_plan_names(monkeypatch, settings, tensor_kwargs):
    params = _params(**tensor_kwargs)
    optimizer = RMSprop(params, **settings)
    for _ in range(3):  # the first step creates state; low-precision groups change backend after it
        planned = _planned(optimizer)
        assert planned <= set(BACKENDS)
        assert _ran(monkeypatch, optimizer) == planned


@needs_kernel
def test_the_plan_says_which_backend_and_why_not_the_others():
    optimizer = RMSprop(_params())
    (plan,) = optimizer.plan()
    assert plan == GroupPlan(0, {"cpu-kernel": (0, 1, 2)}, {"foreach": "cpu-kernel comes first"})
    assert plan.backend == "cpu-kernel"
    assert str(plan) == "group 0: cpu-kernel steps 3 of its params (not foreach: cpu-kernel comes first)"

    (plan,) = RMSprop(_params(), fused=False).plan()
    assert plan.backend == "for-loop"
    assert plan.declined == {"cpu-kernel": "fused=False", "foreach": "torch.optim takes the for-loop for these tensors"}


@needs_kernel
def test_the_plan_names_the_tensor_the_kernel_cannot_take():
    params = _params()
    params[1].grad = torch.randn(600)[::2]
    (plan,) = RMSprop(params).plan()
    assert plan.backend == "for-loop"
    assert plan.declined["cpu-kernel"] == "the gradient of parameter 1 is not contiguous"


@needs_kernel
def test_low_precision_groups_plan_per_param():
    params = _params(n=2)
    optimizer = RMSprop([{"params": params[:1]}, {"params": params[1:], "state_precision": "bf16"}])
    first = optimizer.plan()
    assert first[1] == GroupPlan(
        1, {"per-tensor": (0,)}, {"cpu-kernel": "the step creates or converts the state of some params"}
    )
    optimizer.step()
    params.append(torch.nn.Parameter(torch.randn(5)))
    params[-1].grad = torch.ones(5)
    optimizer.param_groups[1]["params"].append(params[-1])
    second = optimizer.plan()[1]
    assert second.steps == {"cpu-kernel": (0,), "per-tensor": (1,)}
    assert str(second).startswith("group 1: cpu-kernel steps 1 of its params, per-tensor steps 1 of its params")


def test_params_without_gradients_are_in_no_plan():
    params = _params(n=2)
    params[0].grad = None
    optimizer = RMSprop([{"params": params[:1]}, {"params": params[1:]}])
    plans = optimizer.plan()
    assert plans[0].steps == {} and plans[0].backend is None
    assert str(plans[0]) == "group 0: no parameter has a gradient"
    assert sum(map(len, plans[1].steps.values())) == 1


@pytest.mark.parametrize("settings", [{}, {"state_precision": "8bit", "min_8bit_size": 0, "centered": True}])
def test_planning_changes_nothing(settings):
    optimizer = RMSprop(_params(), momentum=0.9, **settings)
    optimizer.plan()
    assert optimizer.state_dict()["state"] == {}
    optimizer.step()
    before = copy.deepcopy(optimizer.state_dict())
    optimizer.plan()
    after = optimizer.state_dict()
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value)


def test_fused_true_plan_raises_as_the_step_would():
    params = _params()
    optimizer = RMSprop(params, fused=True) if cpu_kernel.kernel() is not None else None
    if optimizer is None:
        pytest.skip("the fused CPU kernel is not built here")
    params[0].grad = torch.randn(600)[::2]
    with pytest.raises(RuntimeError, match="fused=True cannot take this step: the gradient of parameter 0 is not contiguous"):
        optimizer.plan()
    with pytest.raises(RuntimeError, match="fused=True cannot take this step"):
        optimizer.step()


def test_the_logger_says_each_plan_when_it_changes(caplog):
    params = _params(n=2)
    optimizer = RMSprop([{"params": params[:1]}, {"params": params[1:], "state_precision": "bf16"}])
    with caplog.at_level(logging.DEBUG, logger="rmsprop"):
        optimizer.step()
        first = [record.getMessage() for record in caplog.records]
        caplog.clear()
        optimizer.step()
        second = [record.getMessage() for record in caplog.records]
        caplog.clear()
        optimizer.step()
        third = [record.getMessage() for record in caplog.records]
    assert first == [str(plan) for plan in _first_plans(params)]
    # The bf16 group moves from the per-tensor path (state created) to the fused kernel, if it is built.
    assert second == ([str(optimizer.plan()[1])] if cpu_kernel.kernel() is not None else [])
    assert third == []


def _first_plans(params):
    """The plans of a fresh optimizer over the same groups: what its first step logs."""
    fresh = RMSprop([{"params": params[:1]}, {"params": params[1:], "state_precision": "bf16"}])
    return fresh.plan()
