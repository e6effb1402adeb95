"""The fused CPU path (rmsprop.backends.fused) against the for-loop path and the NumPy reference.

Tolerances, after four steps:

* float32: ``rtol=1e-5, atol=1e-6``. Both paths compute in float32 and round
  in a different order (the fused kernel keeps ``denom`` in a register, torch
  uses fused multiply-adds in its vector loops): a few ulps (2**-24) per
  operation, well below the 1e-2 changes that a wrong flag makes here.
* float64 against the float64 NumPy reference: ``rtol=1e-12, atol=1e-14``.
* bfloat16 / float16: the kernel computes in float32 and rounds each stored
  value once per step, so the baseline is the for-loop path on float32 copies
  whose values are rounded to the low precision after every step. Results
  agree within two ulps of the storage type (``rtol`` 2**-6 and 2**-9) plus
  one ulp at the largest magnitude in the tensor (``atol``): a different
  float32 rounding can tip a low-precision rounding the other way, the next
  steps carry that ulp on, and sums such as ``mu*b + u`` round at the scale
  of their largest terms. The conversions themselves are tested exactly.

The hyperparameters make every flag matter: eps=0.1 so that its placement
changes the step, lr changes between steps so that ``lr_in_momentum`` does.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rmsprop.backends.cpu.kernel
import rmsprop.backends.fused
from rmsprop import RMSprop
from rmsprop.formats.codecs import dequantize_blockwise
from rmsprop.formats.maps import SIGNED_MAP, UNSIGNED_MAP
from rmsprop.backends.fused import unsupported_reason
from fused_checks import (
    FLAG_COMBINATIONS,
    LARGE_SHAPES,
    LRS,
    check_float64_against_reference,
    check_low_precision,
    check_same_step,
    combination_id,
    fused_and_loop,
    make_gradients,
    make_params,
    run_steps,
    settings_of,
    spy_on_encoded_kernels,
    state_tensors,
    step_by_step,
)

@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=combination_id)
def test_fused_float32_equals_for_loop_for_every_flag_combination(flags):
    fused, loop = fused_and_loop(flags, torch.float32, torch.float32)
    assert len(fused) == len(loop)
    for actual, expected in zip(fused, loop, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 2**-6), (torch.float16, 2**-9)], ids=str)
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=combination_id)
def test_fused_low_precision_equals_float32_for_loop_rounded_each_step(flags, dtype, rtol):
    check_low_precision(fused_and_loop(flags, dtype, torch.float32, round_each_step=True), dtype, rtol)


@pytest.mark.parametrize("flags", [FLAG_COMBINATIONS[0], FLAG_COMBINATIONS[-1]], ids=combination_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_fused_equals_for_loop_on_tensors_over_several_chunks(flags, dtype):
    if dtype in (torch.float32, torch.float64):
        fused, loop = fused_and_loop(flags, dtype, dtype, shapes=LARGE_SHAPES)
        for actual, expected in zip(fused, loop, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        rtol = 2**-6 if dtype == torch.bfloat16 else 2**-9
        check_low_precision(fused_and_loop(flags, dtype, torch.float32, True, LARGE_SHAPES), dtype, rtol)


@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=combination_id)
def test_fused_float64_equals_numpy_reference(flags):
    check_float64_against_reference(flags)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize(
    "flags",
    [FLAG_COMBINATIONS[0], FLAG_COMBINATIONS[-1], {**FLAG_COMBINATIONS[0], "centered": True, "weight_decay": 0.2}],
    ids=combination_id,
)
def test_fused_complex_equals_for_loop(flags, dtype):
    settings = settings_of(flags)
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, dtype=dtype, generator=generator) for shape in [(4, 3), (70_001,)]]
    fused_params = [torch.nn.Parameter(p.clone()) for p in start]
    loop_params = [torch.nn.Parameter(p.clone()) for p in start]
    fused = RMSprop(fused_params, fused=True, **settings)
    loop = RMSprop(loop_params, fused=False, foreach=False, **settings)
    for lr in LRS:
        for optimizer, params in ((fused, fused_params), (loop, loop_params)):
            optimizer.param_groups[0]["lr"] = lr
            for p in params:
                p.grad = torch.ones_like(p) * (1 + 2j) + lr
            optimizer.step()
    for actual, expected in zip(state_tensors(fused, fused_params), state_tensors(loop, loop_params), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_fused_takes_a_tensor_lr_like_a_float():
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 10)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    with_tensor = RMSprop(params, lr=torch.tensor(0.05), fused=True, momentum=0.5)
    with_float = RMSprop(twins, lr=0.05, fused=False, foreach=False, momentum=0.5)
    for _ in range(3):
        for p in params + twins:
            p.grad = torch.cos(p.detach() * 3)
        with_tensor.step()
        with_float.step()
    for actual, expected in zip(params, twins, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_fused_bumps_the_version_of_updated_parameters():
    """Autograd must see the in-place update, as it does for torch's own in-place ops."""
    param = torch.nn.Parameter(torch.ones(3))
    loss = (param * param).sum()  # saves param for backward
    param.grad = torch.ones(3)
    RMSprop([param], fused=True).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _uses_fused(monkeypatch, optimizer: RMSprop) -> bool:
    """Whether ``optimizer.step()`` runs the fused kernel."""
    calls = []
    import rmsprop.core.optimizer

    original = rmsprop.core.optimizer.fused_rmsprop

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(rmsprop.core.optimizer, "fused_rmsprop", spy)
    optimizer.step()
    monkeypatch.undo()
    return bool(calls)


def _with_grad(tensor: torch.Tensor) -> torch.nn.Parameter:
    # Not requiring grad, so that differentiable=True may update it in place.
    param = torch.nn.Parameter(tensor, requires_grad=False)
    param.grad = torch.ones_like(tensor)
    return param


def test_fused_none_takes_the_fused_path_on_plain_cpu_tensors(monkeypatch):
    assert _uses_fused(monkeypatch, RMSprop([_with_grad(torch.ones(4))]))


@pytest.mark.parametrize(
    ("tensor", "settings"),
    [
        (torch.ones(4, 4).t(), {}),  # not contiguous
        (torch.ones(4, dtype=torch.complex32), {}),
        (torch.ones(4), {"differentiable": True}),
        (torch.ones(4), {"foreach": False}),  # an explicit foreach choice is kept
        (torch.ones(4), {"foreach": True}),
    ],
    ids=["non-contiguous", "complex32", "differentiable", "foreach-false", "foreach-true"],
)
def test_fused_none_falls_back_where_the_kernel_does_not_apply(monkeypatch, tensor, settings):
    param = _with_grad(tensor)
    twin = _with_grad(tensor.clone())
    optimizer = RMSprop([param], **settings)
    assert not _uses_fused(monkeypatch, optimizer)
    RMSprop([twin], fused=False, foreach=False).step()
    torch.testing.assert_close(param, twin, equal_nan=True)  # torch gives complex32 NaN here


def test_fused_none_falls_back_for_a_non_contiguous_gradient(monkeypatch):
    param = torch.nn.Parameter(torch.ones(4, 4))
    param.grad = torch.ones(4, 4).t()
    assert not _uses_fused(monkeypatch, RMSprop([param]))


def test_a_conjugate_view_gradient_is_refused_as_torch_refuses_it():
    """``g.conj()`` is a lazy view whose memory holds ``g``: the kernels, which read memory, leave
    it to the other paths, which refuse it as torch.optim.RMSprop does (not stepped with ``g``)."""
    gradient = torch.randn(4, 3, dtype=torch.complex64)
    for optimizer_class in (RMSprop, torch.optim.RMSprop):
        param = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.complex64))
        optimizer = optimizer_class([param], lr=0.1)
        param.grad = gradient.conj()
        with pytest.raises(RuntimeError, match="unresolved conjugated tensors"):
            optimizer.step()
        assert torch.equal(param, torch.ones(4, 3, dtype=torch.complex64))
    tensors = [[param], [gradient.conj()], [torch.zeros(4, 3, dtype=torch.complex64)], [], [], [torch.zeros(())]]
    assert unsupported_reason(*tensors, differentiable=False, capturable=False) == (
        "the gradient of parameter 0 has its conjugate or negative bit set (call .resolve_conj() / .resolve_neg())"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"foreach": True}, "fused=True and foreach=True cannot both be set"),
        ({"differentiable": True}, "does not support differentiable=True"),
        ({"capturable": True}, "does not support capturable=True"),
    ],
)
def test_fused_true_refuses_settings_it_cannot_honour(settings, message):
    with pytest.raises(ValueError, match=f"Invalid fused: True .*{message}"):
        RMSprop([torch.nn.Parameter(torch.ones(2))], fused=True, **settings)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.ones(4, 4).t(), "parameter 0 is not contiguous"),
        (torch.ones(4, dtype=torch.int32).float().to(torch.complex32), "dtype torch.complex32"),
    ],
)
def test_fused_true_refuses_parameters_it_cannot_update(tensor, message):
    with pytest.raises(ValueError, match=f"Invalid fused: True .*{message}"):
        RMSprop([torch.nn.Parameter(tensor)], fused=True)


def test_fused_true_refuses_a_failed_param_group_without_adding_it():
    optimizer = RMSprop([torch.nn.Parameter(torch.ones(2))], fused=True)
    with pytest.raises(ValueError, match="not contiguous"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 3).t())]})
    assert len(optimizer.param_groups) == 1


def test_fused_true_refuses_a_step_it_cannot_take():
    param = torch.nn.Parameter(torch.ones(4, 4))
    param.grad = torch.ones(4, 4).t()
    optimizer = RMSprop([param], fused=True)
    with pytest.raises(RuntimeError, match="fused=True cannot take this step: the gradient of parameter 0 is not contiguous"):
        optimizer.step()
    assert torch.equal(param, torch.ones(4, 4))


@pytest.mark.parametrize("value", [1, "yes", 0.0])
def test_fused_must_be_none_or_a_bool(value):
    with pytest.raises(ValueError, match="Invalid fused: .*fused must be None, True or False"):
        RMSprop([torch.nn.Parameter(torch.ones(2))], fused=value)


def test_unsupported_reason_names_the_offending_tensor():
    params = [torch.ones(3), torch.ones(3, dtype=torch.float64)]
    grads = [torch.ones(3), torch.ones(3)]  # the second has the wrong dtype
    square_avgs = [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    steps = [torch.zeros(()), torch.zeros(())]
    reason = unsupported_reason(params, grads, square_avgs, [], [], steps, differentiable=False, capturable=False)
    assert reason == "the gradient of parameter 1 is torch.float32, the parameter torch.float64"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_state_is_the_float32_result_rounded_to_nearest_even(dtype):
    """Exact: the kernel widens to float32 and rounds back once, as torch's ``.to(dtype)`` does.

    With alpha = 0.5, ``v = 0.5*v + 0.5*g*g`` is one float32 sum that often
    falls halfway between two low-precision numbers (ties go to even); NaN,
    inf and subnormals of the storage type are in the mix.
    """
    generator = torch.Generator().manual_seed(0)
    grad = (torch.randn(20_000, generator=generator) * torch.logspace(-6, 3, 20_000)).to(dtype)
    square_avg = torch.rand(20_000, generator=generator).to(dtype)
    grad[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), torch.finfo(dtype).tiny / 4])
    param = torch.nn.Parameter(torch.randn(20_000, generator=generator).to(dtype), requires_grad=False)
    start = param.detach().clone()
    param.grad = grad
    optimizer = RMSprop([param], lr=0.0, alpha=0.5, fused=True)
    optimizer.state[param].update(step=torch.zeros(()), square_avg=square_avg.clone())
    optimizer.step()

    g = grad.float()
    expected = (torch.tensor(0.5) * square_avg.float() + torch.tensor(0.5) * (g * g)).to(dtype)
    actual = optimizer.state[param]["square_avg"]
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual[~actual.isnan()], expected[~expected.isnan()])
    assert torch.equal(param[4:], start[4:])  # lr = 0 leaves finite-gradient parameters exactly as they were


def test_fused_takes_parameters_of_several_dtypes_in_one_group():
    """One kernel call per dtype; each parameter ends as the for-loop path leaves it."""
    dtypes = [torch.float32, torch.float64, torch.float32, torch.complex64, torch.float64]
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=generator, dtype=torch.float64).to(dtype) for dtype in dtypes]
    fused_params = [torch.nn.Parameter(p.clone()) for p in start]
    loop_params = [torch.nn.Parameter(p.clone()) for p in start]
    settings = {"momentum": 0.8, "centered": True, "eps": 0.1, "alpha": 0.9, "initial_scale": 1.0}
    fused = RMSprop(fused_params, fused=True, **settings)
    loop = RMSprop(loop_params, fused=False, foreach=False, **settings)
    for step in range(3):
        for p, q in zip(fused_params, loop_params, strict=True):
            p.grad = torch.full_like(p, 0.5 + step)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for actual, expected in zip(state_tensors(fused, fused_params), state_tensors(loop, loop_params), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_fused_takes_float64_step_counters():
    """With float64 as torch's default dtype, the 'step' tensors are float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fused, loop = fused_and_loop(FLAG_COMBINATIONS[-1], torch.float32, torch.float32)
    finally:
        torch.set_default_dtype(previous)
    assert fused[1].dtype == torch.float64
    for actual, expected in zip(fused, loop, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_fused_leaves_tensors_off_the_cpu_to_the_other_paths():
    """The meta device stands in for CUDA, which CI does not have."""
    param = torch.nn.Parameter(torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="Invalid fused: True .*parameter 0 is on meta; the fused path runs on CPU and CUDA tensors"):
        RMSprop([param], fused=True)
    tensors = [[torch.ones(3, device="meta")] for _ in range(3)]
    reason = unsupported_reason(*tensors, [], [], [torch.zeros(())], differentiable=False, capturable=False)
    assert reason == "parameter 0 is on meta; the fused path runs on CPU and CUDA tensors"


def test_unsupported_reason_names_a_state_tensor_on_another_device():
    tensors = [[torch.ones(3)], [torch.ones(3, device="meta")], [torch.zeros(3)]]
    reason = unsupported_reason(*tensors, [], [], [torch.zeros(())], differentiable=False, capturable=False)
    assert reason == "the gradient of parameter 0 is on meta, the parameter on cpu"


def test_missing_backend_names_what_a_cuda_step_needs(monkeypatch):
    """Checked from the device, so no GPU is needed here."""
    monkeypatch.setattr(rmsprop.backends.fused, "triton_available", lambda: False)
    message = "triton is not installed (the fused path on CUDA tensors is a Triton kernel)"
    assert rmsprop.backends.fused.missing_backend(torch.device("cuda")) == message


@pytest.fixture
def without_the_cpu_kernel(monkeypatch):
    """An installation whose CPU kernel was not built (no compiler at install time)."""
    monkeypatch.setattr(rmsprop.backends.cpu.kernel, "_extension", lambda: (None, "the fused CPU kernel is not built (test)"))
    rmsprop.backends.cpu.kernel.warn_fallback.cache_clear()
    yield
    rmsprop.backends.cpu.kernel.warn_fallback.cache_clear()


def test_missing_backend_on_cpu_is_the_unbuilt_kernel_and_warns_once(without_the_cpu_kernel):
    with pytest.warns(UserWarning, match=r"not built \(test\); CPU steps use torch's foreach and for-loop paths"):
        assert rmsprop.backends.fused.missing_backend(torch.device("cpu")) == "the fused CPU kernel is not built (test)"


@pytest.mark.filterwarnings("ignore:rmsprop. the fused CPU kernel is not built")
def test_fused_true_without_the_cpu_kernel_names_the_argument(without_the_cpu_kernel):
    with pytest.raises(ValueError, match=r"Invalid fused: True \(the fused CPU kernel is not built \(test\)"):
        RMSprop([torch.nn.Parameter(torch.ones(2))], fused=True)


@pytest.mark.filterwarnings("ignore:rmsprop. the fused CPU kernel is not built")
@pytest.mark.parametrize("mode", ["full", "bf16", "8bit"])
def test_without_the_cpu_kernel_every_step_takes_the_torch_paths(without_the_cpu_kernel, mode):
    """fused=None then steps as fused=False, bit for bit, in every state format."""
    settings = {"momentum": 0.9, "centered": True, "state_precision": mode, "min_8bit_size": 256}
    results = []
    for fused in (None, False):
        params = make_params(torch.float32, [(300,), (7,)])
        optimizer = RMSprop(params, fused=fused, **settings)
        run_steps(optimizer, params, make_gradients(params, len(LRS)), torch.float32)
        results.append([p.detach() for p in params] + state_tensors(optimizer, params))
    for fallback, torch_path in zip(*results, strict=True):
        assert torch.equal(fallback, torch_path)


@pytest.mark.parametrize("flags", FLAG_COMBINATIONS[::5], ids=combination_id)
def test_every_instruction_set_equals_for_loop(instruction_set, flags):
    fused, loop = fused_and_loop(flags, torch.float32, torch.float32)
    for actual, expected in zip(fused, loop, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _step_with_infinite_mean_square(fused: bool) -> torch.Tensor:
    """A centered step whose second moment is v - m^2 = 1 - inf = -inf: clamp_min makes it 0."""
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = RMSprop([param], lr=0.1, centered=True, fused=fused)
    param.grad = torch.zeros(2)
    optimizer.step()
    optimizer.state[param]["square_avg"].fill_(1.0)
    optimizer.state[param]["grad_avg"].fill_(1e30)
    optimizer.step()
    return param.detach().clone()


def test_a_negative_infinite_second_moment_is_clamped_to_zero_as_the_for_loop_does(instruction_set):
    expected = _step_with_infinite_mean_square(fused=False)
    assert torch.equal(expected, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(_step_with_infinite_mean_square(fused=True), expected, rtol=0, atol=0)


# --- low-precision state ---------------------------------------------------------
#
# Tolerances: fused_checks.check_same_step.


def _encoded_settings(flags: dict, mode: str) -> dict:
    return {**settings_of(flags), "state_precision": mode, "min_8bit_size": 4096}


@pytest.mark.parametrize("mode", ["bf16", "8bit"])
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=combination_id)
def test_fused_encoded_state_equals_the_per_tensor_path_step_by_step(monkeypatch, flags, mode):
    step_by_step(monkeypatch, _encoded_settings(flags, mode), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["bf16", "8bit"])
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS[::7], ids=combination_id)
def test_fused_encoded_state_of_other_parameter_dtypes_equals_the_per_tensor_path(monkeypatch, flags, mode, dtype):
    step_by_step(monkeypatch, _encoded_settings(flags, mode), dtype)


def test_fused_8bit_blocks_of_extreme_magnitudes_equal_the_per_tensor_path():
    """Blocks whose absmax lies outside [2^-126, 2^126), which the encoding scales by 2^32 or
    2^-32 before the reciprocal: the grad_avg of gradients near 1e-37 (subnormal), and a
    momentum block stored with an absmax of 1.5e38."""
    settings = {"state_precision": "8bit", "min_8bit_size": 256, "centered": True, "momentum": 0.9, "lr": 1e-3}
    generator = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(768, generator=generator))]
    optimizer = RMSprop(params, fused=None, **settings)
    scale = torch.cat([torch.full((256,), 1e-37), torch.ones(512)])
    for step in range(5):
        if step == 1:
            optimizer.state[params[0]]["momentum_buffer_absmax"][2] = 1.5e38
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin = RMSprop(twins, fused=False, **settings)
        twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        twin.param_groups[0]["fused"] = False
        gradient = torch.randn(768, generator=generator) * scale
        params[0].grad, twins[0].grad = gradient.clone(), gradient.clone()
        optimizer.step()
        twin.step()
        check_same_step(optimizer, params, twin, twins)
        state = optimizer.state[params[0]]
        assert state["grad_avg_absmax"][0] < 2.0**-126
        assert step == 0 or state["momentum_buffer_absmax"][2] >= 2.0**126


@pytest.mark.parametrize("mode", ["bf16", "8bit"])
def test_fused_encoded_state_does_not_depend_on_the_thread_count(mode):
    """The noise is a function of the element, not of the thread that draws it."""
    settings = {"momentum": 0.9, "centered": True, "state_precision": mode}
    results = []
    threads = torch.get_num_threads()
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            params = make_params(torch.float32, [(140_001,)])  # three of the kernel's chunks
            optimizer = RMSprop(params, **settings)
            run_steps(optimizer, params, make_gradients(params, len(LRS)), torch.float32)
        finally:
            torch.set_num_threads(threads)
        results.append(state_tensors(optimizer, params) + [optimizer.state[params[0]]["grad_variance"]])
    for one_thread, two_threads in zip(*results, strict=True):
        assert torch.equal(one_thread, two_threads)


@pytest.mark.parametrize(
    "settings",
    [{"fused": False}, {"foreach": False}, {"foreach": True}],
    ids=["fused-false", "foreach-false", "foreach-true"],
)
def test_low_precision_groups_step_per_tensor_without_fused(monkeypatch, settings):
    calls = spy_on_encoded_kernels(monkeypatch)
    params = make_params(torch.float32, [(5000,)])
    optimizer = RMSprop(params, state_precision="8bit", **settings)
    run_steps(optimizer, params, make_gradients(params, len(LRS)), torch.float32)
    assert calls == [0] * len(LRS)


def test_fused_true_refuses_a_low_precision_step_it_cannot_take():
    param = torch.nn.Parameter(torch.ones(80, 80))
    optimizer = RMSprop([param], fused=True, state_precision="bf16")
    param.grad = torch.ones(80, 80)
    optimizer.step()  # creates the state, per tensor
    param.grad = torch.ones(80, 80).t()
    before = copy.deepcopy(optimizer.state[param])
    start = param.detach().clone()
    message = "fused=True cannot take this step: parameter 0 in group 0: its gradient is not contiguous"
    with pytest.raises(RuntimeError, match=message):
        optimizer.step()
    assert torch.equal(param, start)
    for key, value in before.items():
        assert torch.equal(optimizer.state[param][key], value)


def test_fused_encoded_group_takes_complex_parameters_with_their_own_dtype_state(monkeypatch):
    """Complex parameters keep complex state in low-precision groups; the full-precision kernel steps them."""
    calls = spy_on_encoded_kernels(monkeypatch)
    fused_params = make_params(torch.complex64, [(300,)]) + make_params(torch.float32, [(5000,)])
    loop_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    settings = {"momentum": 0.8, "centered": True, "state_precision": "8bit", "min_8bit_size": 0}
    fused = RMSprop(fused_params, **settings)
    loop = RMSprop(loop_params, fused=False, **settings)
    generator = torch.Generator().manual_seed(1)
    for _ in range(len(LRS)):
        for p, q in zip(fused_params, loop_params, strict=True):
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    assert calls[1::2] == [0] * len(LRS) and calls[2::2] == [2] * (len(LRS) - 1)
    assert fused.state[fused_params[0]]["square_avg"].dtype == torch.complex64
    torch.testing.assert_close(fused_params[0], loop_params[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_params[1], loop_params[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("position", [256, 300, 511], ids=["first", "middle", "last"])
def test_fused_8bit_state_makes_the_block_of_a_nan_non_finite_as_the_per_tensor_path(monkeypatch, position):
    """The policy of docs/memory.md: a NaN in 8-bit state makes its whole block (elements 256-511
    here) non-finite, the block's absmax NaN. The kernel's absmax once let any later element of the
    block replace the NaN, which decoded to finite values: the NaN was silently dropped."""
    calls = spy_on_encoded_kernels(monkeypatch)
    for fused in (None, False):
        param = torch.nn.Parameter(torch.ones(5000))
        optimizer = RMSprop([param], fused=fused, momentum=0.9, centered=True, state_precision="8bit")
        param.grad = torch.ones(5000)
        optimizer.step()  # creates the state, per tensor
        param.grad = torch.linspace(0.1, 1.0, 5000)
        param.grad[position] = float("nan")
        optimizer.step()
        state = optimizer.state[param]
        for key, qmap in (
            ("grad_variance", UNSIGNED_MAP),
            ("grad_avg", SIGNED_MAP),
            ("momentum_buffer", SIGNED_MAP),
        ):
            absmax = state[f"{key}_absmax"]
            assert absmax[1].isnan() and absmax[[0, 2, -1]].isfinite().all(), (fused, key)
            decoded = dequantize_blockwise(state[key], absmax, qmap)
            assert decoded[256:512].isnan().all() and decoded[:256].isfinite().all(), (fused, key)
    assert calls == [0, 1, 0, 0]


def _stepped_low_precision(precision):
    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 600, 5000)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = RMSprop(params, state_precision=precision, min_8bit_size=256, momentum=0.9, centered=True)
    optimizer.step()
    return params, [optimizer.state[p] for p in params]


_BREAKAGES = {
    "none": lambda params, states: None,
    "grad-not-contiguous": lambda params, states: setattr(params[1], "grad", torch.randn(1200)[::2]),
    "grad-negative-bit": lambda params, states: setattr(params[0], "grad", torch._neg_view(params[0].grad)),
    "entry-dtype": lambda params, states: states[2].update(grad_avg=states[2]["grad_avg"].float()),
    "entry-shape": lambda params, states: states[1].update(momentum_buffer=states[1]["momentum_buffer"][:-1]),
    "step-dtype": lambda params, states: states[0].update(step=states[0]["step"].half()),
    "step-shape": lambda params, states: states[2].update(step=torch.zeros(2)),
}


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
@pytest.mark.parametrize("breakage", _BREAKAGES.values(), ids=_BREAKAGES.keys())
def test_the_bulk_check_of_encoded_state_agrees_with_the_per_param_check(precision, breakage):
    from rmsprop.backends.fused import encoded_all_supported, encoded_unsupported_reason

    params, states = _stepped_low_precision(precision)
    breakage(params, states)
    reasons = [encoded_unsupported_reason(p, state, precision) for p, state in zip(params, states, strict=True)]
    assert encoded_all_supported(params, states, precision) == all(reason is None for reason in reasons)
