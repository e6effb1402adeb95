"""RMSprop against torch.optim.RMSprop itself: same numbers, same state, interchangeable state dicts."""

import copy
import functools
import itertools
import subprocess
import sys

import pytest
import torch

from rmsprop import RMSprop

TORCH_SETTINGS = [
    dict(),
    dict(lr=0.05, alpha=0.9, eps=1e-6),
    dict(weight_decay=0.1),
    dict(momentum=0.9),
    dict(centered=True),
    dict(maximize=True),
    dict(momentum=0.5, centered=True, weight_decay=0.01, maximize=True),
    dict(lr=torch.tensor(0.02)),
    dict(alpha=0.0, momentum=0.3),
    dict(alpha=1.0, eps=1e-3),
]
DTYPES = [torch.float32, torch.float64, torch.complex64]


def _model_params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (2, 2, 2), (1,)]
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]


def _set_grads(params_a, params_b, generator, skip=()):
    for index, (a, b) in enumerate(zip(params_a, params_b)):
        if index in skip:
            a.grad = b.grad = None
            continue
        grad = torch.randn(a.shape, generator=generator, dtype=a.dtype)
        a.grad, b.grad = grad, grad.clone()


def _assert_same(tensors_a, tensors_b):
    for a, b in zip(tensors_a, tensors_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _assert_same_state(ours, theirs):
    for p_ours, p_theirs in zip(
        itertools.chain.from_iterable(g["params"] for g in ours.param_groups),
        itertools.chain.from_iterable(g["params"] for g in theirs.param_groups),
    ):
        state_ours, state_theirs = ours.state[p_ours], theirs.state[p_theirs]
        assert set(state_ours) == set(state_theirs)
        for key in state_theirs:
            torch.testing.assert_close(state_ours[key], state_theirs[key], rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", TORCH_SETTINGS, ids=repr)
def test_bit_identical_to_torch(settings, dtype, foreach):
    ours_params, theirs_params = _model_params(dtype), _model_params(dtype)
    ours = RMSprop(ours_params, foreach=foreach, **settings)
    theirs = torch.optim.RMSprop(theirs_params, foreach=foreach, **copy.deepcopy(settings))
    generator = torch.Generator().manual_seed(1)
    for step in range(15):
        # Some params miss some steps, so their step counts differ.
        _set_grads(ours_params, theirs_params, generator, skip={step % 4} if step % 3 == 0 else ())
        ours.step()
        theirs.step()
    _assert_same(ours_params, theirs_params)
    _assert_same_state(ours, theirs)


@pytest.mark.parametrize("foreach", [False, True])
def test_several_param_groups_and_lr_changes_match_torch(foreach):
    def groups(params):
        return [
            {"params": params[:2]},
            {"params": params[2:3], "lr": 0.1, "momentum": 0.9, "centered": True},
            {"params": params[3:], "alpha": 0.5, "weight_decay": 0.2, "maximize": True},
        ]

    ours_params, theirs_params = _model_params(torch.float32), _model_params(torch.float32)
    ours = RMSprop(groups(ours_params), lr=0.01, foreach=foreach)
    theirs = torch.optim.RMSprop(groups(theirs_params), lr=0.01, foreach=foreach)
    generator = torch.Generator().manual_seed(2)
    for step in range(20):
        for optimizer in (ours, theirs):
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * 0.9  # a hand-rolled schedule
        _set_grads(ours_params, theirs_params, generator)
        ours.step()
        theirs.step()
    _assert_same(ours_params, theirs_params)
    _assert_same_state(ours, theirs)


def test_closure_is_called_and_its_loss_returned():
    param = torch.ones(3, requires_grad=True)
    optimizer = RMSprop([param])

    def closure():
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 3.0
    assert param.detach().lt(1).all()


def test_params_without_grads_are_left_alone():
    used, unused = torch.ones(2), torch.ones(2)
    optimizer = RMSprop([used, unused])
    used.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(unused, torch.ones(2))
    assert unused not in optimizer.state


def _one_differentiable_step(optimizer_class, settings):
    """A function of (param, grad, state tensors) -> (new param, new state tensors)."""

    def step(param, grad, square_avg, momentum_buffer, grad_avg):
        param = param.clone()  # the step works in place; autograd needs a non-leaf
        param.grad = grad
        optimizer = optimizer_class([param], differentiable=True, **settings)
        state = {"step": torch.tensor(3.0), "square_avg": square_avg.clone(), "momentum_buffer": momentum_buffer.clone(), "grad_avg": grad_avg.clone()}
        optimizer.state[param] = state
        optimizer.step()
        return param, state["square_avg"], state["momentum_buffer"], state["grad_avg"]

    return step


@pytest.mark.parametrize("settings", [dict(), dict(momentum=0.9, centered=True, weight_decay=0.1, maximize=True)], ids=repr)
def test_differentiable_step_has_torchs_jacobian(settings):
    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randn(3, dtype=torch.float64, generator=generator) for _ in range(5)]
    inputs[2] = inputs[2].abs() + 1.0  # square_avg is positive
    inputs[4] = inputs[4] * 0.1  # keeps the centered variance positive
    ours = torch.autograd.functional.jacobian(_one_differentiable_step(RMSprop, settings), tuple(inputs))
    theirs = torch.autograd.functional.jacobian(_one_differentiable_step(torch.optim.RMSprop, settings), tuple(inputs))
    for ours_rows, theirs_rows in zip(ours, theirs):
        for a, b in zip(ours_rows, theirs_rows):
            torch.testing.assert_close(a, b)


def test_differentiable_step_passes_gradcheck_with_every_variant():
    settings = dict(lr=0.1, momentum=0.9, nesterov=True, lr_in_momentum=True, centered=True, eps_in_sqrt=True, bias_correction=True, weight_decay=0.1, decoupled_weight_decay=True)
    generator = torch.Generator().manual_seed(6)
    inputs = [torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(5)]
    with torch.no_grad():
        inputs[2].abs_().add_(1.0)
        inputs[4].mul_(0.1)
    assert torch.autograd.gradcheck(_one_differentiable_step(RMSprop, settings), tuple(inputs))


def test_capturable_on_cpu_is_a_clear_error():
    param = torch.ones(2)
    param.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="capturable=True"):
        RMSprop([param], capturable=True).step()


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("settings", [dict(), dict(momentum=0.9, centered=True, weight_decay=0.1)], ids=repr)
def test_state_dicts_interchange_with_torch(direction, settings):
    # Bit for bit needs torch's own paths: the fused kernel rounds in another order.
    ours_class = functools.partial(RMSprop, fused=False)
    source_class, target_class = (torch.optim.RMSprop, ours_class) if direction == "torch_to_ours" else (ours_class, torch.optim.RMSprop)
    reference_params = _model_params(torch.float32)
    source_params = _model_params(torch.float32)
    reference = torch.optim.RMSprop(reference_params, **settings)
    source = source_class(source_params, **settings)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        _set_grads(reference_params, source_params, generator)
        reference.step()
        source.step()

    target_params = [p.detach().clone() for p in source_params]
    target = target_class(target_params, lr=123.0)  # settings come from the state dict
    target.load_state_dict(source.state_dict())
    for _ in range(5):
        _set_grads(reference_params, target_params, generator)
        reference.step()
        target.step()
    _assert_same(target_params, reference_params)


def test_torch_state_dict_gets_our_flags_from_our_defaults():
    params = _model_params(torch.float32)
    theirs = torch.optim.RMSprop(params, momentum=0.5)
    ours = RMSprop(params, eps_in_sqrt=True, lr_in_momentum=True, momentum=0.1)
    ours.load_state_dict(theirs.state_dict())
    group = ours.param_groups[0]
    assert group["eps_in_sqrt"] is True and group["lr_in_momentum"] is True
    assert group["momentum"] == 0.5  # torch's saved setting wins where it has one
    assert group["bias_correction"] is False


def test_switching_momentum_and_centered_on_mid_run_creates_the_buffers():
    param = torch.ones(3)
    optimizer = RMSprop([param])
    param.grad = torch.ones(3)
    optimizer.step()
    optimizer.param_groups[0].update(momentum=0.9, centered=True)
    optimizer.step()
    state = optimizer.state[param]
    assert state["momentum_buffer"].shape == param.shape
    assert state["grad_avg"].shape == param.shape


def test_initial_scale_sets_the_starting_square_avg():
    param = torch.zeros(2, dtype=torch.complex64)
    param.grad = torch.zeros(2, dtype=torch.complex64)
    optimizer = RMSprop([param], alpha=0.5, initial_scale=1.0)
    optimizer.step()
    # alpha * 1 + (1 - alpha) * 0 for the real and the imaginary part alike.
    torch.testing.assert_close(torch.view_as_real(optimizer.state[param]["square_avg"]), torch.full((2, 2), 0.5))


def test_foreach_default_follows_torch_on_cpu():
    param = torch.ones(2)
    param.grad = torch.ones(2)
    ours, theirs = RMSprop([param.clone()]), torch.optim.RMSprop([param.clone()])
    assert ours.defaults["foreach"] is None and theirs.defaults["foreach"] is None


def test_bf16_and_fp16_params_match_torch():
    for dtype in (torch.bfloat16, torch.float16):
        ours_params, theirs_params = _model_params(dtype), _model_params(dtype)
        # fused=False: the fused kernel computes in float32 and rounds once, torch after every operation.
        ours = RMSprop(ours_params, momentum=0.9, fused=False)
        theirs = torch.optim.RMSprop(theirs_params, momentum=0.9)
        generator = torch.Generator().manual_seed(4)
        for _ in range(10):
            _set_grads(ours_params, theirs_params, generator)
            ours.step()
            theirs.step()
        _assert_same(ours_params, theirs_params)


def test_repr_lists_our_flags():
    text = repr(RMSprop([torch.ones(1)], nesterov=True, momentum=0.5))
    assert text.startswith("RMSprop (") and "nesterov: True" in text


def test_a_fresh_process_constructs_and_steps_without_importing_torch_dynamo():
    """torch.optim's step and add_param_group wrappers import torch._dynamo (seconds) at their first
    call; ours do the same work without it until something else imports it."""
    script = (
        "import sys, torch\n"
        "from rmsprop import RMSprop\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "optimizer = RMSprop([p], momentum=0.9)\n"
        "p.grad = torch.ones(3)\n"
        "optimizer.step()\n"
        "assert not torch.equal(p.detach(), torch.ones(3))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
