"""stable-baselines3's A2C with ``rmsprop.RMSprop``: the ``sb3`` preset is ``RMSpropTFLike``, and
A2C's default optimizer is torch's RMSprop with alpha 0.99, eps 1e-5.

CartPole (gymnasium ships it), a few hundred timesteps.
"""

import pytest

pytest.importorskip("stable_baselines3")

import torch
from stable_baselines3 import A2C
from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

from rmsprop import PRESETS, RMSprop

pytestmark = pytest.mark.recipes

TIMESTEPS = 300


def trained_policy(policy_kwargs: dict | None = None) -> list[torch.Tensor]:
    model = A2C("MlpPolicy", "CartPole-v1", n_steps=5, seed=0, device="cpu", policy_kwargs=policy_kwargs)
    model.learn(TIMESTEPS)
    return [p.detach().clone() for p in model.policy.parameters()]


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "settings",
    [{}, {"momentum": 0.9}, {"centered": True}, {"weight_decay": 0.1, "alpha": 0.9, "eps": 1e-5}],
    ids=["defaults", "momentum", "centered", "weight-decay"],
)
def test_sb3_preset_steps_as_rmsprop_tf_like(settings):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    our_optimizer = RMSprop.from_preset("sb3", ours, fused=False, **settings)
    their_optimizer = RMSpropTFLike(theirs, **settings)
    for _ in range(50):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        our_optimizer.step()
        their_optimizer.step()
    if settings.get("centered"):
        # torch's RMSprop and ours move the gradient average with lerp, RMSpropTFLike with mul and add.
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    else:
        assert_same(ours, theirs)


def test_a2c_with_the_sb3_preset_trains_as_with_rmsprop_tf_like():
    theirs = trained_policy({"optimizer_class": RMSpropTFLike, "optimizer_kwargs": {"alpha": 0.99, "eps": 1e-5}})
    # --8<-- [start:tf-like]
    policy_kwargs = {
        "optimizer_class": RMSprop,
        # A2C passes the learning rate itself; eps 1e-5 as in A2C's default optimizer.
        "optimizer_kwargs": {"alpha": 0.99, "eps": 1e-5, "eps_in_sqrt": True, "initial_scale": 1.0, "fused": False},
    }
    model = A2C("MlpPolicy", "CartPole-v1", n_steps=5, seed=0, device="cpu", policy_kwargs=policy_kwargs)
    # --8<-- [end:tf-like]
    ours = trained_policy(policy_kwargs)
    assert {k: v for k, v in PRESETS["sb3"].items() if k not in ("lr", "eps")} == {
        k: v for k, v in policy_kwargs["optimizer_kwargs"].items() if k not in ("eps", "fused")
    }
    assert isinstance(model.policy.optimizer, RMSprop)
    assert_same(ours, theirs)


def test_a2c_default_optimizer_is_rmsprop_with_a2cs_settings():
    theirs = trained_policy()
    # --8<-- [start:default]
    # Once optimizer_class is set, A2C no longer passes its alpha=0.99, eps=1e-5: pass them.
    policy_kwargs = {"optimizer_class": RMSprop, "optimizer_kwargs": {"alpha": 0.99, "eps": 1e-5, "fused": False}}
    # --8<-- [end:default]
    assert_same(trained_policy(policy_kwargs), theirs)


def test_a2c_passes_no_settings_to_a_given_optimizer_class():
    model = A2C("MlpPolicy", "CartPole-v1", device="cpu", policy_kwargs={"optimizer_class": RMSprop})
    assert model.policy.optimizer.defaults["eps"] == 1e-8
    default = A2C("MlpPolicy", "CartPole-v1", device="cpu")
    assert default.policy.optimizer.defaults["eps"] == 1e-5
