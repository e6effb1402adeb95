r"""The :class:`RMSprop` optimizer: a drop-in ``torch.optim.RMSprop`` with every variant."""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    ParamsT,
    _get_scalar_dtype,
)

from rmsprop.backends.cpu import kernel as cpu_kernel
from rmsprop.backends.fused import fused_rmsprop, fused_rmsprop_encoded, missing_backend, unsupported_dtype_or_layout
from rmsprop.backends.per_tensor import step_encoded
from rmsprop.backends.plan import GroupPlan, fused_wanted, plan_full_precision, plan_low_precision, uses_foreach
from rmsprop.core.functional import rmsprop
from rmsprop.core.hyperparameters import Hyperparameters
from rmsprop.core.presets import preset_settings
from rmsprop.core.validation import check_settings
from rmsprop.formats import checkpoint
from rmsprop.formats.codecs import convert_state
from rmsprop.formats.layout import holds_group_layout, is_in_format, mean_weight, target_format

__all__ = ["RMSprop"]

_log = logging.getLogger("rmsprop")

# State entries that have the parameter's shape.
_BUFFERS = ("square_avg", "momentum_buffer", "grad_avg")


def _graph_break() -> None:
    """``torch._dynamo.graph_break()`` where torch._dynamo is imported: otherwise nothing is being compiled."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.graph_break()


def _use_grad_for_differentiable(step: Callable[..., Any]) -> Callable[..., Any]:
    """torch.optim's decorator of ``step``: gradients enabled only with ``differentiable``, and graph
    breaks around the step under torch.compile (so that it compiles as torch's optimizers do),
    without importing torch._dynamo where nothing has: that import is seconds of a fresh process's
    first step."""

    @functools.wraps(step)
    def wrapper(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            _graph_break()
            return step(self, *args, **kwargs)
        finally:
            _graph_break()
            torch.set_grad_enabled(previous)

    return wrapper


def _add_param_group(optimizer: Optimizer, param_group: dict[str, Any]) -> None:
    """``Optimizer.add_param_group``, without importing torch._dynamo where nothing has.

    torch wraps it to keep torch.compile from tracing it, and the wrapper imports
    torch._dynamo at its first call: seconds of a fresh process's first
    optimizer. Without torch._dynamo imported nothing is being compiled, so the
    wrapped function itself does the same.
    """
    unwrapped = getattr(Optimizer.add_param_group, "__wrapped__", None)
    if unwrapped is None or "torch._dynamo" in sys.modules:
        Optimizer.add_param_group(optimizer, param_group)
    else:
        unwrapped(optimizer, param_group)



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
        state_precision (str): how ``square_avg``, ``momentum_buffer`` and
            ``grad_avg`` are stored: ``"full"`` (the parameter's dtype, as
            torch), ``"bf16"`` (bfloat16, stochastically rounded) or
            ``"8bit"`` (blockwise dynamic quantization); see
            :mod:`rmsprop.formats`. A change of a group's value
            converts its state at the next step (default: "full").
        min_8bit_size (int): with ``"8bit"``, tensors with fewer elements
            keep fp32 state (default: 4096, as bitsandbytes).
        fused (bool, optional): the one-pass kernel of :mod:`rmsprop.backends.fused`
            (the CPU kernel built at install, :mod:`rmsprop.backends.cpu.kernel`;
            Triton on CUDA), several times faster than the other paths on
            CPU, equal to them within rounding of the compute type. ``None``
            takes it where it supports the tensors (dense contiguous CPU or
            CUDA tensors of float or complex dtype, where the CPU kernel is
            built or triton installed) and ``foreach`` is ``None``; ``True``
            requires it (default: None). bf16 and 8-bit state take the same
            kernel from a parameter's second step on. Under
            ``torch.compile`` the step is traced through the torch ops
            instead, which the compiler fuses itself.

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
        state_precision: str = "full",
        min_8bit_size: int = 4096,
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
            "state_precision": state_precision,
            "min_8bit_size": min_8bit_size,
            "fused": fused,
        }
        check_settings(defaults)
        super().__init__(params, defaults)
        self._note_state_precisions()

    @classmethod
    def from_preset(cls, name: str, params: ParamsT, **overrides: Any) -> RMSprop:
        """An optimizer with the settings of preset ``name`` (see :data:`rmsprop.PRESETS`)."""
        return cls(params, **preset_settings(name, **overrides))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_settings({**self.defaults, **param_group})
        _add_param_group(self, param_group)
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
        and leaves the optimizer exactly as it was. ``state_precision`` and
        ``min_8bit_size`` stay this optimizer's: the loaded state is converted
        to them (e.g. a full-precision state dict is quantized by an 8-bit
        optimizer, and full-precision state is cast to the parameter's dtype
        as torch does), exactly where it already fits.

        Hooks run as ``torch.optim.Optimizer`` runs them: the pre-hooks on a
        shallow copy of ``state_dict`` before anything is checked (one may
        return a new state dict), the post-hooks once the state is loaded,
        checked and converted, free to change anything.
        """
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        _check_state_dict_layout(state_dict)
        previous_state, previous_groups = self.state, self.param_groups
        storage = [{key: group[key] for key in _STORAGE_SETTINGS} for group in previous_groups]
        # Optimizer.load_state_dict casts floating-point state to the parameter's dtype,
        # which would turn 8-bit codes into floats; they are put back as saved.
        exact = checkpoint.exact_entries(state_dict)
        try:
            with _hooks_suspended(self):
                super().load_state_dict(state_dict)
            saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
            checkpoint.restore_entries(exact, saved_ids, self._all_params(), self.state)
            for group, settings in zip(self.param_groups, storage, strict=True):
                group.update(settings)
            self._check_loaded_state()
        except Exception:
            self.state, self.param_groups = previous_state, previous_groups
            raise
        for group_index in range(len(self.param_groups)):
            self._convert_state(group_index)
        self._note_state_precisions()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _all_params(self) -> Iterator[Tensor]:
        return itertools.chain.from_iterable(group["params"] for group in self.param_groups)

    def _first_param_index(self, group_index: int) -> int:
        """The position of a group's first param among all params: what seeds its state's rounding noise."""
        return sum(len(g["params"]) for g in self.param_groups[:group_index])

    def _convert_state(self, group_index: int, *, skip_params_with_grads: bool = False) -> None:
        """Store the state of a group's params in its ``state_precision``, if it is in another."""
        group = self.param_groups[group_index]
        for index, p in enumerate(group["params"], start=self._first_param_index(group_index)):
            if self.state.get(p) and not (skip_params_with_grads and p.grad is not None):
                fmt = target_format(p, group["state_precision"], group["min_8bit_size"])
                weight = mean_weight(group, self.state[p])
                convert_state(self.state[p], p, fmt, index, weight)

    def _check_loaded_state(self) -> None:
        for key in self.state:
            if not torch.is_tensor(key):
                raise ValueError(
                    f"the state dict has state for parameter id {key!r}, which none of its param_groups lists"
                )
        for group_index, group in enumerate(self.param_groups):
            check_settings(group)
            # Buffers the loaded settings need; a torch or rmsprop state dict
            # always holds them once a parameter has stepped.
            needed = ("momentum_buffer",) * (group["momentum"] > 0) + ("grad_avg",) * group["centered"]
            for param_index, p in enumerate(group["params"]):
                p_state = self.state.get(p)
                if not p_state:
                    continue
                missing = [key for key in needed if key not in p_state]
                # The dtype is not checked: conversion to the group's precision follows.
                problem = f"{missing[0]!r} is missing" if missing else _state_mismatch(p, p_state, ("shape",))
                where = f"state of {_describe(group, group_index, param_index)}"
                if problem:
                    raise ValueError(f"{where}: {problem}")
                checkpoint.check_encoded_entries(p_state, p, where)

    def _check_state_fits_params(self, group_indices: Iterable[int]) -> None:
        """Raise ``ValueError`` where a param of these full-precision groups no longer fits its
        state, e.g. after ``model.half()``.

        Each step compares only ``square_avg`` (and that ``step`` is a tensor), to
        stay cheap: the other buffers are created and loaded along with it, so a
        param changed since then has left them all behind.
        """
        for group_index in group_indices:
            group = self.param_groups[group_index]
            for param_index, p in enumerate(group["params"]):
                p_state = self.state.get(p) if p.grad is not None else None
                if not p_state or (_fits(p, p_state.get("square_avg")) and isinstance(p_state.get("step"), Tensor)):
                    continue
                problem = _state_mismatch(p, p_state)
                if problem:
                    raise ValueError(
                        f"state of {_describe(group, group_index, param_index)}: {problem}; "
                        "was the model changed (.half(), .to(), new shape) after the optimizer "
                        "was created? Create the optimizer after, or load a state dict to convert its state"
                    )

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        square_avgs: list[Tensor],
        grad_avgs: list[Tensor],
        momentum_buffers: list[Tensor],
        steps: list[Tensor],
    ) -> bool:
        """Fill the lists with the params that have grads and their state, creating state on first use.

        Returns whether any of them is complex. The signature is torch.optim's:
        torch.compile runs ``_init_group`` eagerly, reads back the lists it was
        given and treats the return value as a constant.
        """
        has_complex = False
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

            has_complex |= torch.is_complex(p)
            _append_step_tensors(group, p, state, (params, grads, square_avgs, grad_avgs, momentum_buffers, steps))
        return has_complex

    def _gathered_fused_groups(self) -> dict[int, Any]:
        """Kernel plans of the CPU groups whose tensors the CPU kernel gathered and checked itself.

        The kernel reads each param's gradient and state and checks them all
        itself; it declines a group with a missing, sparse, non-CPU or
        mismatched tensor, no state yet, or low-precision state to create or
        convert, which the Python planning below then takes, with its errors,
        state creation and conversion. It decides as
        :func:`rmsprop.backends.plan.plan_full_precision` and
        :func:`rmsprop.backends.plan.plan_low_precision` would when they choose
        the CPU kernel for every param with a gradient, only faster.
        """
        plans: dict[int, Any] = {}
        if torch.compiler.is_compiling() or not isinstance(self.state, dict):
            return plans
        first_index = 0
        for group_index, group in enumerate(self.param_groups):
            first = first_index
            first_index += len(group["params"])
            if group["differentiable"] or group["capturable"]:
                continue
            # A CUDA group goes to the Triton kernel: no gathering to refuse.
            if fused_wanted(group) is not None or not (group["params"] and group["params"][0].is_cpu):
                continue
            if cpu_kernel.kernel() is None:
                break
            plan = cpu_kernel.gather_group(self, group_index, first)
            if not isinstance(plan, str):
                plans[group_index] = plan
        return plans

    def _check_no_sparse_grads(self, skip: Iterable[int] = ()) -> None:
        skip = set(skip)
        for group_index, group in enumerate(self.param_groups):
            if group_index in skip:
                continue
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

        Every group is checked and planned (:meth:`plan`) before any is
        stepped, so a refused step changes nothing.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        runs = self._check_and_plan()
        for run in runs:
            run()
        self._note_state_precisions()
        return loss

    def plan(self) -> list[GroupPlan]:
        """How the next :meth:`step` would run each param group, as it stands now, without changing anything.

        Each :class:`~rmsprop.backends.plan.GroupPlan` names the backends that
        step the group's params with gradients (``"cpu-kernel"``,
        ``"triton"``, ``"foreach"``, ``"for-loop"``, ``"per-tensor"``) and why
        each other one does not. ``print(*optimizer.plan(), sep="\\n")`` shows
        them; the ``rmsprop`` logger logs a group's plan at DEBUG level when it
        changes. Errors the step would raise (a sparse gradient, state that no
        longer fits) are not raised here.
        """
        plans = []
        for group_index, group in enumerate(self.param_groups):
            if group["state_precision"] != "full":
                plans.append(self._plan_low_precision(group_index))
                continue
            positions, tensors = self._group_tensors(group, create_state=False)
            plans.append(plan_full_precision(group_index, group, positions, tensors))
        return plans

    def _check_and_plan(self) -> list[Callable[[], None]]:
        """Check every group and plan its step; returns the calls that run the step."""
        gathered = self._gathered_fused_groups()
        compiling = torch.compiler.is_compiling()
        # torch.compile skips the checks: tracing these loops would slow compilation,
        # and its guards already recompile when a param's shape or dtype changes.
        if not compiling:
            self._check_no_sparse_grads(skip=gathered.keys())
        # Unknown after unpickling, hence True by default.
        if getattr(self, "_low_precision_used", True):
            for group_index, group in enumerate(self.param_groups):
                # A gathered group's params with gradients hold full state already.
                if group["state_precision"] == "full" and not self._gathered_all(gathered, group_index):
                    self._convert_state(group_index)
        runs: list[Callable[[], None]] = []
        plans: list[GroupPlan] = []
        unfused: list[int] = []
        for group_index, group in enumerate(self.param_groups):
            hp = Hyperparameters.from_group(group)
            if group_index in gathered:
                low_precision = group["state_precision"] != "full"
                if low_precision and not self._gathered_all(gathered, group_index):
                    runs.append(functools.partial(self._convert_state, group_index, skip_params_with_grads=True))
                runs.append(functools.partial(cpu_kernel.run, gathered[group_index], hp))
                if _log.isEnabledFor(logging.DEBUG):
                    positions = tuple(i for i, p in enumerate(group["params"]) if p.grad is not None)
                    declined = {} if low_precision else {"foreach": "cpu-kernel comes first"}
                    plans.append(GroupPlan(group_index, {"cpu-kernel": positions}, declined))
                continue
            if group["state_precision"] != "full":
                plan = self._plan_low_precision(group_index)
                runs.append(functools.partial(self._step_low_precision, group_index, plan))
                plans.append(plan)
                continue
            positions, tensors = self._group_tensors(group, create_state=True)
            plan = plan_full_precision(group_index, group, positions, tensors)
            plans.append(plan)
            if plan.backend in ("cpu-kernel", "triton"):
                runs.append(functools.partial(fused_rmsprop, *tensors, hp))
                continue
            unfused.append(group_index)
            runs.append(
                functools.partial(
                    rmsprop,
                    *tensors,
                    hp,
                    foreach=plan.backend == "foreach",
                    differentiable=group["differentiable"],
                    capturable=group["capturable"],
                )
            )
        if not compiling:
            # The fused kernels have checked their tensors already: they run only where they fit.
            self._check_state_fits_params(unfused)
        self._log_plans(plans)
        return runs

    def _gathered_all(self, gathered: dict[int, Any], group_index: int) -> bool:
        """Whether the kernel gathered every param of the group (all had gradients)."""
        return group_index in gathered and len(gathered[group_index]) == len(self.param_groups[group_index]["params"])

    def _log_plans(self, plans: list[GroupPlan]) -> None:
        """Log each group's plan at DEBUG level when it differs from the one logged last."""
        if not _log.isEnabledFor(logging.DEBUG):
            return
        logged = self.__dict__.setdefault("_logged_plans", {})
        for plan in plans:
            if logged.get(plan.group) != plan:
                logged[plan.group] = plan
                _log.debug("%s", plan)

    def _group_tensors(self, group: dict[str, Any], *, create_state: bool) -> tuple[tuple[int, ...], tuple[list[Tensor], ...]]:
        """The positions of a full-precision group's params with grads, and the tensor lists of their step.

        With ``create_state`` the state a step needs is created (:meth:`_init_group`);
        without, the param itself stands in for a missing buffer and a new
        tensor for a missing step, as what the step would create fits as they do.
        """
        tensors: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
        if create_state:
            self._init_group(group, *tensors)
        else:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p) or {}
                stand_ins = {"step": torch.zeros((), dtype=_get_scalar_dtype())}
                stand_ins |= dict.fromkeys(("square_avg", "momentum_buffer", "grad_avg"), p)
                _append_step_tensors(group, p, stand_ins | state if is_in_format(state, p, "full") else stand_ins, tensors)
        positions = tuple(i for i, p in enumerate(group["params"]) if p.grad is not None)
        return positions, tensors

    def _note_state_precisions(self) -> None:
        # Remembered so that all-"full" optimizers skip the per-parameter format checks.
        self._low_precision_used = any(g["state_precision"] != "full" for g in self.param_groups)

    def _plan_low_precision(self, group_index: int) -> GroupPlan:
        """The plan of a low-precision group: the fused kernel for each param whose state is stored as the
        group asks, the per-tensor path for the others (state to create or convert: first step, a changed
        precision or setting, which decodes any stored form and encodes the group's with one rounding)."""
        group = self.param_groups[group_index]
        candidates = []
        for position, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            fmt = target_format(p, group["state_precision"], group["min_8bit_size"])
            state = self.state.get(p)
            candidates.append((position, p, state, fmt, holds_group_layout(state, p, group, fmt)))
        return plan_low_precision(
            group_index, group, candidates, lambda position: _describe(group, group_index, position)
        )

    def _step_low_precision(self, group_index: int, plan: GroupPlan) -> None:
        group = self.param_groups[group_index]
        hp = Hyperparameters.from_group(group)
        first = self._first_param_index(group_index)
        # The step itself decodes any stored form and encodes the group's: one rounding, not two.
        self._convert_state(group_index, skip_params_with_grads=True)
        params = group["params"]
        fused = [position for name, positions in plan.steps.items() if name != "per-tensor" for position in positions]
        fused_rmsprop_encoded(
            [params[i] for i in fused],
            [self.state[params[i]] for i in fused],
            [target_format(params[i], group["state_precision"], group["min_8bit_size"]) for i in fused],
            [first + i for i in fused],
            hp,
        )
        per_tensor = plan.steps.get("per-tensor", ())
        chosen = [params[i] for i in per_tensor]
        step_encoded(
            chosen,
            [self.state[p] for p in chosen],
            [first + i for i in per_tensor],
            group,
            foreach=uses_foreach(group, chosen),
            new_step=lambda p: torch.zeros((), dtype=_get_scalar_dtype()),
        )


# How a group stores its state: kept by load_state_dict.
_STORAGE_SETTINGS = ("state_precision", "min_8bit_size")


# What a state dict without our flags (torch's, or an older version's) falls back to.
_FACTORY_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(RMSprop.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


@contextmanager
def _hooks_suspended(optimizer: Optimizer) -> Iterator[None]:
    """``Optimizer.load_state_dict`` without its hooks: ours runs them around its own checks."""
    pre, post = optimizer._optimizer_load_state_dict_pre_hooks, optimizer._optimizer_load_state_dict_post_hooks
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_post_hooks = OrderedDict()
    try:
        yield
    finally:
        optimizer._optimizer_load_state_dict_pre_hooks = pre
        optimizer._optimizer_load_state_dict_post_hooks = post


def _check_fused_params(params: list[Tensor]) -> None:
    for i, param in enumerate(params):
        reason = unsupported_dtype_or_layout(param, f"parameter {i}") or missing_backend(param.device)
        if reason is not None:
            raise ValueError(f"Invalid fused: True ({reason}; fused=None falls back to the other paths)")


def _check_state_dict_layout(state_dict: Any) -> None:
    """The entries ``Optimizer.load_state_dict`` reads, so that it cannot fail with a bare KeyError."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"an optimizer state dict must be a dict, got {type(state_dict).__name__}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"the state dict has no {key!r} entry")
    for index, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"param group {index} of the state dict has no 'params' entry")


def _describe(group: dict[str, Any], group_index: int, param_index: int) -> str:
    names = group.get("param_names")
    name = f" ({names[param_index]!r})" if names else ""
    return f"parameter {param_index}{name} in group {group_index}"


def _fits(p: Tensor, buffer: Any) -> bool:
    return (
        isinstance(buffer, Tensor) and buffer.dtype is p.dtype and buffer.shape == p.shape and buffer.device == p.device
    )


def _state_mismatch(
    p: Tensor, p_state: dict[str, Any], attributes: tuple[str, ...] = ("shape", "dtype", "device")
) -> str | None:
    """What in ``p_state`` does not fit parameter ``p``, or None if it all fits."""
    step = p_state.get("step")
    if not (torch.is_tensor(step) and step.numel() == 1):
        return f"'step' must be a 1-element tensor, got {step!r}"
    if "square_avg" not in p_state and "grad_variance" not in p_state:
        return "'square_avg' is missing"
    for key in _BUFFERS:
        value = p_state.get(key)
        if value is None:
            continue
        if not torch.is_tensor(value):
            return f"{key!r} must be a tensor, got {type(value).__name__}"
        for attribute in attributes:
            if getattr(value, attribute) != getattr(p, attribute):
                return f"{key!r} has {attribute} {_show(value, attribute)}, the parameter has {_show(p, attribute)}"
    return None


def _show(t: Tensor, attribute: str) -> str:
    value = getattr(t, attribute)
    return str(tuple(value)) if attribute == "shape" else str(value)


def _filled_like(p: Tensor, value: float) -> Tensor:
    if value == 0:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    # Complex parameters are updated as (real, imag) pairs: both start at value.
    fill = complex(value, value) if p.is_complex() else value
    return torch.full_like(p, fill, memory_format=torch.preserve_format)


def _append_step_tensors(group: dict[str, Any], p: Tensor, state: Mapping[str, Tensor], tensors: tuple[list[Tensor], ...]) -> None:
    """Append ``p``, its gradient and the state its step reads to the step's lists
    (params, grads, square_avgs, grad_avgs, momentum_buffers, steps)."""
    params, grads, square_avgs, grad_avgs, momentum_buffers, steps = tensors
    params.append(p)
    grads.append(p.grad)
    square_avgs.append(state["square_avg"])
    steps.append(state["step"])
    if group["momentum"] > 0:
        momentum_buffers.append(state["momentum_buffer"])
    if group["centered"]:
        grad_avgs.append(state["grad_avg"])
