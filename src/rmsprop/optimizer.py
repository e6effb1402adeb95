r"""The :class:`RMSprop` optimizer: a drop-in ``torch.optim.RMSprop`` with every variant."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    ParamsT,
    _default_to_fused_or_foreach,
    _get_scalar_dtype,
    _use_grad_for_differentiable,
)

from rmsprop.functional import Hyperparameters, rmsprop
from rmsprop.fused import numba_available, unsupported_dtype_or_layout, unsupported_reason
from rmsprop.presets import preset_settings
from rmsprop.validation import check_settings

__all__ = ["RMSprop"]

# State entries that have the parameter's shape.
_BUFFERS = ("square_avg", "momentum_buffer", "grad_avg")


class RMSprop(Optimizer):
    r"""Implements RMSProp, with the conventions of every framework as flags.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \alpha \text{ (alpha)}, \epsilon \text{ (eps)},
                \lambda \text{ (weight decay)}, \mu \text{ (momentum)}, v_0 \text{ (initial\_scale)} \\
            &\textbf{initialize}: v \leftarrow v_0, \; m \leftarrow 0, \; b \leftarrow 0 \\
            &\textbf{for}\: t = 1, 2, \ldots: \\
            &\quad g \leftarrow \nabla_\theta f_t(\theta); \quad
                \textbf{if}\: maximize: g \leftarrow -g \\
            &\quad \textbf{if}\: decoupled\_weight\_decay: \theta \leftarrow \theta (1 - \gamma\lambda)
                \;\textbf{else}\; g \leftarrow g + \lambda\theta \\
            &\quad v \leftarrow \alpha v + (1-\alpha) g^2 \\
            &\quad \textbf{if}\: centered: m \leftarrow \alpha m + (1-\alpha) g \\
            &\quad c \leftarrow 1 - \alpha^t \;\textbf{if}\: bias\_correction \;\textbf{else}\; 1 \\
            &\quad s \leftarrow \max(v/c - (m/c)^2, 0) \;\textbf{if}\: centered \;\textbf{else}\; v/c \\
            &\quad d \leftarrow \sqrt{s + \epsilon} \;\textbf{if}\: eps\_in\_sqrt
                \;\textbf{else}\; \sqrt{s} + \epsilon; \quad u \leftarrow g / d \\
            &\quad \textbf{if}\: \mu = 0: \theta \leftarrow \theta - \gamma u \\
            &\quad \textbf{elif}\: lr\_in\_momentum: b \leftarrow \mu b + \gamma u; \;
                \theta \leftarrow \theta - (\mu b + \gamma u \;\textbf{if}\: nesterov \;\textbf{else}\; b) \\
            &\quad \textbf{else}: b \leftarrow \mu b + u; \;
                \theta \leftarrow \theta - \gamma (u + \mu b \;\textbf{if}\: nesterov \;\textbf{else}\; b)
       \end{aligned}

    With the default flags this is exactly ``torch.optim.RMSprop`` (Hinton's
    lecture notes; the centered form is Graves, 2013, arXiv:1308.0850), and
    the state is stored under torch's keys (``step``, ``square_avg``,
    ``momentum_buffer``, ``grad_avg``; the moments uncorrected), so state dicts
    move between the two in both directions.

    Args:
        params: iterable of parameters or named parameters, or dicts defining
            parameter groups.
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-2).
        alpha (float): smoothing constant :math:`\alpha`, in [0, 1] (default: 0.99).
        eps (float): term added to the denominator (default: 1e-8).
        weight_decay (float): weight decay :math:`\lambda` (default: 0).
        momentum (float): momentum factor :math:`\mu` (default: 0).
        centered (bool): divide by an estimate of the gradient's variance,
            :math:`v - m^2`, instead of its second moment (default: False).
        capturable (bool): keep ``step`` on the parameter's device so the step
            can be captured in a CUDA graph (default: False).
        foreach (bool, optional): use the multi-tensor path; ``None`` picks it
            where torch would (CUDA tensors, not differentiable).
        maximize (bool): maximize the objective instead of minimizing it.
        differentiable (bool): let autograd differentiate through the step.
        eps_in_sqrt (bool): :math:`\sqrt{s + \epsilon}` as TensorFlow, Keras
            and optax do, instead of :math:`\sqrt{s} + \epsilon` (default: False).
        initial_scale (float): initial value :math:`v_0` of ``square_avg``;
            TF1 and timm's RMSpropTF start at 1 (default: 0).
        bias_correction (bool): divide the moments by :math:`1 - \alpha^t`, as
            Adam does (default: False).
        nesterov (bool): Nesterov momentum; needs momentum > 0 (default: False).
        decoupled_weight_decay (bool): shrink the weights by
            :math:`1 - \gamma\lambda` instead of adding :math:`\lambda\theta`
            to the gradient, as Keras and AdamW do (default: False).
        lr_in_momentum (bool): accumulate :math:`\gamma u` in the momentum
            buffer, as TensorFlow, Keras and optax do, so a change of lr does
            not rescale past steps (default: False).
        fused (bool, optional): the one-pass CPU kernel of
            :mod:`rmsprop.fused` (numba), several times faster than the other
            paths, equal to them within rounding of the compute type. ``None``
            takes it where it supports the tensors (dense contiguous CPU
            tensors of float or complex dtype) and ``foreach`` is ``None``;
            ``True`` requires it (default: None).

    Non-finite gradients are not filtered: like ``torch.optim``, NaN and inf
    propagate into the parameters. ``torch.amp.GradScaler`` is the tool that
    skips such steps. Sparse gradients raise ``RuntimeError``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        eps_in_sqrt: bool = False,
        initial_scale: float = 0.0,
        bias_correction: bool = False,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        lr_in_momentum: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "eps_in_sqrt": eps_in_sqrt,
            "initial_scale": initial_scale,
            "bias_correction": bias_correction,
            "nesterov": nesterov,
            "decoupled_weight_decay": decoupled_weight_decay,
            "lr_in_momentum": lr_in_momentum,
            "fused": fused,
        }
        check_settings(defaults)
        super().__init__(params, defaults)

    @classmethod
    def from_preset(cls, name: str, params: ParamsT, **overrides: Any) -> RMSprop:
        """An optimizer with the settings of preset ``name`` (see :data:`rmsprop.PRESETS`)."""
        return cls(params, **preset_settings(name, **overrides))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_settings({**self.defaults, **param_group})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["fused"]:
            try:
                _check_fused_params(group["params"])
            except ValueError:
                self.param_groups.pop()
                raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A state dict from torch.optim.RMSprop or an older version lacks our flags.
        for group in self.param_groups:
            for name, value in _FACTORY_DEFAULTS.items():
                group.setdefault(name, self.defaults.get(name, value))
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    device = p.device if group["capturable"] else None
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_get_scalar_dtype(), device=device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.RMSprop``.

        A state dict that does not fit these parameters raises ``ValueError``
        and leaves the optimizer exactly as it was.
        """
        previous_state, previous_groups = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            self._check_loaded_state()
        except Exception:
            self.state, self.param_groups = previous_state, previous_groups
            raise

    def _check_loaded_state(self) -> None:
        for group_index, group in enumerate(self.param_groups):
            check_settings(group)
            for param_index, p in enumerate(group["params"]):
                p_state = self.state.get(p)
                if not p_state:
                    continue
                where = f"state of parameter {param_index} in group {group_index}"
                step = p_state.get("step")
                if not (torch.is_tensor(step) and step.numel() == 1):
                    raise ValueError(f"{where}: 'step' must be a 1-element tensor, got {step!r}")
                if "square_avg" not in p_state:
                    raise ValueError(f"{where}: 'square_avg' is missing")
                for key in _BUFFERS:
                    if key not in p_state:
                        continue
                    value = p_state[key]
                    if not torch.is_tensor(value):
                        raise ValueError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")
                    if value.shape != p.shape:
                        raise ValueError(
                            f"{where}: {key!r} has shape {tuple(value.shape)}, the parameter has {tuple(p.shape)}"
                        )

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        """Lists of the params with grads and their state, creating state on first use."""
        params, grads, square_avgs, grad_avgs, momentum_buffers, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                step_device = p.device if group["capturable"] else None
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=step_device)
                state["square_avg"] = _filled_like(p, group["initial_scale"])
            # Created here, not only at the first step, so that momentum or
            # centered can be switched on mid-run.
            if group["momentum"] > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["centered"] and "grad_avg" not in state:
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

            params.append(p)
            grads.append(p.grad)
            square_avgs.append(state["square_avg"])
            steps.append(state["step"])
            if group["momentum"] > 0:
                momentum_buffers.append(state["momentum_buffer"])
            if group["centered"]:
                grad_avgs.append(state["grad_avg"])
        return params, grads, square_avgs, grad_avgs, momentum_buffers, steps

    def _check_no_sparse_grads(self) -> None:
        for group_index, group in enumerate(self.param_groups):
            for param_index, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        "RMSprop does not support sparse gradients "
                        f"(parameter {param_index} in group {group_index}); "
                        "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
                    )

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Checked for every group first, so that a refused step changes nothing.
        self._check_no_sparse_grads()
        for group in self.param_groups:
            tensors = self._init_group(group)
            fused = _use_fused(group, tensors)
            rmsprop(
                *tensors,
                Hyperparameters.from_group(group),
                foreach=not fused and _use_foreach(group, tensors[0]),
                fused=fused,
                differentiable=group["differentiable"],
                capturable=group["capturable"],
            )
        return loss


# What a state dict without our flags (torch's, or an older version's) falls back to.
_FACTORY_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(RMSprop.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


def _check_fused_params(params: list[Tensor]) -> None:
    if not numba_available():
        raise ValueError("Invalid fused: True (fused=True needs numba; pip install numba, or use fused=None)")
    for i, param in enumerate(params):
        reason = unsupported_dtype_or_layout(param, f"parameter {i}")
        if reason is not None:
            raise ValueError(f"Invalid fused: True ({reason}; fused=None falls back to the other paths)")


def _use_fused(group: dict[str, Any], tensors: tuple[list[Tensor], ...]) -> bool:
    """``fused=None`` means: the fused kernel where it supports the tensors, unless foreach is set."""
    if group["fused"] is False or (group["fused"] is None and group["foreach"] is not None) or not tensors[0]:
        return False
    reason = unsupported_reason(*tensors, differentiable=group["differentiable"], capturable=group["capturable"])
    if reason is not None and group["fused"]:
        raise RuntimeError(f"fused=True cannot take this step: {reason}; fused=None falls back to the other paths")
    return reason is None


def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
    """``foreach=None`` means: the multi-tensor path where torch.optim would take it."""
    if group["foreach"] is not None:
        return group["foreach"]
    if group["differentiable"] or not params:
        return False
    _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return foreach


def _filled_like(p: Tensor, value: float) -> Tensor:
    if value == 0:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    # Complex parameters are updated as (real, imag) pairs: both start at value.
    fill = complex(value, value) if p.is_complex() else value
    return torch.full_like(p, fill, memory_format=torch.preserve_format)
