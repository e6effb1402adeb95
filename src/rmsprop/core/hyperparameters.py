"""The settings of one parameter group that the update rule reads: the data every backend shares."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["Hyperparameters"]


class Hyperparameters(NamedTuple):
    """The settings of one parameter group that the rule reads."""

    lr: float | Tensor
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool
    eps_in_sqrt: bool
    bias_correction: bool
    nesterov: bool
    decoupled_weight_decay: bool
    lr_in_momentum: bool

    @classmethod
    def from_group(cls, group: dict) -> Hyperparameters:
        return cls(**{name: group[name] for name in cls._fields})
