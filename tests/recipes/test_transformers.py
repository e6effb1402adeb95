"""transformers' ``Trainer`` with ``rmsprop.RMSprop``: both ways in, its parameter groups, resuming.

A GPT-2 of two layers built from a config (no download), random tokens, a few steps.
"""

import pytest

pytest.importorskip("transformers")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from rmsprop import RMSprop

pytestmark = pytest.mark.recipes

STEPS = 6


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def random_tokens(samples: int = 4 * STEPS) -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(64, (samples, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in tokens]


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = {
        "per_device_train_batch_size": 4,
        "max_steps": STEPS,
        "learning_rate": 3e-3,
        "weight_decay": 0.01,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_strategy": "no",
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(output_dir=str(output_dir), **settings)


def trained_parameters(trainer: Trainer, **train_kwargs) -> list[torch.Tensor]:
    trainer.train(**train_kwargs)
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_optimizer_cls_and_kwargs_is_optim_rmsprop_with_our_class(tmp_path):
    # --8<-- [start:cls-and-kwargs]
    model = tiny_gpt2()
    args = training_args(tmp_path / "ours")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=random_tokens(),
        # The Trainer does not pass its learning_rate here: pass it, or RMSprop's 1e-2 is used.
        optimizer_cls_and_kwargs=(RMSprop, {"lr": args.learning_rate, "alpha": 0.99, "fused": False}),
    )
    # --8<-- [end:cls-and-kwargs]
    ours = trained_parameters(trainer)
    theirs = Trainer(
        model=tiny_gpt2(), args=training_args(tmp_path / "torch", optim="rmsprop"), train_dataset=random_tokens()
    )
    torch_params = trained_parameters(theirs)
    fused = trained_parameters(
        Trainer(
            model=tiny_gpt2(),
            args=training_args(tmp_path / "fused"),
            train_dataset=random_tokens(),
            optimizer_cls_and_kwargs=(RMSprop, {"lr": args.learning_rate}),
        )
    )

    # The Trainer builds the same two groups for both: weight decay, and none on biases and norms.
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.01, 0.0]
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [
        len(g["params"]) for g in theirs.optimizer.param_groups
    ]
    for a, b in zip(ours, torch_params, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ours, tiny_gpt2().parameters()))
    # The default fused kernel: each RMSProp step moves a parameter by about lr whatever the
    # gradient's size, so where a gradient is near zero, float32 rounding differences move it
    # by a fraction of lr.
    for a, b in zip(fused, torch_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=0.02 * args.learning_rate)


def test_without_lr_the_trainer_trains_at_rmsprops_default(tmp_path):
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=random_tokens(),
        optimizer_cls_and_kwargs=(RMSprop, {}),
    )
    trainer.train()
    assert trainer.args.learning_rate == 3e-3
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {1e-2}


def test_resuming_from_a_checkpoint_continues_bit_identically(tmp_path):
    def trainer(output_dir, **overrides) -> Trainer:
        args = training_args(output_dir, **overrides)
        return Trainer(
            model=tiny_gpt2(),
            args=args,
            train_dataset=random_tokens(),
            optimizer_cls_and_kwargs=(RMSprop, {"lr": args.learning_rate, "momentum": 0.9, "centered": True}),
        )

    uninterrupted = trained_parameters(trainer(tmp_path / "straight"))
    # --8<-- [start:resume]
    first = trainer(tmp_path / "run", save_strategy="steps", save_steps=STEPS // 2)
    first.train()
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{STEPS // 2}"))
    # --8<-- [end:resume]
    assert resumed.state.global_step == STEPS
    for a, b in zip(uninterrupted, resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizers_tuple_is_one_group_whose_checkpoint_fits_only_one_group(tmp_path):
    def trainer(output_dir, **overrides) -> Trainer:
        model = tiny_gpt2()
        # --8<-- [start:optimizers]
        optimizer = RMSprop(model.parameters(), lr=3e-3)  # one group: weight decay for every parameter or none
        trainer = Trainer(
            model=model,
            args=training_args(output_dir, **overrides),
            train_dataset=random_tokens(),
            optimizers=(optimizer, None),  # None: the Trainer's scheduler (linear decay by default)
        )
        # --8<-- [end:optimizers]
        return trainer

    uninterrupted = trained_parameters(trainer(tmp_path / "straight"))
    first = trainer(tmp_path / "run", save_strategy="steps", save_steps=STEPS // 2)
    first.train()
    assert len(first.optimizer.param_groups) == 1
    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS // 2}"
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(uninterrupted, resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)

    # The Trainer's own two groups (optim="rmsprop", or optimizer_cls_and_kwargs) cannot take it.
    two_groups = Trainer(
        model=tiny_gpt2(), args=training_args(tmp_path / "two"), train_dataset=random_tokens(),
        optimizer_cls_and_kwargs=(RMSprop, {"lr": 3e-3}),
    )
    two_groups.create_optimizer()
    one_group_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        two_groups.optimizer.load_state_dict(one_group_state)
