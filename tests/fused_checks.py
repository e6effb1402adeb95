"""What the tests of the fused kernels share: the flag combinations and the runs they compare.

Used by tests/test_fused.py (the CPU kernels through RMSprop) and
tests/test_triton.py (the Triton kernel in its interpreter); the tolerances
are explained in tests/test_fused.py. The check of the kernels' machine code
for packed square roots is used by tests/test_cpu_kernel.py.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import torch

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
