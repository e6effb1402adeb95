"""accelerate with ``rmsprop.RMSprop``: ``prepare``, ``save_state`` and ``load_state``.

A small MLP, random regression data, on the CPU.
"""

import pytest

pytest.importorskip("accelerate")

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmsprop import RMSprop

pytestmark = pytest.mark.recipes

SETTINGS = {"lr": 1e-2, "momentum": 0.9, "centered": True}


def random_regression() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 8, generator=generator)
    targets = inputs @ torch.randn(8, 1, generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=4)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


# --8<-- [start:train]
def train(accelerator, model, optimizer, batches, epochs=1):
    for _ in range(epochs):
        for inputs, targets in batches:
            optimizer.zero_grad()
            accelerator.backward(nn.functional.mse_loss(model(inputs), targets))
            optimizer.step()
# --8<-- [end:train]


def prepared(**settings):
    set_seed(0)
    # --8<-- [start:prepare]
    accelerator = Accelerator(cpu=True)  # Accelerator() takes the GPUs a machine has
    model = mlp()
    optimizer = RMSprop(model.parameters(), **settings)
    model, optimizer, batches = accelerator.prepare(model, optimizer, random_regression())
    # --8<-- [end:prepare]
    return accelerator, model, optimizer, batches


def parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_prepared_optimizer_steps_as_torch_rmsprop():
    accelerator, model, optimizer, batches = prepared(fused=False, **SETTINGS)
    train(accelerator, model, optimizer, batches)
    assert isinstance(optimizer.optimizer, RMSprop)
    set_seed(0)
    accelerator, torch_model = Accelerator(cpu=True), mlp()
    torch_optimizer = torch.optim.RMSprop(torch_model.parameters(), **SETTINGS)
    torch_model, torch_optimizer, batches = accelerator.prepare(torch_model, torch_optimizer, random_regression())
    train(accelerator, torch_model, torch_optimizer, batches)
    for a, b in zip(parameters(model), parameters(torch_model), strict=True):
        assert torch.equal(a, b)


def test_save_state_and_load_state_resume_bit_identically(tmp_path):
    accelerator, model, optimizer, batches = prepared(**SETTINGS)
    train(accelerator, model, optimizer, batches, epochs=2)
    uninterrupted = parameters(model)

    accelerator, model, optimizer, batches = prepared(**SETTINGS)
    train(accelerator, model, optimizer, batches)
    # --8<-- [start:save-load]
    accelerator.save_state(tmp_path / "checkpoint")
    # ... later, in a fresh process, after the same prepare:
    accelerator, model, optimizer, batches = prepared(**SETTINGS)
    accelerator.load_state(tmp_path / "checkpoint")
    # --8<-- [end:save-load]
    assert optimizer.state_dict()["state"][0]["step"] == len(batches)
    train(accelerator, model, optimizer, batches)
    for a, b in zip(uninterrupted, parameters(model), strict=True):
        assert torch.equal(a, b)
