"""torch.compile of a function that calls ``optimizer.step()``.

Compiled and eager steps must agree, and the step must compile to one graph
wherever torch's own RMSprop does.
"""

import pytest
import torch

from rmsprop import RMSprop

# The main flag combinations: torch's variants and each of ours.
FLAG_COMBOS = [
    {},
    {"momentum": 0.9, "centered": True, "weight_decay": 0.1},
    {"maximize": True, "momentum": 0.5},
    {"eps_in_sqrt": True, "lr_in_momentum": True, "momentum": 0.9, "nesterov": True},
    {"bias_correction": True, "decoupled_weight_decay": True, "weight_decay": 0.1},
    {"initial_scale": 1.0, "momentum": 0.9, "lr_in_momentum": True},
]
# Centered with bias correction estimates the variance from one gradient at
# step 1: v - m^2 cancels to rounding noise, so any reordering of float
# operations (as a compiler does) changes the step far beyond fp32 tolerance.
# It is compared for graph breaks only.
ILL_CONDITIONED = {"bias_correction": True, "centered": True, "momentum": 0.9}
TORCH_KEYS = {"lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize", "foreach"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 5, generator=generator) for _ in range(n)]


def _graph_breaks(optimizer_class, flags: dict) -> tuple[int, int]:
    torch._dynamo.reset()
    model = _model()
    optimizer = optimizer_class(model.parameters(), lr=0.01, **flags)
    model(_batches(1)[0]).pow(2).mean().backward()
    explanation = torch._dynamo.explain(optimizer.step)()
    return explanation.graph_count, explanation.graph_break_count


# The default (fused=None, foreach=None) and fused=True take the CPU kernel
# eagerly; torch.compile traces the torch ops instead, which it fuses itself.
PATHS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "default": {}, "fused": {"fused": True}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("flags", [*FLAG_COMBOS, ILL_CONDITIONED], ids=str)
def test_step_compiles_to_one_graph_like_torch(flags, path):
    flags = {**flags, **PATHS[path]}
    torch_flags = {key: value for key, value in flags.items() if key in TORCH_KEYS}
    assert _graph_breaks(torch.optim.RMSprop, torch_flags) == (1, 0)
    assert _graph_breaks(RMSprop, flags) == (1, 0)


def _train(
    flags: dict, compiled: bool, backend: str = "aot_eager", steps: int = 4, schedule: bool = False
) -> list[torch.Tensor]:
    """Params after ``steps`` steps, optionally with a scheduler changing lr in between."""
    torch._dynamo.reset()
    model = _model()
    optimizer = RMSprop(model.parameters(), **{"lr": 0.01, **flags})
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5) if schedule else None

    def step():
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    if compiled:
        step = torch.compile(step, backend=backend)
    for x in _batches(steps):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        step()
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(compiled: list[torch.Tensor], eager: list[torch.Tensor]) -> None:
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=str)
def test_compiled_step_equals_eager(flags, path):
    flags = {**flags, **PATHS[path]}
    _assert_close(_train(flags, compiled=True), _train(flags, compiled=False))


@pytest.mark.parametrize("foreach", [False, True])
def test_compiled_step_follows_tensor_lr_changes(foreach):
    # A Tensor lr is updated in place by the scheduler: the compiled graph must
    # read the new value, not the one it was traced with.
    flags = {"lr": torch.tensor(0.01), "momentum": 0.9, "foreach": foreach}
    eager = _train({**flags, "lr": torch.tensor(0.01)}, compiled=False, schedule=True)
    _assert_close(_train(flags, compiled=True, schedule=True), eager)


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager():
    flags = {"momentum": 0.9, "nesterov": True, "bias_correction": True, "weight_decay": 0.1, "foreach": True}
    _assert_close(_train(flags, compiled=True, backend="inductor"), _train(flags, compiled=False))


def _frames_compiled(optimizer_class, flags: dict) -> int:
    """Frames compiled over steps whose Tensor lr a scheduler changes every time."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _model()
    optimizer = optimizer_class(model.parameters(), lr=torch.tensor(0.01), **flags)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def step():
        optimizer.step()
        scheduler.step()

    for x in _batches(4):
        model(x).pow(2).mean().backward()
        step()
    return counter.frame_count


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("flags", [{}, {"momentum": 0.9, "centered": True}], ids=str)
def test_tensor_lr_changes_do_not_recompile_like_torch(flags, foreach):
    flags = {**flags, "foreach": foreach}
    assert _frames_compiled(RMSprop, flags) == _frames_compiled(torch.optim.RMSprop, flags) == 1


@pytest.mark.parametrize("foreach", [False, True])
def test_tensor_lr_changes_do_not_recompile_with_our_flags(foreach):
    flags = {"momentum": 0.9, "nesterov": True, "lr_in_momentum": True, "weight_decay": 0.1}
    assert _frames_compiled(RMSprop, {**flags, "decoupled_weight_decay": True, "foreach": foreach}) == 1
