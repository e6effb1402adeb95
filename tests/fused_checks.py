"""What the tests of the fused kernels share: the flag combinations and the runs they compare.

Used by tests/test_fused.py (the CPU kernels through RMSprop) and
tests/test_triton.py (the Triton kernel in its interpreter); the tolerances
of full-precision state are explained in tests/test_fused.py, those of
low-precision state here. The check of the kernels' machine code
for packed square roots is used by tests/test_cpu_kernel.py.
"""

from __future__ import annotations

import copy
import itertools
import re

import numpy as np
import torch

import rmsprop.backends.cpu.kernel
import rmsprop.core.optimizer
from rmsprop import RMSprop, reference

SHAPES = [(3, 5), (7,), (2, 3, 4), (), (0,), (300,)]
# A tensor over two of the CPU kernel's chunks (kChunk = 2^16 elements, backends/cpu/csrc/kernel.h),
# in a few tests only: chunking does not depend on the flags.
LARGE_SHAPES = [(70_001,), (5,)]
LRS = [0.05, 0.02, 0.08, 0.03]  # one per step
FLAG_NAMES = (
    "centered",
    "maximize",
    "eps_in_sqrt",
    "bias_correction",
    "weight_decay",
    "decoupled_weight_decay",
    "momentum",
    "nesterov",
    "lr_in_momentum",
)


def _flag_combinations() -> list[dict]:
    combinations = []
    weight_decays = [(0.0, False), (0.2, False), (0.2, True)]
    momenta = [(0.0, False), (0.8, False), (0.8, True)]
    for centered, maximize, eps_in_sqrt, bias_correction, (wd, decoupled), (mu, nesterov), lr_in_momentum in (
        itertools.product([False, True], [False, True], [False, True], [False, True], weight_decays, momenta, [False, True])
    ):
        combinations.append(dict(zip(FLAG_NAMES, (centered, maximize, eps_in_sqrt, bias_correction, wd, decoupled, mu, nesterov, lr_in_momentum), strict=True)))
    return combinations


FLAG_COMBINATIONS = _flag_combinations()


def combination_id(flags: dict) -> str:
    return "-".join(f"{name}={value}" for name, value in flags.items() if value)


def settings_of(flags: dict) -> dict:
    # Centered with bias correction has v_hat - m_hat^2 = 0 exactly at the first
    # step from v = 0, where rounding alone decides the update; starting from
    # v = 1 keeps the variance away from zero.
    return {"alpha": 0.9, "eps": 0.1, "initial_scale": 1.0 if flags["centered"] else 0.0, **flags}


def make_params(dtype: torch.dtype, shapes: list[tuple] = SHAPES, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)) for shape in shapes]


def make_gradients(params: list[torch.Tensor], steps: int, seed: int = 1) -> list[list[torch.Tensor | None]]:
    """Per step, one gradient per parameter; the second parameter skips step 2, so steps differ."""
    generator = torch.Generator().manual_seed(seed)
    gradients = []
    for step in range(steps):
        gradients.append(
            [
                None if (step == 1 and i == 1) else torch.randn(p.shape, generator=generator, dtype=torch.float64)
                for i, p in enumerate(params)
            ]
        )
    return gradients


def run_steps(optimizer: RMSprop, params: list[torch.Tensor], gradients: list, dtype: torch.dtype, after_step=None) -> None:
    for lr, step_gradients in zip(LRS, gradients, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(params, step_gradients, strict=True):
            p.grad = None if g is None else g.to(dtype)
        optimizer.step()
        if after_step is not None:
            after_step()


def state_tensors(optimizer: RMSprop, params: list[torch.Tensor]) -> list[torch.Tensor]:
    tensors = []
    for p in params:
        state = optimizer.state[p]
        tensors.append(p.detach())
        tensors += [state[key] for key in ("step", "square_avg", "grad_avg", "momentum_buffer") if key in state]
    return tensors


def fused_and_loop(
    flags: dict, dtype: torch.dtype, loop_dtype: torch.dtype, round_each_step: bool = False, shapes: list[tuple] = SHAPES
):
    """(fused tensors, for-loop tensors) after len(LRS) steps from the same start."""
    settings = settings_of(flags)
    fused_params, loop_params = make_params(dtype, shapes), make_params(dtype, shapes)
    loop_params = [torch.nn.Parameter(p.detach().to(loop_dtype)) for p in loop_params]
    # Both paths see the same gradients: those the low-precision parameters get.
    gradients = [[g if g is None else g.to(dtype).double() for g in step] for step in make_gradients(fused_params, len(LRS))]
    fused = RMSprop(fused_params, fused=True, **settings)
    loop = RMSprop(loop_params, foreach=False, fused=False, **settings)
    run_steps(fused, fused_params, gradients, dtype)

    def round_to_storage() -> None:
        for tensor in state_tensors(loop, loop_params):
            tensor.copy_(tensor.to(dtype))

    run_steps(loop, loop_params, gradients, loop_dtype, round_to_storage if round_each_step else None)
    return state_tensors(fused, fused_params), state_tensors(loop, loop_params)


def check_low_precision(results, dtype, rtol):
    fused, loop = results
    for actual, expected in zip(fused, loop, strict=True):
        if actual.dtype != dtype:  # the float32 step counters
            torch.testing.assert_close(actual, expected)
            continue
        # Sums like mu*b + u round at the scale of their largest terms.
        atol = torch.finfo(dtype).eps * expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol)


def check_float64_against_reference(flags: dict, shapes: list[tuple] = SHAPES) -> None:
    settings = settings_of(flags)
    params = make_params(torch.float64, shapes)
    gradients = make_gradients(params, len(LRS))
    optimizer = RMSprop(params, fused=True, **settings)
    run_steps(optimizer, params, gradients, torch.float64)

    reference_settings = {k: v for k, v in settings.items() if k != "initial_scale"}
    for i, start in enumerate(make_params(torch.float64, shapes)):
        value = start.detach().numpy()
        state = reference.init_state(value, settings["initial_scale"])
        for lr, step_gradients in zip(LRS, gradients, strict=True):
            if step_gradients[i] is not None:
                value, state = reference.step(value, step_gradients[i].numpy(), state, lr=lr, **reference_settings)
        p_state = optimizer.state[params[i]]
        np.testing.assert_allclose(params[i].detach().numpy(), value, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(p_state["square_avg"].numpy(), state.square_avg, rtol=1e-12, atol=1e-14)
        assert p_state["step"].item() == state.step
        if flags["centered"]:
            np.testing.assert_allclose(p_state["grad_avg"].numpy(), state.grad_avg, rtol=1e-12, atol=1e-14)
        if flags["momentum"]:
            np.testing.assert_allclose(p_state["momentum_buffer"].numpy(), state.momentum_buffer, rtol=1e-12, atol=1e-14)


def square_rooting(sections: dict[str, str], prefix: str = "v?") -> tuple[list[str], list[str]]:
    """Of x86 assembly split into named sections (functions, loop bodies): the names of those
    that take square roots, and of those among them that take no packed (vectorised) ones.
    ``prefix`` is the regex before ``sqrt`` ("v": AVX's VEX forms only)."""
    rooting = [name for name, body in sections.items() if re.search(rf"\b{prefix}sqrt[sp][sd]\b", body)]
    scalar_only = [name for name in rooting if not re.search(rf"\b{prefix}sqrtp[sd]\b", sections[name])]
    return rooting, scalar_only


# --- low-precision state ---------------------------------------------------------
#
# The fused kernels for bf16 and 8-bit state (rmsprop.backends.fused.fused_rmsprop_encoded)
# against the per-tensor path (fused=False: decode, torch's rule, encode), one
# step at a time from the same stored state. Both draw the same rounding noise
# per element (rmsprop.formats.noise.rounding_noise), so they differ only
# through float32 rounding: a few ulps in the decoded-and-updated values, which
# moves a value across a stochastic rounding threshold with probability
# (difference / spacing of the stored values), about 2^-16 per element for
# bfloat16 and less for 8-bit codes. Hence, per step:
#
# * parameters: float32 within rtol=1e-5, atol=1e-6 and float64 within
#   rtol=1e-12, atol=1e-14 (as above); bfloat16 and float16 within one ulp of
#   their type (a float32 difference can tip the final rounding);
# * bfloat16 state: within one bfloat16 ulp (rtol=2^-7) plus 1e-6 of the
#   tensor's largest value (grad_variance = v - m^2/c is rounded at the scale
#   of v), and at most 1% of the elements (or one) different at all;
# * 8-bit state: codes equal or adjacent, at most 1% (or one) different; absmax within
#   float32 rounding (rtol=1e-5);
# * fp32 state of small tensors (min_8bit_size): as float32 parameters.
#
# A wrong flag, map, block boundary or noise would change most elements.

LOW_PRECISION_SHAPES = [(70, 73), (80,)]  # 20 blocks, the last one partial; and one below min_8bit_size


def check_same_step(fused: RMSprop, fused_params: list, loop: RMSprop, loop_params: list) -> None:
    for p, q in zip(fused_params, loop_params, strict=True):
        if p.dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        elif p.dtype == torch.float64:
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        else:
            eps = torch.finfo(p.dtype).eps
            torch.testing.assert_close(p, q, rtol=eps, atol=eps * q.abs().max().item())
        state, expected = fused.state[p], loop.state[q]
        assert set(state) == set(expected)
        for key, value in state.items():
            reference_value = expected[key]
            assert value.dtype == reference_value.dtype, key
            if value.dtype == torch.uint8:
                difference = (value.int() - reference_value.int()).abs()
                assert difference.max() <= 1 and few(difference != 0), key
            elif value.dtype == torch.bfloat16:
                scale = reference_value.float().abs().max().item()
                torch.testing.assert_close(value.float(), reference_value.float(), rtol=2**-7, atol=1e-6 * scale)
                assert few(value != reference_value), key
            elif key.endswith("_absmax"):
                torch.testing.assert_close(value, reference_value, rtol=1e-5, atol=0)
            else:
                torch.testing.assert_close(value, reference_value, rtol=1e-5, atol=1e-6)


def spy_on_encoded_kernels(monkeypatch) -> list[int]:
    """How many parameters each call of the low-precision fused path got: through the Python
    planning (``fused_rmsprop_encoded``) or as a group the CPU kernel gathered itself."""
    calls = []
    original = rmsprop.core.optimizer.fused_rmsprop_encoded
    original_run = rmsprop.backends.cpu.kernel.run

    def spy(params, *args):
        calls.append(len(params))
        return original(params, *args)

    def spy_run(plan, *args):
        calls.append(len(plan))
        return original_run(plan, *args)

    monkeypatch.setattr(rmsprop.core.optimizer, "fused_rmsprop_encoded", spy)
    monkeypatch.setattr(rmsprop.backends.cpu.kernel, "run", spy_run)
    return calls


def few(different: torch.Tensor) -> bool:
    """At most 1% of the elements, or one."""
    return different.sum().item() <= max(1, 0.01 * different.numel())


def step_by_step(monkeypatch, settings: dict, dtype: torch.dtype, steps: int = 6, shapes=LOW_PRECISION_SHAPES) -> None:
    """Steps a fused optimizer; before each step a per-tensor twin loads its state; both must agree after it."""
    calls = spy_on_encoded_kernels(monkeypatch)
    params = make_params(dtype, shapes)
    optimizer = RMSprop(params, fused=None, **settings)
    for step, step_gradients in enumerate(make_gradients(params, steps)):
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin = RMSprop(twins, fused=False, **settings)
        twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        twin.param_groups[0]["fused"] = False  # load_state_dict takes the saved group's settings
        for optimizer_, params_ in ((optimizer, params), (twin, twins)):
            for group in optimizer_.param_groups:
                group["lr"] = LRS[step % len(LRS)]
            for p, g in zip(params_, step_gradients, strict=True):
                p.grad = None if g is None else g.to(dtype)
        optimizer.step()
        fused_count = calls.pop(0)
        twin.step()
        assert calls.pop(0) == 0
        check_same_step(optimizer, params, twin, twins)
        # The first step creates the state, per tensor; then every parameter with a gradient is fused.
        assert fused_count == (0 if step == 0 else sum(g is not None for g in step_gradients))
