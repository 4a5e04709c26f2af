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

from .._tree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from ._base import GradientTransformation, OptState, Params, ScalarOrSchedule, Updates
from ._masking import MaskedState, MaskOrFn
from ._transforms import ScaleByAdamState, ScaleByScheduleState


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


def check_fused(fused: object) -> bool:
    """Validate the `fused` argument."""
    if not isinstance(fused, bool):
        raise TypeError(
            f"`fused` must be a bool, got {type(fused).__name__} ({fused!r}). Pass fused=True "
            f"to run the step as one kernel (see lightfunc.kernels)."
        )
    return fused
