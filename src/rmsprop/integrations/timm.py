"""``rmsprop.RMSprop`` and its presets in timm's optimizer factory.

>>> import timm.optim
>>> from rmsprop.integrations.timm import register_timm_optimizers
>>> register_timm_optimizers()                                       # doctest: +SKIP
['rmsprop-graves', 'rmsprop-hinton', 'rmsprop-keras', ...]
>>> timm.optim.create_optimizer_v2(model, "rmsprop-tf1", lr=0.016, weight_decay=1e-5)  # doctest: +SKIP

Each preset ``name`` of :data:`rmsprop.PRESETS` becomes ``"<prefix>-<name>"``
(``rmsprop-keras``, ...), registered with the preset's settings as defaults.
timm's own names are left alone: its ``rmsprop`` stays ``torch.optim.RMSprop``.
timm lower-cases names and reads what comes before a ``_`` as a wrapper
(``lookahead_rmsprop-keras`` is Lookahead around ``rmsprop-keras``), so the
names hold neither ``_`` nor capitals.

As for every timm optimizer that takes momentum, timm passes ``momentum=0.9``
unless told otherwise; ``momentum=0`` gives the preset's own settings.

timm imports torchvision, which must be the build made for the installed torch.
"""

from __future__ import annotations

import re
from typing import Any

from timm.optim import OptimInfo, OptimizerRegistry
from timm.optim._optim_factory import default_registry

from rmsprop.core.optimizer import RMSprop
from rmsprop.core.presets import PRESET_SOURCES, PRESETS

__all__ = ["register_timm_optimizers", "timm_name"]

_TIMM_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


def timm_name(preset: str, prefix: str = "rmsprop") -> str:
    """The registry name of ``preset``: ``"<prefix>-<preset>"``, checked against timm's rules."""
    name = f"{prefix}-{preset}"
    if not _TIMM_NAME.fullmatch(name):
        raise ValueError(
            f"Invalid timm optimizer name {name!r} (prefix {prefix!r}): timm's names are lower-case "
            "letters, digits and '-' ('_' splits off a wrapper such as lookahead_)"
        )
    return name


def _info(preset: str, prefix: str) -> OptimInfo:
    # Momentum is timm's to pass (0.9 unless the caller says otherwise): a momentum among the
    # defaults would override the caller's.
    defaults: dict[str, Any] = {key: value for key, value in PRESETS[preset].items() if key != "momentum"}
    return OptimInfo(
        name=timm_name(preset, prefix),
        opt_class=RMSprop,
        description=f"rmsprop.RMSprop, preset {preset!r}: {PRESET_SOURCES[preset]}",
        has_eps=True,
        has_momentum=True,
        defaults=defaults,
    )


def register_timm_optimizers(registry: OptimizerRegistry | None = None, prefix: str = "rmsprop") -> list[str]:
    """Register every preset in ``registry`` (timm's ``default_registry``, which
    ``timm.optim.create_optimizer_v2`` uses, by default); returns the names registered.

    A name already there is replaced (timm logs a warning), so calling this twice is harmless.
    """
    infos = [_info(preset, prefix) for preset in PRESETS]
    target = default_registry if registry is None else registry
    for info in infos:
        target.register(info)
    return sorted(info.name for info in infos)
