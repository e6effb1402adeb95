"""timm's optimizer factory with ``rmsprop.RMSprop``: :mod:`rmsprop.integrations.timm` registers the presets.

timm imports torchvision, which loads only as the build made for the installed torch; where
timm cannot be imported the tests skip and say why.
"""

import pytest

try:
    import timm.optim
except Exception as error:  # torchvision built for another torch raises RuntimeError, not ImportError
    pytest.skip(
        f"timm.optim cannot be imported here ({type(error).__name__}: {error}); "
        "timm needs torchvision built for this torch (docs: recipes, timm)",
        allow_module_level=True,
    )

import torch
from torch import nn

from rmsprop import PRESETS, RMSprop
from rmsprop.integrations.timm import register_timm_optimizers, timm_name

pytestmark = pytest.mark.recipes


@pytest.fixture
def registry() -> timm.optim.OptimizerRegistry:
    """timm's own registry (builtins included) with ours added; registering again replaces."""
    from timm.optim._optim_factory import default_registry

    register_timm_optimizers(default_registry)
    return default_registry


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1))


def test_every_preset_is_registered_under_a_name_timm_can_parse(registry):
    names = registry.list_optimizers("rmsprop-*")
    assert names == sorted(f"rmsprop-{preset}" for preset in PRESETS)
    for name in names:
        assert "_" not in name and name == name.lower()
        assert registry.get_optimizer_info(name).opt_class is RMSprop


def test_create_optimizer_v2_builds_our_optimizer_with_the_presets_settings():
    # --8<-- [start:registry]
    from rmsprop.integrations.timm import register_timm_optimizers

    register_timm_optimizers()  # rmsprop-pytorch, rmsprop-keras, rmsprop-tf1, ...
    model = small_net()
    optimizer = timm.optim.create_optimizer_v2(model, "rmsprop-keras", weight_decay=0.05, momentum=0)
    # --8<-- [end:registry]
    assert isinstance(optimizer, RMSprop)
    # timm's two groups: weight decay on the weights, none on biases and norms.
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05]
    for group in optimizer.param_groups:
        assert {key: group[key] for key in PRESETS["keras"]} == dict(PRESETS["keras"])
        assert group["momentum"] == 0


def test_timm_passes_its_momentum_and_lr_as_for_its_own_rmsprop(registry):
    model = small_net()
    optimizer = registry.create_optimizer(model, "rmsprop-tf1", lr=0.016)
    assert optimizer.defaults["momentum"] == 0.9 == registry.create_optimizer(small_net(), "rmsproptf").defaults["momentum"]
    assert optimizer.defaults["lr"] == 0.016
    assert registry.create_optimizer(model, "rmsprop-graves", momentum=0.5).defaults["momentum"] == 0.5


def test_lookahead_wraps_our_optimizer(registry):
    optimizer = registry.create_optimizer(small_net(), "lookahead_rmsprop-hinton")
    assert isinstance(optimizer, timm.optim.Lookahead)
    assert isinstance(optimizer._base_optimizer, RMSprop)


def test_tf1_preset_from_timm_steps_as_timms_rmsproptf(registry):
    ours, theirs = small_net(), small_net()
    our_optimizer = registry.create_optimizer(ours, "rmsprop-tf1", lr=1e-2, weight_decay=1e-4, fused=False)
    their_optimizer = registry.create_optimizer(theirs, "rmsproptf", lr=1e-2, weight_decay=1e-4, eps=1e-10)
    inputs = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        for model, optimizer in ((ours, our_optimizer), (theirs, their_optimizer)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_registering_into_a_registry_of_ones_own():
    registry = timm.optim.OptimizerRegistry()
    assert register_timm_optimizers(registry, prefix="ours") == sorted(f"ours-{preset}" for preset in PRESETS)
    assert isinstance(registry.create_optimizer(small_net(), "ours-optax"), RMSprop)


@pytest.mark.parametrize("prefix", ["RMSprop", "rms_prop", "", "-x"])
def test_prefixes_timm_cannot_parse_are_rejected(prefix):
    with pytest.raises(ValueError, match="Invalid timm optimizer name"):
        timm_name("keras", prefix)
