"""Named settings that reproduce each framework's RMSProp with its own defaults.

``PRESETS[name]`` is a read-only mapping of :class:`rmsprop.RMSprop` keyword
arguments; ``PRESET_SOURCES[name]`` says what it reproduces.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["PRESETS", "PRESET_SOURCES", "preset_settings"]

_TF_STYLE = {"eps_in_sqrt": True, "lr_in_momentum": True}

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        name: MappingProxyType(settings)
        for name, settings in {
            "pytorch": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8},
            "hinton": {"lr": 1e-3, "alpha": 0.9, "eps": 1e-8, "eps_in_sqrt": True},
            "optax": {"lr": 1e-3, "alpha": 0.9, "eps": 1e-8, **_TF_STYLE},
            "keras": {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7, **_TF_STYLE, "decoupled_weight_decay": True},
            "tf1": {"lr": 1e-2, "alpha": 0.9, "eps": 1e-10, **_TF_STYLE, "initial_scale": 1.0},
            # TF1's root and starting value, torch's momentum (lr outside the buffer) and defaults.
            "sb3": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "eps_in_sqrt": True, "initial_scale": 1.0},
            "graves": {
                "lr": 1e-4,
                "alpha": 0.95,
                "eps": 1e-4,
                **_TF_STYLE,
                "centered": True,
                "momentum": 0.9,
            },
        }.items()
    }
)

PRESET_SOURCES: Mapping[str, str] = MappingProxyType(
    {
        "pytorch": "torch.optim.RMSprop",
        "hinton": "the rule as first taught (Hinton, 2012): theta -= lr * g / sqrt(E[g^2] + eps)",
        "optax": "optax.rmsprop",
        "keras": "keras.optimizers.RMSprop (Keras 3)",
        "tf1": "tf.compat.v1.train.RMSPropOptimizer and timm's RMSpropTF",
        "sb3": "stable-baselines3's RMSpropTFLike (sb2_compat), A2C's optimizer for parity with Stable Baselines 2",
        "graves": "Graves (2013), Generating Sequences With Recurrent Neural Networks, eq. 38-41",
    }
)


def preset_settings(name: str, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of preset ``name``, with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}
