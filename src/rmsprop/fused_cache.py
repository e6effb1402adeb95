"""What a fused step of one param group gathers, kept for the next steps.

Gathering a group's tensors and checking them one by one in Python costs
about 5 us per tensor: with 1000 tensors of 4096 elements, 5 ms against the
kernel's 2 ms. Between two steps of a training loop usually only the
gradients change (``zero_grad`` sets them to ``None``, backward makes new
ones), so :class:`FusedGroupCache` keeps the params, their state and the
kernel launches (:func:`rmsprop.fused.prepare`), and a step re-reads only
what may have changed behind the optimizer's back, one C-level pass over the
tensors per property:

- the group's params (same objects, same order, same ones with gradients)
  and their memory (a ``p.data = ...`` or ``.to()`` moves it),
- the state: the optimizer's state mapping, each param's state dict and each
  buffer in it (``load_state_dict``, ZeroRedundancyOptimizer and users
  replace them), and the buffers' memory,
- the gradients: plain dense contiguous CPU tensors of the params' dtypes
  and shapes.

Any change there, or to the settings that choose the path (``fused``,
``foreach``, ``momentum``, ``centered``, ...), makes :meth:`FusedGroupCache.gradients` return ``None``, and
the optimizer gathers and checks the group from scratch. The cache holds
references to every tensor whose address it keeps, so none of those
addresses can be freed and reused while it lives; it keeps no gradients, which
``zero_grad`` must be able to free.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import compress, repeat
from operator import attrgetter, is_, is_not
from typing import Any

from torch import Tensor

from rmsprop.fused import _DTYPE, _IS_CPU, _SHAPE, Part, all_plain_strided_contiguous, prepare

__all__ = ["FusedGroupCache"]

_GRAD = attrgetter("grad")


class FusedGroupCache:
    """The tensors of a fused group's step on CPU and its prepared launches, valid while they are unchanged."""

    def __init__(
        self,
        group: Mapping[str, Any],
        state: Mapping[Tensor, dict[str, Any]],
        params: list[Tensor],
        square_avgs: list[Tensor],
        grad_avgs: list[Tensor],
        momentum_buffers: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        """From a step that gathered and checked ``params`` and their state (as ``_init_group`` fills them)."""
        self._group_params = list(group["params"])
        self._has_grad = [p.grad is not None for p in self._group_params]
        self._all_have_grads = all(self._has_grad)
        self._settings = _path_settings(group)
        self._state = state
        self.params = params
        self._param_states = [state[p] for p in params]
        self._buffers = {"square_avg": square_avgs, "step": state_steps}
        if group["momentum"] > 0:
            self._buffers["momentum_buffer"] = momentum_buffers
        if group["centered"]:
            self._buffers["grad_avg"] = grad_avgs
        self._addresses = {key: _addresses(tensors) for key, tensors in self._buffers.items()}
        self._addresses["params"] = _addresses(params)
        self._shapes = list(map(_SHAPE, params))
        self._dtypes = list(map(_DTYPE, params))
        self._one_dtype = {self._dtypes[0]} if len(set(self._dtypes)) == 1 else None
        self.parts: list[Part] = prepare(
            params, square_avgs, grad_avgs if group["centered"] else [], momentum_buffers, state_steps
        )

    def gradients(self, group: Mapping[str, Any], state: Mapping[Tensor, dict[str, Any]]) -> list[Tensor] | None:
        """The gradients of :attr:`params` if the cache still describes the group, else ``None``."""
        group_params = group["params"]
        if not (
            state is self._state
            and len(group_params) == len(self._group_params)
            and all(map(is_, group_params, self._group_params))
            and _path_settings(group) == self._settings
        ):
            return None
        grads = list(map(_GRAD, group_params))
        if self._all_have_grads:
            if not all(map(is_not, grads, repeat(None))):
                return None
        else:
            if list(map(is_not, grads, repeat(None))) != self._has_grad:
                return None
            grads = list(compress(grads, self._has_grad))
        if self._gradients_fit(grads) and self._state_unchanged(state):
            return grads
        return None

    def _gradients_fit(self, grads: list[Tensor]) -> bool:
        dtypes = set(map(_DTYPE, grads)) if self._one_dtype else list(map(_DTYPE, grads))
        return (
            all_plain_strided_contiguous(grads)
            and all(map(_IS_CPU, grads))
            and dtypes == (self._one_dtype or self._dtypes)
            and list(map(_SHAPE, grads)) == self._shapes
        )

    def _state_unchanged(self, state: Mapping[Tensor, dict[str, Any]]) -> bool:
        if _addresses(self.params) != self._addresses["params"]:
            return False
        if not all(map(is_, map(state.get, self.params), self._param_states)):
            return False
        for key, tensors in self._buffers.items():
            current = list(map(dict.get, self._param_states, repeat(key)))
            if not all(map(is_, current, tensors)) or _addresses(current) != self._addresses[key]:
                return False
        return True


def _path_settings(group: Mapping[str, Any]) -> tuple:
    """The settings that choose a group's path and its state buffers."""
    return (
        group["momentum"] > 0,
        group["centered"],
        group["state_precision"],
        group["fused"],
        group["foreach"],
        group["differentiable"],
        group["capturable"],
    )


def _addresses(tensors: list[Tensor]) -> list[int]:
    return list(map(Tensor.data_ptr, tensors))
