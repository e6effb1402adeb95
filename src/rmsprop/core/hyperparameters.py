"""The settings of one parameter group that the update rule reads: the data every backend shares."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["Hyperparameters", "KernelScalars"]


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


class KernelScalars(NamedTuple):
    """The rule's numbers as the fused kernels take them, in this order (``Scalars`` in
    backends/cpu/csrc/kernel.h; the first entries of the Triton kernel's table).

    Options that only change numbers are folded into them, which keeps one
    kernel for them all without changing any result: the sign of the
    gradient (maximize), ``1 - lr*wd`` (1 without decoupled weight decay) and
    the eps added inside or outside the square root (0 for the other place).
    """

    lr: float
    alpha: float
    rate: float
    eps_inside: float
    eps_outside: float
    weight_decay: float
    decay_factor: float
    momentum: float
    sign: float
    nesterov: bool
    lr_in_momentum: bool

    @classmethod
    def of(cls, hp: Hyperparameters, lr: float) -> KernelScalars:
        """The numbers of ``hp`` with learning rate ``lr`` (a number: a Tensor lr read once)."""
        decoupled = hp.decoupled_weight_decay and hp.weight_decay != 0
        return cls(
            lr=lr,
            alpha=hp.alpha,
            rate=1 - hp.alpha,
            eps_inside=hp.eps if hp.eps_in_sqrt else 0.0,
            eps_outside=0.0 if hp.eps_in_sqrt else hp.eps,
            weight_decay=hp.weight_decay,
            decay_factor=1 - lr * hp.weight_decay if decoupled else 1.0,
            momentum=hp.momentum,
            sign=-1.0 if hp.maximize else 1.0,
            nesterov=hp.nesterov,
            lr_in_momentum=hp.lr_in_momentum,
        )
