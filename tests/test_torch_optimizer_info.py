"""Our RMSprop through torch's own description of RMSprop: its ``OptimizerInfo`` entry.

``torch.testing._internal.common_optimizers.optim_db`` is the table torch's
generic optimizer tests run every optimizer through: the constructor inputs
each optimizer must accept, the inputs it must reject (and with which error)
and the schedulers it must work with. Here our class is driven through
torch's RMSprop entry, with torch's class as the oracle: the same numbers
(bit for bit on the torch paths), the same errors, and the generic
behaviours every ``torch.optim.Optimizer`` has (hooks, state dicts, Tensor
lr, param groups, deepcopy).
"""

import copy
import io
import itertools
import warnings

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from rmsprop import RMSprop

# Importing torch's test utilities freezes torch.backends' flags for the whole process
# (torch.backends.disable_global_flags()); the other test modules, and the frameworks they
# drive, set those flags as users do.
setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)

INFO = next(info for info in optim_db if info.optim_cls is torch.optim.RMSprop)
INPUTS = INFO.optim_inputs_func(device="cpu")
ERROR_INPUTS = INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)
# torch's paths, which ours must equal bit for bit, and our default (the fused kernel).
TORCH_PATHS = {"for-loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False)}
STEPS = 8


def _ids(inputs):
    return [optim_input.desc for optim_input in inputs]


def test_torch_describes_rmsprop_as_we_expect():
    """Guards the premise of this module: torch's table still has these entries."""
    assert {"default", "centered", "momentum"} <= set(_ids(INPUTS))
    assert INFO.supports_param_groups and INFO.supports_complex and not INFO.step_requires_closure
    assert len(ERROR_INPUTS) >= 6


def _params(dtype=torch.float32, seed=0):
    """A weight, a bias, a non-contiguous view and a complex parameter, as torch's generic tests mix them."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(10, 5, generator=generator, dtype=dtype)
    bias = torch.randn(10, generator=generator, dtype=dtype)
    strided = torch.randn(5, 4, generator=generator, dtype=dtype)[:, ::2]
    complex_param = torch.randn(3, 2, generator=generator, dtype=torch.complex64 if dtype == torch.float32 else torch.complex128)
    return [Parameter(t.clone() if t.is_contiguous() else t) for t in (weight, bias, strided, complex_param)]


def _clone(params):
    """Copies with the same strides (``clone`` makes a non-contiguous view contiguous)."""
    return [Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).copy_(p.detach())) for p in params]


def _assert_equal(actual, expected, where="state dict"):
    """Equal, tensors bit for bit: state dicts hold strings, numbers and tensors."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            _assert_equal(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_equal(a, e, f"{where}[{index}]")
    elif torch.is_tensor(expected):
        assert torch.is_tensor(actual) and actual.dtype == expected.dtype and torch.equal(actual, expected), where
    else:
        assert actual == expected, where


def _loss(params, x):
    weight, bias, strided, complex_param = params
    loss = (weight.mv(x) + bias).pow(2).sum() + (complex_param * x[0]).abs().pow(2).sum()
    return loss if strided is None else loss + (strided * x[:2].sum()).pow(2).sum()


def _closure(optimizer, params, x):
    def closure():
        optimizer.zero_grad()
        loss = _loss(params, x)
        loss.backward()
        return loss

    return closure


def _inputs_data(dtype, steps=STEPS):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(5, generator=generator, dtype=dtype) for _ in range(steps)]


def _train(optimizer_class, kwargs, dtype=torch.float32, data=None, params=None, schedulers=()):
    params = _params(dtype) if params is None else params
    optimizer = optimizer_class(params, **kwargs)
    made = [make(optimizer) for make in schedulers]
    losses = []
    for x in data or _inputs_data(dtype):
        loss = optimizer.step(_closure(optimizer, params, x))
        losses.append(loss.item())
        for scheduler in made:
            scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    return params, optimizer, losses


def _torch_kwargs(kwargs, path):
    return {**kwargs, "foreach": path["foreach"]}


@pytest.mark.parametrize("path", TORCH_PATHS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("optim_input", INPUTS, ids=_ids(INPUTS))
def test_every_input_steps_as_torch_bit_for_bit(optim_input, dtype, path):
    kwargs = optim_input.kwargs
    ours, ours_optimizer, ours_losses = _train(RMSprop, {**kwargs, **TORCH_PATHS[path]}, dtype)
    theirs, theirs_optimizer, theirs_losses = _train(torch.optim.RMSprop, _torch_kwargs(kwargs, TORCH_PATHS[path]), dtype)
    assert ours_losses == theirs_losses
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours, theirs, strict=True):
        assert ours_optimizer.state[a].keys() == theirs_optimizer.state[b].keys()
        for key, value in theirs_optimizer.state[b].items():
            assert torch.equal(ours_optimizer.state[a][key], value), key


@pytest.mark.parametrize("optim_input", INPUTS, ids=_ids(INPUTS))
def test_every_input_on_the_default_path_equals_torch_within_float32_rounding(optim_input):
    ours, _, ours_losses = _train(RMSprop, optim_input.kwargs)
    theirs, _, theirs_losses = _train(torch.optim.RMSprop, optim_input.kwargs)
    # The fused kernel rounds in another order than torch's ops; a few ulps per step, compounding over STEPS.
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optim_input", INPUTS, ids=_ids(INPUTS))
def test_every_input_goes_the_right_direction(optim_input):
    _, _, losses = _train(RMSprop, optim_input.kwargs, data=_inputs_data(torch.float32)[:1] * 20)
    if optim_input.kwargs.get("maximize"):
        assert losses[-1] > losses[0]
    else:
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("schedulers", INFO.scheduler_inputs, ids=lambda s: "+".join(map(str, range(len(s)))))
@pytest.mark.parametrize("optim_input", INPUTS, ids=_ids(INPUTS))
def test_torch_schedulers_drive_every_input_as_they_drive_torch(optim_input, schedulers):
    kwargs = {**optim_input.kwargs, "foreach": False}
    ours, ours_optimizer, _ = _train(RMSprop, {**kwargs, "fused": False}, schedulers=schedulers)
    theirs, theirs_optimizer, _ = _train(torch.optim.RMSprop, kwargs, schedulers=schedulers)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert ours_optimizer.param_groups[0]["lr"] == theirs_optimizer.param_groups[0]["lr"]


def _error_params(optim_input):
    return optim_input.params if optim_input.params is not None else [Parameter(torch.randn(2, 2))]


@pytest.mark.parametrize("optimizer_class", [torch.optim.RMSprop, RMSprop], ids=["torch", "ours"])
@pytest.mark.parametrize("error_input", ERROR_INPUTS, ids=[e.optimizer_error_input.desc for e in ERROR_INPUTS])
def test_error_inputs_raise_torchs_errors(error_input, optimizer_class):
    optim_input = error_input.optimizer_error_input
    expectation = (
        pytest.warns(error_input.error_type, match=error_input.error_regex)
        if issubclass(error_input.error_type, Warning)
        else pytest.raises(error_input.error_type, match=error_input.error_regex)
    )
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expectation:
            optimizer_class(_error_params(optim_input), **optim_input.kwargs)
    else:
        optimizer = optimizer_class(_error_params(optim_input), **optim_input.kwargs)
        with expectation:
            optimizer.step()


def _primed(kwargs, steps=3):
    params, optimizer, _ = _train(RMSprop, kwargs, data=_inputs_data(torch.float32, steps))
    return params, optimizer


@pytest.mark.parametrize("optim_input", INPUTS, ids=_ids(INPUTS))
def test_grads_are_never_written_into(optim_input):
    for path in [*TORCH_PATHS.values(), {}]:
        params = _params()
        optimizer = RMSprop(params, **{**optim_input.kwargs, **path})
        for x in _inputs_data(torch.float32, 3):
            optimizer.zero_grad()
            _loss(params, x).backward()
            grads = [p.grad.clone() for p in params]
            optimizer.step()
            for p, grad in zip(params, grads, strict=True):
                assert torch.equal(p.grad, grad), path


@pytest.mark.parametrize("path", [*TORCH_PATHS, "default"], ids=str)
def test_tensor_lr_steps_as_torchs_tensor_lr_and_as_a_float(path):
    settings = TORCH_PATHS.get(path, {})
    kwargs = {"momentum": 0.5, "centered": True, "weight_decay": 0.1}
    tensor_lr, _, _ = _train(RMSprop, {**kwargs, **settings, "lr": torch.tensor(0.01)})
    float_lr, _, _ = _train(RMSprop, {**kwargs, **settings, "lr": 0.01})
    for a, b in zip(tensor_lr, float_lr, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if path in TORCH_PATHS:
        theirs, _, _ = _train(torch.optim.RMSprop, {**kwargs, "foreach": settings["foreach"], "lr": torch.tensor(0.01)})
        for a, b in zip(tensor_lr, theirs, strict=True):
            assert torch.equal(a, b)


class _HookLog:
    """Hooks of each kind that torch.optim lets users register, recording what they saw."""

    def __init__(self):
        self.calls = []

    def step_pre(self, optimizer, args, kwargs):
        self.calls.append("step_pre")

    def step_post(self, optimizer, args, kwargs):
        self.calls.append("step_post")

    def state_dict_pre(self, optimizer):
        # A hook may put anything into the state before it is packed...
        optimizer.state["state_dict_pre_hook"] = True

    def state_dict_post(self, optimizer, state_dict):
        # ...and take it out of, or add to, the packed dict.
        state_dict["state"].pop("state_dict_pre_hook")
        state_dict["ran_state_dict_post_hook"] = True
        return state_dict

    def load_pre_in_place(self, optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def load_pre_returning(self, optimizer, state_dict):
        replaced = copy.deepcopy(state_dict)
        replaced["param_groups"][0]["lr"] = 0.003
        return replaced

    def load_post(self, optimizer):
        # Hooks run after loading and may write entries of their own into the state.
        optimizer.state["saw_lr"] = optimizer.param_groups[0]["lr"]
        optimizer.state["ran_load_post_hook"] = True
        self.calls.append("load_post")


@pytest.mark.parametrize("optimizer_class", [torch.optim.RMSprop, RMSprop], ids=["torch", "ours"])
def test_step_hooks_run_around_the_step_in_order(optimizer_class):
    log = _HookLog()
    params = _params()
    optimizer = optimizer_class(params)
    optimizer.register_step_pre_hook(log.step_pre)
    handle = optimizer.register_step_post_hook(log.step_post)
    global_handle = register_optimizer_step_pre_hook(lambda *_: log.calls.append("global_pre"))
    try:
        optimizer.step(_closure(optimizer, params, _inputs_data(torch.float32, 1)[0]))
    finally:
        global_handle.remove()
    handle.remove()
    optimizer.step()
    assert log.calls == ["global_pre", "step_pre", "step_post", "step_pre"]


@pytest.mark.parametrize("optimizer_class", [torch.optim.RMSprop, RMSprop], ids=["torch", "ours"])
def test_state_dict_hooks_see_and_change_what_is_saved(optimizer_class):
    log = _HookLog()
    params, _, _ = _train(optimizer_class, {}, data=_inputs_data(torch.float32, 2))
    optimizer = optimizer_class(params)
    optimizer.register_state_dict_pre_hook(log.state_dict_pre)
    optimizer.register_state_dict_post_hook(log.state_dict_post)
    state_dict = optimizer.state_dict()
    assert state_dict["ran_state_dict_post_hook"] is True
    assert "state_dict_pre_hook" not in state_dict["state"]


def _load_with_hooks(optimizer_class, *, prepend_returning=False):
    log = _HookLog()
    params, source, _ = _train(optimizer_class, {"momentum": 0.5}, data=_inputs_data(torch.float32, 2))
    target = optimizer_class(_clone(params), momentum=0.5)
    target.register_load_state_dict_pre_hook(log.load_pre_in_place)
    target.register_load_state_dict_pre_hook(log.load_pre_returning, prepend=prepend_returning)
    target.register_load_state_dict_post_hook(log.load_post)
    target.load_state_dict(source.state_dict())
    return target, log


@pytest.mark.parametrize("prepend_returning", [False, True], ids=["appended", "prepended"])
@pytest.mark.parametrize("optimizer_class", [torch.optim.RMSprop, RMSprop], ids=["torch", "ours"])
def test_load_state_dict_hooks_run_as_torch_runs_them(optimizer_class, prepend_returning):
    target, log = _load_with_hooks(optimizer_class, prepend_returning=prepend_returning)
    # The last pre-hook's state dict is the one loaded; the post-hook sees it, and its own entries stay.
    expected_lr = 0.002 if prepend_returning else 0.003
    assert target.param_groups[0]["lr"] == expected_lr
    assert target.state["saw_lr"] == expected_lr and target.state["ran_load_post_hook"] is True
    assert log.calls == ["load_post"]


def test_entries_a_load_hook_wrote_do_not_stop_stepping_or_saving():
    target, _ = _load_with_hooks(RMSprop)
    params = list(itertools.chain.from_iterable(g["params"] for g in target.param_groups))
    for _ in range(2):
        target.step(_closure(target, params, _inputs_data(torch.float32, 1)[0]))
    saved = target.state_dict()
    assert saved["state"]["ran_load_post_hook"] is True
    assert all(torch.is_tensor(saved["state"][i]["step"]) for i in range(len(params)))


def test_a_refused_state_dict_runs_no_post_hook_and_changes_nothing():
    log = _HookLog()
    params, optimizer = _primed({"momentum": 0.5})
    optimizer.register_load_state_dict_post_hook(log.load_post)
    before = copy.deepcopy(optimizer.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][0]["square_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="square_avg"):
        optimizer.load_state_dict(bad)
    assert log.calls == [] and "ran_load_post_hook" not in optimizer.state
    _assert_equal(optimizer.state_dict(), before)


def test_a_pre_hook_can_repair_a_state_dict_before_it_is_checked():
    params, source = _primed({"momentum": 0.5})
    saved = source.state_dict()
    broken = copy.deepcopy(saved)
    del broken["state"][0]["momentum_buffer"]

    def repair(optimizer, state_dict):
        return saved

    target = RMSprop(_clone(params), momentum=0.5)
    target.register_load_state_dict_pre_hook(repair)
    target.load_state_dict(broken)
    assert torch.equal(target.state_dict()["state"][0]["momentum_buffer"], saved["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("optim_input", INPUTS, ids=_ids(INPUTS))
def test_state_dict_round_trip_continues_identically(optim_input):
    kwargs = {**optim_input.kwargs}
    params, optimizer = _primed(kwargs)
    saved = copy.deepcopy(optimizer.state_dict())
    params_copy = _clone(params)
    restored = RMSprop(params_copy, **kwargs)
    restored.load_state_dict(saved)
    for x in _inputs_data(torch.float32, 4):
        optimizer.step(_closure(optimizer, params, x))
        restored.step(_closure(restored, params_copy, x))
        for a, b in zip(params, params_copy, strict=True):
            assert torch.equal(a, b)
    # Deterministic: equal optimizers give equal state dicts.
    _assert_equal(optimizer.state_dict(), restored.state_dict())


def test_state_dict_survives_weights_only_save_and_load():
    params, optimizer = _primed({"momentum": 0.5, "centered": True, "lr": torch.tensor(0.01)})
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    restored = RMSprop(_clone(params), momentum=0.5, centered=True, lr=torch.tensor(0.01))
    restored.load_state_dict(loaded)
    _assert_equal(restored.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize("removed", ["maximize", "foreach", "differentiable", "capturable", "centered"])
def test_state_dicts_of_versions_without_a_flag_load_and_step(removed):
    params, optimizer = _primed({"momentum": 0.5})
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group[removed]
    optimizer.load_state_dict(saved)
    optimizer.step(_closure(optimizer, params, _inputs_data(torch.float32, 1)[0]))
    assert optimizer.param_groups[0][removed] == optimizer.defaults[removed]


def test_non_tensor_steps_load_as_tensors():
    params, optimizer = _primed({})
    saved = optimizer.state_dict()
    for p_state in saved["state"].values():
        p_state["step"] = p_state["step"].item()
    optimizer.load_state_dict(saved)
    assert all(torch.is_tensor(optimizer.state[p]["step"]) for p in params)
    optimizer.step(_closure(optimizer, params, _inputs_data(torch.float32, 1)[0]))


@pytest.mark.parametrize("optimizer_class", [torch.optim.RMSprop, RMSprop], ids=["torch", "ours"])
def test_deepcopy_copies_all_public_attributes_and_trains_on_its_own(optimizer_class):
    # Contiguous params: deepcopy makes a non-contiguous view contiguous, which may change the path.
    params = _params()
    del params[2]
    optimizer = optimizer_class(params, momentum=0.5)
    optimizer.step(_closure(optimizer, [*params[:2], None, params[2]], _inputs_data(torch.float32, 1)[0]))
    copied = copy.deepcopy(optimizer)
    public = {k for k in optimizer.__dict__ if not k.startswith("_")}
    assert public == {k for k in copied.__dict__ if not k.startswith("_")}
    copied_params = copied.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(params, copied_params))
    _assert_equal(copied.state_dict(), optimizer.state_dict())
    for x in _inputs_data(torch.float32, 3):
        optimizer.step(_closure(optimizer, [*params[:2], None, params[2]], x))
        copied.step(_closure(copied, [*copied_params[:2], None, copied_params[2]], x))
    for a, b in zip(params, copied_params, strict=True):
        assert torch.equal(a, b)


def test_deepcopied_optimizer_equals_torchs_deepcopied_optimizer():
    ours, ours_optimizer, _ = _train(RMSprop, {"momentum": 0.5, "fused": False, "foreach": False})
    theirs, theirs_optimizer, _ = _train(torch.optim.RMSprop, {"momentum": 0.5, "foreach": False})
    ours_copy, theirs_copy = copy.deepcopy(ours_optimizer), copy.deepcopy(theirs_optimizer)
    for a, b in zip(ours_copy.param_groups[0]["params"], theirs_copy.param_groups[0]["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", TORCH_PATHS, ids=str)
def test_param_groups_with_their_own_lr_and_weight_decay_match_torch(path):
    def groups(params):
        weight, bias, strided, complex_param = params
        return [
            {"params": [weight, strided]},
            {"params": [bias], "lr": 0.05, "weight_decay": 0.1},
            {"params": [complex_param], "momentum": 0.3, "centered": True},
        ]

    settings = TORCH_PATHS[path]
    ours_params, theirs_params = _params(), _params()
    ours = RMSprop(groups(ours_params), lr=1e-3, **settings)
    theirs = torch.optim.RMSprop(groups(theirs_params), lr=1e-3, foreach=settings["foreach"])
    for step, x in enumerate(_inputs_data(torch.float32)):
        if step == 4:
            for optimizer in (ours, theirs):
                optimizer.param_groups[0]["lr"] = 0.02
        ours.step(_closure(ours, ours_params, x))
        theirs.step(_closure(theirs, theirs_params, x))
    for a, b in zip(ours_params, theirs_params, strict=True):
        assert torch.equal(a, b)


def test_add_param_group_mid_run_matches_torch():
    ours_params, theirs_params = _params(), _params()
    ours = RMSprop(ours_params[:2], fused=False, foreach=False)
    theirs = torch.optim.RMSprop(theirs_params[:2], foreach=False)
    for step, x in enumerate(_inputs_data(torch.float32)):
        if step == 3:
            ours.add_param_group({"params": ours_params[2:], "alpha": 0.9})
            theirs.add_param_group({"params": theirs_params[2:], "alpha": 0.9})
        ours.step(_closure(ours, ours_params, x))
        theirs.step(_closure(theirs, theirs_params, x))
    for a, b in zip(ours_params, theirs_params, strict=True):
        assert torch.equal(a, b)


def test_params_without_grads_get_no_state_and_do_not_move():
    params = _params()
    optimizer = RMSprop(params, momentum=0.5, weight_decay=0.1)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert len(optimizer.state) == 0
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


def test_named_parameters_are_accepted_and_saved_with_their_names():
    params = _params()
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    ours = RMSprop(named)
    theirs = torch.optim.RMSprop([(name, p.detach().clone().requires_grad_()) for name, p in named])
    assert ours.state_dict()["param_groups"][0]["param_names"] == theirs.state_dict()["param_groups"][0]["param_names"]


def test_printing_lists_every_group():
    optimizer = RMSprop([{"params": _params()[:2]}, {"params": _params()[2:], "lr": 0.5}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = repr(optimizer)
    assert "Parameter Group 0" in text and "Parameter Group 1" in text and "lr: 0.5" in text
