"""Every ``torch.optim.lr_scheduler`` drives RMSprop as it drives ``torch.optim.RMSprop``."""

import inspect

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR

from rmsprop import RMSprop, reference

STEPS = 12
S = lr_scheduler

# One way to build each scheduler; cycling ones also cycle 'momentum'.
SCHEDULERS = {
    "LambdaLR": lambda opt: S.LambdaLR(opt, lambda epoch: 1 / (1 + epoch)),
    "MultiplicativeLR": lambda opt: S.MultiplicativeLR(opt, lambda epoch: 0.9),
    "StepLR": lambda opt: S.StepLR(opt, step_size=3, gamma=0.5),
    "MultiStepLR": lambda opt: S.MultiStepLR(opt, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda opt: S.ConstantLR(opt, factor=0.5, total_iters=4),
    "LinearLR": lambda opt: S.LinearLR(opt, start_factor=0.2, total_iters=5),
    "ExponentialLR": lambda opt: S.ExponentialLR(opt, gamma=0.8),
    "PolynomialLR": lambda opt: S.PolynomialLR(opt, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda opt: S.CosineAnnealingLR(opt, T_max=6, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda opt: S.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2),
    "ChainedScheduler": lambda opt: S.ChainedScheduler(
        [S.ConstantLR(opt, factor=0.5, total_iters=3), S.ExponentialLR(opt, gamma=0.9)]
    ),
    "SequentialLR": lambda opt: S.SequentialLR(
        opt, [S.LinearLR(opt, start_factor=0.1, total_iters=3), S.CosineAnnealingLR(opt, T_max=8)], milestones=[3]
    ),
    "ReduceLROnPlateau": lambda opt: S.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=1),
    "CyclicLR": lambda opt: S.CyclicLR(
        opt, base_lr=0.001, max_lr=0.02, step_size_up=3, cycle_momentum=True, base_momentum=0.5, max_momentum=0.9
    ),
    "OneCycleLR": lambda opt: S.OneCycleLR(
        opt, max_lr=0.05, total_steps=STEPS, cycle_momentum=True, base_momentum=0.5, max_momentum=0.9
    ),
    "SWALR": lambda opt: SWALR(opt, swa_lr=0.001, anneal_epochs=4),
}


def test_every_torch_scheduler_is_covered():
    torch_schedulers = {
        name
        for name, cls in inspect.getmembers(lr_scheduler, inspect.isclass)
        if (issubclass(cls, lr_scheduler.LRScheduler) or cls is lr_scheduler.ReduceLROnPlateau)
        and not name.startswith("_")
        and name != "LRScheduler"
    }
    assert torch_schedulers <= SCHEDULERS.keys()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _run(optimizer_class, scheduler_name: str, lr, **flags) -> list[tuple]:
    """(lr, momentum, params) of each group after every step."""
    model = _model()
    second_lr = torch.tensor(lr.item() / 2) if torch.is_tensor(lr) else lr / 2
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": second_lr}]
    optimizer = optimizer_class(groups, lr=lr, momentum=0.9, **flags)
    scheduler = SCHEDULERS[scheduler_name](optimizer)
    generator = torch.Generator().manual_seed(1)
    history = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model(torch.randn(6, 4, generator=generator)).pow(2).mean()
        loss.backward()
        optimizer.step()
        if isinstance(scheduler, S.ReduceLROnPlateau):
            scheduler.step(round(loss.item(), 1))  # coarse, so that it plateaus
        else:
            scheduler.step()
        history.append(
            (
                [float(g["lr"]) for g in optimizer.param_groups],
                [g["momentum"] for g in optimizer.param_groups],
                [p.detach().clone() for p in model.parameters()],
            )
        )
    return history


def _assert_same_history(ours: list[tuple], theirs: list[tuple]) -> None:
    for step, ((lrs, momenta, params), (their_lrs, their_momenta, their_params)) in enumerate(zip(ours, theirs)):
        assert lrs == their_lrs, f"lr differs at step {step}"
        assert momenta == their_momenta, f"momentum differs at step {step}"
        for p, q in zip(params, their_params, strict=True):
            # Float32 rounding: ours takes the fused kernel by default.
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"params differ at step {step}")


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_drives_rmsprop_as_torch(name):
    ours, theirs = _run(RMSprop, name, lr=0.01), _run(torch.optim.RMSprop, name, lr=0.01)
    _assert_same_history(ours, theirs)
    assert len({tuple(lrs) for lrs, _, _ in ours}) > 1, "the scheduler should change lr"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_with_tensor_lr_as_torch(name):
    ours = _run(RMSprop, name, lr=torch.tensor(0.01))
    _assert_same_history(ours, _run(torch.optim.RMSprop, name, lr=torch.tensor(0.01)))


@pytest.mark.parametrize("name", ["OneCycleLR", "CyclicLR"])
@pytest.mark.parametrize(
    "flags",
    [
        {"lr_in_momentum": True, "nesterov": True, "eps_in_sqrt": True},
        {"centered": True, "weight_decay": 0.1},
        {"bias_correction": True, "decoupled_weight_decay": True, "weight_decay": 0.1, "initial_scale": 1.0},
    ],
    ids=str,
)
def test_cycled_lr_and_momentum_reach_every_variant(name, flags):
    """With our flags, each step uses the lr and momentum the scheduler set (NumPy oracle)."""
    model = _model()
    params = list(model.parameters())
    optimizer = RMSprop(params, lr=0.01, momentum=0.9, alpha=0.9, **flags)
    scheduler = SCHEDULERS[name](optimizer)
    generator = torch.Generator().manual_seed(2)
    expected = [p.detach().double().numpy() for p in params]
    initial_scale = flags.get("initial_scale", 0.0)
    states = [reference.init_state(value, initial_scale) for value in expected]
    step_flags = {key: value for key, value in flags.items() if key != "initial_scale"}
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(torch.randn(6, 4, generator=generator)).pow(2).mean().backward()
        group = optimizer.param_groups[0]
        settings = {"lr": group["lr"], "momentum": group["momentum"], "alpha": 0.9, **step_flags}
        for i, p in enumerate(params):
            expected[i], states[i] = reference.step(expected[i], p.grad.double().numpy(), states[i], **settings)
        optimizer.step()
        scheduler.step()
    for p, value in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), value, rtol=1e-4, atol=1e-6)
