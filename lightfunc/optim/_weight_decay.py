"""Weight decay: the L2 term added to gradients, and decoupled (AdamW-style) shrinking.

Two transformations because torch does two different things:

- `add_decayed_weights` adds ``weight_decay * p`` to the gradient before the
  optimizer sees it (torch.optim.SGD / Adam ``weight_decay``);
- `add_decoupled_weight_decay` shrinks the parameter next to the optimizer
  step (torch.optim.AdamW, Lion): ``p * (1 - lr * weight_decay) + step``.

The second is not written as ``step - lr * weight_decay * p``: torch rounds
the factor ``1 - lr * weight_decay`` to fp32, a systematic bias (up to half
an ulp of 1.0, i.e. a relative error of ``3e-8 / (lr * weight_decay)`` in the
decay) that drifts past 1e-6 within a hundred steps. Instead the update is
torch's new parameter minus the old one. Where the two are within a factor
of two of each other (a step smaller than the parameter) the subtraction is
exact and `apply_updates` lands on torch's parameter bit for bit; where a
step crosses zero or more than doubles the parameter, the move is rounded
once more, up to half an ulp of the old parameter (tested: `adamw` at lr
1e-2 on a small MLP, one element in 36 after 5 steps, 4.7e-10 off). A
donating eager step (`build(..., donate=True)`) writes torch's in-place
arithmetic itself and has no such rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from .._tree import tree_map, tree_unflatten
from ._base import GradientTransformation, OptState, Params, ScalarOrSchedule, Updates
from ._masking import MaskOrFn, masked
from ._transforms import (
    ScaleByScheduleState,
    foreach_leaves,
    host_scalar,
    once_per_step,
    stateless_init,
    zero_count,
)
from ._validate import check_float, check_learning_rate


def _needs_params(name: str, params: Params | None) -> Params:
    if params is None:
        raise ValueError(f"`{name}` needs the parameters: call `update(grads, state, params)`.")
    return params


def _maybe_masked(tx: GradientTransformation, mask: MaskOrFn | None) -> GradientTransformation:
    return tx if mask is None else masked(tx, mask)


def add_decayed_weights(
    weight_decay: float, mask: MaskOrFn | None = None
) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates: an L2 penalty's gradient.

    Put it first in a chain to get torch.optim.SGD's and Adam's `weight_decay`
    (the term then goes through momentum and Adam's rescaling).

    Args:
        weight_decay: the coefficient, >= 0.
        mask: optional pytree of bools like the params (or a prefix of them,
            or a function params -> such a tree): decay only where True.

    Returns:
        A stateless `GradientTransformation` (wrapped in `masked` when `mask` is given).

    Raises:
        TypeError, ValueError: `weight_decay` is not a float >= 0.
        ValueError: (at `update`) `params` is None.
    """
    weight_decay = check_float("weight_decay", weight_decay, low=0.0, hint="Use 0.0 for no decay.")

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        params = _needs_params("add_decayed_weights", params)
        # torch: grad.add(param, alpha=weight_decay).
        return tree_map(lambda u, p: torch.add(u, p, alpha=weight_decay), updates, params), state

    return _maybe_masked(GradientTransformation(stateless_init, update), mask)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The precision torch's CPU kernels give a Python scalar multiplying a `dtype` tensor."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def factor_for(factor: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor | float:
    """The decay factor as torch's kernel for `dtype` sees a Python scalar (float64 tensors to opmath)."""
    return factor.to(_opmath(dtype)) if isinstance(factor, torch.Tensor) else factor


def add_decoupled_weight_decay(
    learning_rate: ScalarOrSchedule, weight_decay: float, mask: MaskOrFn | None = None
) -> GradientTransformation:
    """Shrink the parameters by ``lr * weight_decay`` next to the incoming step.

    Put it after the step is formed (`scale_by_adam` with `learning_rate`, or
    after `scale_by_learning_rate`): with Adam before it this is
    torch.optim.AdamW. The update returned is ``(p * (1 - lr * weight_decay) +
    step) - p``: torch's arithmetic for the new parameter, minus the old one.
    The factor is computed in float64 from the (scheduled) learning rate and
    rounded to the parameter's precision, as torch rounds it.

    Args:
        learning_rate: the same learning rate as the step's: a float >= 0 or a schedule.
        weight_decay: the coefficient, >= 0.
        mask: optional pytree of bools like the params (or a prefix of them,
            or a function params -> such a tree): decay only where True.

    Returns:
        A `GradientTransformation` whose state holds the update count.

    Raises:
        TypeError, ValueError: a bad learning rate or `weight_decay`.
        ValueError: (at `update`) `params` is None.
    """
    lr = check_learning_rate("learning_rate", learning_rate)
    weight_decay = check_float("weight_decay", weight_decay, low=0.0, hint="Use 0.0 for no decay.")

    def init(params: Params) -> OptState:
        return ScaleByScheduleState(count=zero_count(params))

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        params = _needs_params("add_decoupled_weight_decay", params)
        factor: Any
        if not callable(lr):
            factor = 1 - lr * weight_decay  # a Python float, exactly torch's scalar
        else:
            rate = host_scalar(lr(state.count))
            if isinstance(rate, torch.Tensor):
                (factor,) = once_per_step(1 - rate.to(torch.float64) * weight_decay)
            else:
                factor = 1 - rate * weight_decay
        new_state = ScaleByScheduleState(count=state.count + 1)
        lists = foreach_leaves(updates, params)
        if lists is not None:
            (steps, ps), spec = lists
            # The leaf-by-leaf arithmetic below, one multi-tensor kernel per operation.
            moved = torch._foreach_mul(ps, factor_for(factor, ps[0].dtype))
            torch._foreach_add_(moved, steps)
            torch._foreach_sub_(moved, ps)
            return tree_unflatten(spec, moved), new_state

        def decay(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            # torch: p.mul_(1 - lr * wd); p.add_(step). Return the move, not the new value.
            return ((p * factor_for(factor, p.dtype) + u.to(p.dtype)) - p).to(u.dtype)

        return tree_map(decay, updates, params), new_state

    return _maybe_masked(GradientTransformation(init, update), mask)
