"""RMSProp for PyTorch: a drop-in ``torch.optim.RMSprop`` with every framework's variant.

>>> from rmsprop import RMSprop
>>> optimizer = RMSprop(model.parameters(), lr=0.01, alpha=0.9)            # doctest: +SKIP
>>> optimizer = RMSprop.from_preset("keras", model.parameters())           # doctest: +SKIP
"""

from rmsprop.core import reference
from rmsprop.core.optimizer import RMSprop
from rmsprop.core.presets import PRESET_SOURCES, PRESETS

__version__ = "0.1.0"

__all__ = ["PRESETS", "PRESET_SOURCES", "RMSprop", "__version__", "reference"]
