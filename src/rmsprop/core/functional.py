r"""The RMSProp update rule on torch tensors.

One rule, two execution paths behind one entry point (:func:`rmsprop`), as in
``torch.optim``: a for-loop over tensors (the readable baseline) and a
multi-tensor path built from ``torch._foreach_*`` kernels. Both apply, per
parameter ``p`` with gradient ``g`` at step ``t``:

1. ``g = -g`` if ``maximize``
2. ``p = p * (1 - lr*wd)`` if ``decoupled_weight_decay``, else ``g = g + wd*p``
3. ``v = alpha*v + (1-alpha)*g^2``
4. ``m = alpha*m + (1-alpha)*g`` if ``centered``; with ``bias_correction``
   ``v_hat = v/(1-alpha^t)`` and ``m_hat = m/(1-alpha^t)``;
   ``s = max(v_hat - m_hat^2, 0)`` if centered else ``v_hat``
5. ``d = sqrt(s + eps)`` if ``eps_in_sqrt`` else ``sqrt(s) + eps``; ``u = g/d``
6. no momentum: ``p = p - lr*u``; with momentum ``mu`` and buffer ``b``:
   ``b = mu*b + u`` and ``p = p - lr*(u + mu*b if nesterov else b)``, or, with
   ``lr_in_momentum``, ``b = mu*b + lr*u`` and ``p = p - (mu*b + lr*u if nesterov else b)``.

Hyperparameters are trusted here: :mod:`rmsprop.core.validation` checks them at the
optimizer's boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _get_capturable_supported_devices

from rmsprop.core.hyperparameters import Hyperparameters

__all__ = ["denominator", "rmsprop"]


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    *,
    foreach: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
) -> None:
    """Apply one RMSProp step in place to ``params`` and their state.

    ``grad_avgs`` must be filled when ``hp.centered`` and ``momentum_buffers``
    when ``hp.momentum > 0``; otherwise they may be empty. ``state_steps`` are
    0-dim tensors that are incremented.
    """
    if not params:
        return
    if capturable:
        _check_capturable_devices(params, state_steps)
    step_fn = _multi_tensor_rmsprop if foreach else _single_tensor_rmsprop
    step_fn(
        params,
        grads,
        square_avgs,
        grad_avgs,
        momentum_buffers,
        state_steps,
        hp,
        differentiable=differentiable,
        capturable=capturable,
    )


def _check_capturable_devices(params: list[Tensor], state_steps: list[Tensor]) -> None:
    supported = _get_capturable_supported_devices()
    for param, step in zip(params, state_steps, strict=True):
        if param.device.type != step.device.type or param.device.type not in supported:
            raise RuntimeError(
                "capturable=True needs params and their 'step' state on one of the "
                f"devices {supported}; got a parameter on {param.device} "
                f"with step on {step.device}"
            )


def _lr_as_number(lr: float | Tensor, capturable: bool) -> float | Tensor:
    """A Tensor lr stays a tensor only where reading it would break graph capture,
    or make torch.compile specialize on its value and recompile when it changes."""
    if isinstance(lr, Tensor) and not (capturable or torch.compiler.is_compiling()):
        return lr.item()
    return lr


def _bias_correction(alpha: float, step: Tensor, capturable: bool) -> float | Tensor:
    """``1 - alpha^t``: a Python float, or a tensor under graph capture or torch.compile.

    Reading the step as a number would break a CUDA graph or a compiled graph.
    """
    if capturable or torch.compiler.is_compiling():
        return 1 - torch.pow(alpha, step)
    return 1 - alpha ** step.item()


def _single_tensor_rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    *,
    differentiable: bool,
    capturable: bool,
) -> None:
    # Like torch.optim's for-loop path, this one reads a Tensor lr as a number
    # (except under torch.compile); the foreach path keeps it on the device under capture.
    lr = _lr_as_number(hp.lr, capturable=False)
    for i, param in enumerate(params):
        grad = grads[i]
        square_avg = square_avgs[i]
        step = state_steps[i]
        step += 1

        if hp.maximize:
            grad = -grad
        if hp.weight_decay != 0:
            if hp.decoupled_weight_decay:
                param.mul_(1 - lr * hp.weight_decay)
            else:
                grad = grad.add(param, alpha=hp.weight_decay)

        # Complex numbers are updated as pairs of reals, as torch.optim does.
        if torch.is_complex(param):
            param, grad, square_avg = (torch.view_as_real(t) for t in (param, grad, square_avg))

        square_avg.mul_(hp.alpha).addcmul_(grad, grad, value=1 - hp.alpha)

        correction = _bias_correction(hp.alpha, step, capturable) if hp.bias_correction else None
        grad_avg = None
        if hp.centered:
            grad_avg = _real_view(grad_avgs[i])
            grad_avg.lerp_(grad, 1 - hp.alpha)
        denom = denominator(square_avg, grad_avg, correction, hp, differentiable)

        if hp.momentum > 0:
            buf = _real_view(momentum_buffers[i])
            buf.mul_(hp.momentum)
            if hp.lr_in_momentum:
                buf.addcdiv_(grad, denom, value=lr)
                if hp.nesterov:
                    param.add_(buf, alpha=-hp.momentum).addcdiv_(grad, denom, value=-lr)
                else:
                    param.sub_(buf)
            else:
                buf.addcdiv_(grad, denom)
                if hp.nesterov:
                    param.addcdiv_(grad, denom, value=-lr).add_(buf, alpha=-lr * hp.momentum)
                else:
                    param.add_(buf, alpha=-lr)
        else:
            param.addcdiv_(grad, denom, value=-lr)


def _real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if torch.is_complex(t) else t


def denominator(
    square_avg: Tensor,
    grad_avg: Tensor | None,
    correction: float | Tensor | None,
    hp: Hyperparameters,
    differentiable: bool,
) -> Tensor:
    """``sqrt(s) + eps`` or ``sqrt(s + eps)`` as a new tensor (steps 4-5 of the rule).

    ``correction`` is ``1 - alpha^t`` with bias correction, else ``None``;
    ``grad_avg`` is ``None`` unless centered. Neither buffer is changed.
    """
    second_moment = square_avg if correction is None else square_avg.div(correction)
    if grad_avg is not None:
        mean = grad_avg if correction is None else grad_avg.div(correction)
        # The clamp only matters where rounding makes the variance negative,
        # which would otherwise give NaN (torch.optim.RMSprop does not clamp).
        second_moment = second_moment.addcmul(mean, mean, value=-1).clamp_(min=0)
    if hp.eps_in_sqrt:
        return second_moment.add(hp.eps).sqrt_()
    # square_avg itself must not be overwritten; a tensor made above may be.
    root = second_moment.sqrt() if second_moment is square_avg else second_moment.sqrt_()
    # In-place would overwrite the sqrt output that autograd saves.
    return root.add(hp.eps) if differentiable else root.add_(hp.eps)


def _multi_tensor_rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    *,
    differentiable: bool,
    capturable: bool,
) -> None:
    if differentiable:
        raise RuntimeError("the foreach path does not support differentiable=True")
    lr = _lr_as_number(hp.lr, capturable)
    tensor_lists = [params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps]
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensor_lists)
    for (
        device_params,
        device_grads,
        device_square_avgs,
        device_grad_avgs,
        device_buffers,
        device_steps,
    ), _ in grouped.values():
        device_params = _real_views(device_params)
        device_grads = _real_views(device_grads)
        device_square_avgs = _real_views(device_square_avgs)

        if device_steps[0].is_cpu:
            # A CPU scalar wrapped once, instead of once per tensor by the fallback.
            torch._foreach_add_(device_steps, torch.tensor(1.0), alpha=1.0)
        else:
            torch._foreach_add_(device_steps, 1)

        if hp.maximize:
            device_grads = torch._foreach_neg(device_grads)
        if hp.weight_decay != 0:
            if hp.decoupled_weight_decay:
                torch._foreach_mul_(device_params, 1 - lr * hp.weight_decay)
            else:
                device_grads = torch._foreach_add(device_grads, device_params, alpha=hp.weight_decay)

        torch._foreach_mul_(device_square_avgs, hp.alpha)
        torch._foreach_addcmul_(device_square_avgs, device_grads, device_grads, value=1 - hp.alpha)

        corrections = None
        if hp.bias_correction:
            corrections = [_bias_correction(hp.alpha, step, capturable) for step in device_steps]
        device_grad_avgs = _real_views(device_grad_avgs) if hp.centered else None
        if device_grad_avgs is not None:
            torch._foreach_lerp_(device_grad_avgs, device_grads, 1 - hp.alpha)
        denoms = _foreach_denominators(device_square_avgs, device_grad_avgs, corrections, hp)

        if hp.momentum > 0:
            _foreach_apply_momentum(device_params, device_grads, _real_views(device_buffers), denoms, lr, hp)
        else:
            _scaled_addcdiv_(device_params, device_grads, denoms, -lr)


def _foreach_apply_momentum(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    denoms: list[Tensor],
    lr: float | Tensor,
    hp: Hyperparameters,
) -> None:
    """Step 6 of the rule with momentum."""
    torch._foreach_mul_(buffers, hp.momentum)
    if hp.lr_in_momentum:
        _scaled_addcdiv_(buffers, grads, denoms, lr)
        if hp.nesterov:
            torch._foreach_add_(params, buffers, alpha=-hp.momentum)
            _scaled_addcdiv_(params, grads, denoms, -lr)
        else:
            torch._foreach_sub_(params, buffers)
    else:
        torch._foreach_addcdiv_(buffers, grads, denoms)
        if hp.nesterov:
            _scaled_addcdiv_(params, grads, denoms, -lr)
            _scaled_add_(params, buffers, -lr * hp.momentum)
        else:
            _scaled_add_(params, buffers, -lr)


def _scaled_addcdiv_(targets: list[Tensor], grads: list[Tensor], denoms: list[Tensor], scale: float | Tensor) -> None:
    """``targets += scale * grads / denoms``; a Tensor scale stays on its device."""
    if isinstance(scale, Tensor):
        torch._foreach_addcdiv_(targets, grads, torch._foreach_div(denoms, scale))
    else:
        torch._foreach_addcdiv_(targets, grads, denoms, value=scale)


def _scaled_add_(targets: list[Tensor], sources: list[Tensor], scale: float | Tensor) -> None:
    """``targets += scale * sources``; a Tensor scale stays on its device."""
    if isinstance(scale, Tensor):
        torch._foreach_add_(targets, torch._foreach_mul(sources, scale))
    else:
        torch._foreach_add_(targets, sources, alpha=scale)


def _real_views(tensors: list[Tensor]) -> list[Tensor]:
    return [_real_view(t) for t in tensors]


def _foreach_denominators(
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor] | None,
    corrections: list[float | Tensor] | None,
    hp: Hyperparameters,
) -> list[Tensor]:
    second_moments = square_avgs if corrections is None else torch._foreach_div(square_avgs, corrections)
    if grad_avgs is not None:
        means = grad_avgs if corrections is None else torch._foreach_div(grad_avgs, corrections)
        second_moments = torch._foreach_addcmul(second_moments, means, means, value=-1)
        torch._foreach_clamp_min_(second_moments, 0)
    if hp.eps_in_sqrt:
        denoms = torch._foreach_add(second_moments, hp.eps)
        torch._foreach_sqrt_(denoms)
        return denoms
    if second_moments is square_avgs:
        denoms = torch._foreach_sqrt(second_moments)
    else:
        denoms = second_moments
        torch._foreach_sqrt_(denoms)
    torch._foreach_add_(denoms, hp.eps)
    return denoms
