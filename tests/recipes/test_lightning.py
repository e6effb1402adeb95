"""Lightning with ``rmsprop.RMSprop``: automatic optimization (the closure), gradient clipping,
bf16, resuming through ``ckpt_path``, manual optimization.

A small MLP, random regression data, a few steps; each run is checked against the same run
with ``torch.optim.RMSprop``.
"""

import pytest

pytest.importorskip("lightning")

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmsprop import RMSprop

pytestmark = pytest.mark.recipes

STEPS = 8


def random_regression() -> DataLoader:
    """Two epochs of STEPS // 2 batches each."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2 * STEPS, 8, generator=generator)
    targets = inputs @ torch.randn(8, 1, generator=generator) + 0.1 * torch.randn(2 * STEPS, 1, generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=4)


# --8<-- [start:automatic]
class Regression(L.LightningModule):
    def __init__(self, **optimizer_settings):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.optimizer_settings = optimizer_settings  # e.g. lr=1e-2, momentum=0.9, centered=True

    def training_step(self, batch, batch_index):
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self):
        # Lightning calls optimizer.step(closure): the step runs the forward and backward pass first.
        return RMSprop(self.parameters(), **self.optimizer_settings)
# --8<-- [end:automatic]


# --8<-- [start:manual]
class ManualRegression(Regression):
    def __init__(self, **optimizer_settings):
        super().__init__(**optimizer_settings)
        self.automatic_optimization = False

    def training_step(self, batch, batch_index):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_index)
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        optimizer.step()
        return loss
# --8<-- [end:manual]


class TorchOptimizer:
    """Mixed in first: the same module with torch.optim.RMSprop, the reference."""

    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), **self.optimizer_settings)


class TorchRegression(TorchOptimizer, Regression):
    pass


class TorchManualRegression(TorchOptimizer, ManualRegression):
    pass


def trainer(**settings) -> L.Trainer:
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "max_epochs": 2, **quiet, **settings})


def fitted(module: L.LightningModule, **trainer_settings) -> list[torch.Tensor]:
    trainer(**trainer_settings).fit(module, random_regression())
    return [p.detach().clone() for p in module.parameters()]


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


SETTINGS = {"lr": 1e-2, "momentum": 0.9, "centered": True}


@pytest.mark.parametrize(
    "module_class, torch_class",
    [(Regression, TorchRegression), (ManualRegression, TorchManualRegression)],
    ids=["automatic", "manual"],
)
def test_steps_as_torch_rmsprop(module_class, torch_class):
    trainer_settings = {} if module_class is ManualRegression else {"gradient_clip_val": 0.5}
    ours = fitted(module_class(fused=False, **SETTINGS), **trainer_settings)
    theirs = fitted(torch_class(**SETTINGS), **trainer_settings)
    assert_same(ours, theirs)
    assert any(not torch.equal(a, b) for a, b in zip(ours, Regression().parameters()))


def test_gradient_clipping_acts_before_the_step():
    clipped = fitted(Regression(**SETTINGS), gradient_clip_val=1e-3)
    unclipped = fitted(Regression(**SETTINGS))
    assert any(not torch.allclose(a, b) for a, b in zip(clipped, unclipped))


def test_default_fused_kernel_matches_torch_within_rounding():
    ours = fitted(Regression(**SETTINGS), gradient_clip_val=0.5)
    theirs = fitted(TorchRegression(**SETTINGS), gradient_clip_val=0.5)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precision_with_fused_false_steps_as_torch(precision):
    # bf16-true makes the parameters bfloat16: fused=False rounds every intermediate to bf16 as
    # torch does; the default fused kernel computes in float32 and rounds once.
    ours = fitted(Regression(fused=False, **SETTINGS), precision=precision)
    theirs = fitted(TorchRegression(**SETTINGS), precision=precision)
    assert_same(ours, theirs)
    assert ours[0].dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)


def test_resuming_through_ckpt_path_continues_bit_identically(tmp_path):
    uninterrupted = fitted(Regression(**SETTINGS))
    # --8<-- [start:resume]
    # At the end of each epoch: a plain DataLoader cannot resume within one. Resume with the
    # same callbacks, and with max_epochs (a run cut short by max_steps resumes one batch off).
    def checkpointing_trainer() -> L.Trainer:
        every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
        return trainer(callbacks=[every_epoch], enable_checkpointing=True)

    checkpointing_trainer().fit(Regression(**SETTINGS), random_regression())
    resumed = Regression(**SETTINGS)
    checkpointing_trainer().fit(resumed, random_regression(), ckpt_path=tmp_path / "epoch=0.ckpt")
    # --8<-- [end:resume]
    assert resumed.trainer.global_step == STEPS
    assert_same(uninterrupted, [p.detach() for p in resumed.parameters()])
