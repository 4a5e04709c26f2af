"""`adam(..., fused=True)` and `adamw(..., fused=True)`: one kernel for the whole step.

The fused optimizers keep the unfused chain's state, leaf for leaf (so a
checkpoint written by one loads into the other), and compute the same step
with `lightfunc.kernels.adamw_update`: one Triton launch per dtype for the
whole parameter tree on a GPU, and the unfused arithmetic itself elsewhere
(bit-identical results on CPU). Like every lightfunc optimizer they are
pure: each call returns new tensors, inside or outside `torch.compile`.
"""

from __future__ import annotations

from typing import Any

import torch

from .._tree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from ._base import GradientTransformation, OptState, Params, ScalarOrSchedule, Updates
from ._masking import MaskedState, MaskOrFn
from ._transforms import (
    ScaleByAdamState,
    ScaleByScheduleState,
    adam_scalars,
    foreach_leaves,
    host_scalar,
)


def _decay_flags(mask: MaskOrFn | None, updates: Updates, n: int) -> list[bool]:
    """Per leaf of `updates`, whether it is decayed (`mask` may be a prefix tree or a function)."""
    if mask is None:
        return [True] * n
    mask_tree = mask(updates) if callable(mask) else mask
    # Broadcast each mask leaf over the sub-tree of updates it covers.
    flags = tree_map(lambda m, sub: tree_map(lambda _: m, sub), mask_tree, updates)
    return [bool(m) for m in tree_leaves(flags)]


def _advance(state: Any) -> Any:
    """The weight-decay part of the state with its update count advanced by one."""
    if isinstance(state, MaskedState):
        return MaskedState(inner_state=_advance(state.inner_state))
    return ScaleByScheduleState(count=state.count + 1)


def fused_adam(
    unfused: GradientTransformation,
    lr: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask: MaskOrFn | None,
    *,
    decoupled: bool,
) -> GradientTransformation:
    """The fused twin of `unfused` (an `adam` or `adamw` chain built from the same, validated, arguments).

    The state is `unfused`'s: for AdamW ``(ScaleByAdamState, decay state)``,
    for Adam ``(EmptyState, ScaleByAdamState)`` with weight decay, else
    ``(ScaleByAdamState,)``; the decay state is absent when `weight_decay` is 0.
    """
    from lightfunc.kernels import adamw_update  # only fused optimizers import the kernels

    b1, b2, eps, weight_decay = float(b1), float(b2), float(eps), float(weight_decay)
    adam_at = 0 if decoupled else -1  # position of ScaleByAdamState in the chain's state

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        adam: ScaleByAdamState = state[adam_at]
        grads, spec = tree_flatten(updates)
        if params is None:
            if weight_decay != 0:
                name = "add_decoupled_weight_decay" if decoupled else "add_decayed_weights"
                raise ValueError(
                    f"`{name}` needs the parameters: call `update(grads, state, params)`."
                )
            leaves = grads  # read by the kernel, never used without weight decay
        else:
            leaves = tree_leaves(params)
        step_lr = lr(adam.count) if callable(lr) else lr
        new_updates, mu, nu = adamw_update(
            leaves, grads, tree_leaves(adam.mu), tree_leaves(adam.nu), adam.count + 1, step_lr,
            b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
            decay=_decay_flags(mask, updates, len(grads)), decoupled=decoupled,
        )  # fmt: skip
        new_adam = ScaleByAdamState(
            count=adam.count + 1, mu=tree_unflatten(spec, mu), nu=tree_unflatten(spec, nu)
        )
        if decoupled:
            new_state = (new_adam, *(_advance(s) for s in state[1:]))
        else:
            new_state = (*state[:-1], new_adam)
        return tree_unflatten(spec, new_updates), new_state

    return GradientTransformation(unfused.init, update)


def foreach_adam(
    unfused: GradientTransformation,
    lr: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    mask: MaskOrFn | None,
    *,
    decoupled: bool,
) -> GradientTransformation:
    """`unfused` (an `adam` or `adamw` chain) with torch.optim's eager arithmetic as one pass per op.

    Eagerly on CPU, when every leaf shares one dtype, the whole step runs as
    torch.optim.Adam(W)'s single-tensor code does, each operation one
    ``torch._foreach_*`` call over all leaves: ``p * (1 - lr * wd)``, then
    ``addcdiv`` of the moments, minus ``p`` (the update; see
    `add_decoupled_weight_decay`). That is two elementwise passes and one
    allocation per leaf fewer than the chain's transforms one after the other,
    bit for bit the same numbers (the chain rounds ``(value * m) / denom``,
    which is exactly what ``addcdiv`` computes). Pure: every output is new.
    Inside `torch.compile`, on other devices (the step size would need a
    device sync to become a Python float) and for mixed dtypes, `unfused`
    runs. Same state as `unfused`, leaf for leaf.
    """
    adam_at = 0 if decoupled else -1  # position of ScaleByAdamState in the chain's state

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        adam: ScaleByAdamState = state[adam_at]
        if weight_decay == 0 or params is None:
            lists = foreach_leaves(updates, adam.mu, adam.nu)
        else:
            lists = foreach_leaves(updates, adam.mu, adam.nu, params)
        if lists is None or not isinstance(host_scalar(adam.count), int):
            return unfused.update(updates, state, params)
        (grads, mus, nus, *rest), spec = lists
        step_size, bc2_sqrt = adam_scalars(adam.count, b1, b2, lr)
        assert isinstance(step_size, float) and isinstance(bc2_sqrt, float)  # CPU, eager
        if weight_decay != 0 and not decoupled:
            grads = list(torch._foreach_add(grads, rest[0], alpha=weight_decay))  # torch's L2 term
        mu = torch._foreach_lerp(mus, grads, 1 - b1)
        nu = torch._foreach_mul(nus, b2)
        torch._foreach_addcmul_(nu, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        if weight_decay != 0 and decoupled:
            (ps,) = rest
            rate = float(lr(adam.count)) if callable(lr) else lr
            flags = _decay_flags(mask, updates, len(grads))
            out = torch._foreach_mul(ps, [1 - rate * weight_decay if d else 1.0 for d in flags])
            torch._foreach_addcdiv_(out, mu, denom, value=step_size)
            torch._foreach_sub_(out, ps)
        else:
            out = torch._foreach_mul(mu, step_size)
            torch._foreach_div_(out, denom)
        new_adam = ScaleByAdamState(
            count=adam.count + 1, mu=tree_unflatten(spec, mu), nu=tree_unflatten(spec, nu)
        )
        if decoupled:
            new_state = (new_adam, *(_advance(s) for s in state[1:]))
        else:
            new_state = (*state[:-1], new_adam)
        return tree_unflatten(spec, out), new_state

    return GradientTransformation(unfused.init, update)


def check_fused(fused: object) -> bool:
    """Validate the `fused` argument."""
    if not isinstance(fused, bool):
        raise TypeError(
            f"`fused` must be a bool, got {type(fused).__name__} ({fused!r}). Pass fused=True "
            f"to run the step as one kernel (see lightfunc.kernels)."
        )
    return fused
