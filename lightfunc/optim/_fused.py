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
from ._base import (
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Updates,
    apply_updates,
    direct_form_applies,
)
from ._local import Rewrap, local_lists
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


#: What ``torch._foreach_*`` kernels take and return.
Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]


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
    `DTensor` shards (FSDP) run the same kernels on their local tensors
    (`lightfunc.optim._local`). Inside `torch.compile`, on other devices (the
    step size would need a device sync to become a Python float) and for
    mixed dtypes, `unfused` runs. Same state as `unfused`, leaf for leaf.

    ``update.to_params(grads, state, params, in_place=...)`` is the same
    step ending in the new parameters themselves, not in an update to add:
    torch.optim's own arithmetic (``p * (1 - lr * wd)``, then ``addcdiv``),
    so torch's parameters bit for bit, where ``p + update`` is one rounding
    away, and two passes fewer (the ``- p`` and the ``+ p``). With
    `in_place` (a donating eager step, `build(..., donate=True)`; see
    `lightfunc/_donate.py`) it writes into the parameters and moments given
    and returns ``(params, state, True)`` built on them; without, every
    output is new and it returns ``(params, state, False)``: what
    `TrainState.apply_gradients` runs eagerly. Where the multi-tensor path
    does not apply it runs the pure update, applied, and returns
    ``(params, state, False)``.
    """
    adam_at = 0 if decoupled else -1  # position of ScaleByAdamState in the chain's state

    def prepared(
        updates: Updates, state: OptState, params: Params | None, *, with_params: bool
    ) -> tuple[list[list[torch.Tensor]], Rewrap | None, Any] | None:
        """(leaf lists: grads, mu, nu[, params]; how to rewrap shards; spec), or None (use `unfused`)."""
        adam: ScaleByAdamState = state[adam_at]
        if (with_params or weight_decay != 0) and params is None:
            return None
        trees = (
            (updates, adam.mu, adam.nu) if params is None else (updates, adam.mu, adam.nu, params)
        )
        lists = foreach_leaves(*trees)
        if lists is None or not isinstance(host_scalar(adam.count), int):
            return None
        groups, spec = lists
        local = local_lists(groups)
        if local is None:
            return groups, None, spec
        return local[0], local[1], spec

    def scalars(updates: Updates, state: OptState, n: int) -> tuple[float, float, list[float]]:
        """This step's ``-lr / bc1``, ``sqrt(bc2)`` and, for decoupled decay, each leaf's factor."""
        adam: ScaleByAdamState = state[adam_at]
        step_size, bc2_sqrt = adam_scalars(adam.count, b1, b2, lr)
        assert isinstance(step_size, float) and isinstance(bc2_sqrt, float)  # CPU, eager
        if weight_decay == 0 or not decoupled:
            return step_size, bc2_sqrt, []
        rate = float(lr(adam.count)) if callable(lr) else lr
        flags = _decay_flags(mask, updates, n)
        return step_size, bc2_sqrt, [1 - rate * weight_decay if d else 1.0 for d in flags]

    def advanced(state: OptState, mu: Updates, nu: Updates) -> OptState:
        adam: ScaleByAdamState = state[adam_at]
        new_adam = ScaleByAdamState(count=adam.count + 1, mu=mu, nu=nu)
        if decoupled:
            return (new_adam, *(_advance(s) for s in state[1:]))
        return (*state[:-1], new_adam)

    def moments(
        grads: Tensors, mus: Tensors, nus: Tensors, ps: Tensors | None, *, in_place: bool
    ) -> tuple[Tensors, Tensors, Tensors, Tensors]:
        """(gradients with the L2 term, new mu, new nu, Adam's denominator), torch's ops and order."""
        if weight_decay != 0 and not decoupled:
            assert ps is not None
            grads = torch._foreach_add(grads, ps, alpha=weight_decay)  # torch's L2 term
        if in_place:
            torch._foreach_lerp_(mus, grads, 1 - b1)
            torch._foreach_mul_(nus, b2)
            mu, nu = mus, nus
        else:
            mu = torch._foreach_lerp(mus, grads, 1 - b1)
            nu = torch._foreach_mul(nus, b2)
        torch._foreach_addcmul_(nu, grads, grads, value=1 - b2)
        return grads, mu, nu, torch._foreach_sqrt(nu)

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        ready = prepared(updates, state, params, with_params=False)
        if ready is None:
            return unfused.update(updates, state, params)
        (grads, mus, nus, *rest), rewrap, spec = ready
        step_size, bc2_sqrt, factors = scalars(updates, state, len(grads))
        _, mu, nu, denom = moments(grads, mus, nus, rest[0] if rest else None, in_place=False)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        if factors:
            (ps,) = rest
            out = torch._foreach_mul(ps, factors)
            torch._foreach_addcdiv_(out, mu, denom, value=step_size)
            torch._foreach_sub_(out, ps)
        else:
            out = torch._foreach_mul(mu, step_size)
            torch._foreach_div_(out, denom)
        if rewrap is not None:
            return tree_unflatten(spec, rewrap(out)), advanced(
                state, tree_unflatten(spec, rewrap(mu)), tree_unflatten(spec, rewrap(nu))
            )
        new_state = advanced(state, tree_unflatten(spec, mu), tree_unflatten(spec, nu))
        return tree_unflatten(spec, out), new_state

    def to_params(
        updates: Updates, state: OptState, params: Params, *, in_place: bool
    ) -> tuple[Params, OptState, bool]:
        ready = prepared(updates, state, params, with_params=True)
        if ready is None or not direct_form_applies(ready[0], ready[2], params, in_place=in_place):
            # The pure update, applied: what `apply_updates` makes of it (and its errors).
            new_updates, new_state = update(updates, state, params)
            return apply_updates(params, new_updates), new_state, False
        (grads, mus, nus, ps), rewrap, spec = ready
        step_size, bc2_sqrt, factors = scalars(updates, state, len(grads))
        new_ps: list[torch.Tensor] = []
        new_mus: list[torch.Tensor] = []
        new_nus: list[torch.Tensor] = []
        # torch.optim.Adam(W)'s single-tensor step: `p * (1 - lr * wd)` then `addcdiv` of the
        # moments, the very operations and order, so torch's parameters bit for bit. In place
        # (a donating step) written where torch writes: the moments and the parameters
        # themselves (the local tensors of shards write the shards); otherwise into new
        # tensors. In slices of the leaves, so that the temporaries (Adam's denominator, the
        # L2 term) are at most a slice's size, as torch's per-tensor loop keeps them at a
        # tensor's.
        for at in slices(ps):
            g, mu, nu, denom = moments(grads[at], mus[at], nus[at], ps[at], in_place=in_place)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            if in_place:
                if factors:
                    torch._foreach_mul_(ps[at], factors[at])
                torch._foreach_addcdiv_(ps[at], mu, denom, value=step_size)
            else:
                if factors:
                    out = torch._foreach_mul(ps[at], factors[at])
                    torch._foreach_addcdiv_(out, mu, denom, value=step_size)
                else:
                    out = torch._foreach_addcdiv(ps[at], mu, denom, value=step_size)
                new_ps += out
                new_mus += mu
                new_nus += nu
            del g, mu, nu, denom
        if in_place:
            # New containers around the same tensors: the caller's old containers are marked
            # consumed.
            new_ps = tree_leaves(params)
            new_mus, new_nus = tree_leaves(state[adam_at].mu), tree_leaves(state[adam_at].nu)
        elif rewrap is not None:  # new local tensors of shards: shards again
            new_ps, new_mus, new_nus = rewrap(new_ps), rewrap(new_mus), rewrap(new_nus)
        new_state = advanced(state, tree_unflatten(spec, new_mus), tree_unflatten(spec, new_nus))
        return tree_unflatten(spec, new_ps), new_state, in_place

    update.to_params = to_params  # type: ignore[attr-defined]
    return GradientTransformation(unfused.init, update)


#: The least number of elements an in-place update slice holds (see `slices`).
_SLICE_ELEMENTS = 1 << 20


def slices(leaves: list[torch.Tensor]) -> list[slice]:
    """Consecutive slices of `leaves`, each at most max(largest leaf, 1M elements) in all.

    One slice for a small model (each multi-tensor call costs ~10 us, which
    a 1 ms step feels); for a large one the temporaries stay near one
    tensor's size (on the bench's 3.2M-parameter `wide` MLP: 12.3 MB of
    denominator at once without slicing, 4.2 MB with).
    """
    cap = max([x.numel() for x in leaves] + [_SLICE_ELEMENTS])
    out, start, total = [], 0, 0
    for i, x in enumerate(leaves):
        if total + x.numel() > cap and i > start:
            out.append(slice(start, i))
            start, total = i, 0
        total += x.numel()
    out.append(slice(start, len(leaves)))
    return out


def check_fused(fused: object) -> bool:
    """Validate the `fused` argument."""
    if not isinstance(fused, bool):
        raise TypeError(
            f"`fused` must be a bool, got {type(fused).__name__} ({fused!r}). Pass fused=True "
            f"to run the step as one kernel (see lightfunc.kernels)."
        )
    return fused
