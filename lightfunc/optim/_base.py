"""The optimizer contract: gradient transformations, optax-style.

A `GradientTransformation` is a pair of pure functions:

    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)

`params`, `grads` and `updates` are pytrees of tensors with the same
structure; `opt_state` is a pytree of tensors (frozen dataclasses registered
with `lightfunc._tree.register_dataclass`). Nothing is mutated: every call
returns new tensors, so an update can run inside a compiled step and a state
kept from step k is still step k's state afterwards.

Anything that changes from step to step (the step count, a scheduled
learning rate) is a tensor in the state, never a Python number, so a
compiled step never recompiles because of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from .._tree import PyTree, tree_flatten, tree_map, tree_structure, tree_unflatten
from ._local import local_lists

OptState = Any
Params = PyTree
Updates = PyTree

#: A learning rate (or any hyper-parameter) given as a constant or as a pure
#: function of the step count (a 0-d int64 tensor) returning a 0-d tensor.
Schedule = Callable[[torch.Tensor], torch.Tensor]
ScalarOrSchedule = float | Schedule


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimizer: `init(params) -> state`, `update(grads, state, params) -> (updates, state)`.

    The updates are *added* to the parameters by `apply_updates` (they already
    carry the minus sign and the learning rate).
    """

    init: TransformInitFn
    update: TransformUpdateFn


#: What `TrainState.apply_gradients` calls with the state it updated in place, and the new one.
OnUpdatedInPlace = Callable[[Any, Any], None]


class InPlaceUpdate:
    """The `update` of `in_place(tx, on_updated)`: `tx`'s, marked to be written in place.

    Called as an update it is `tx`'s pure update. `TrainState.apply_gradients`
    finds it (among `unwrapped(tx)`: a strategy may wrap it for one call) and
    runs `update_params(..., in_place=True)` instead, then calls
    `on_updated(old_state, new_state)` when the optimizer did write in place.
    A donating eager step (`build(..., donate=True)`) marks each `TrainState`
    it is given for the duration of the call, and unmarks the states it returns.
    """

    __slots__ = ("on_updated", "wraps")

    def __init__(self, tx: GradientTransformation, on_updated: OnUpdatedInPlace) -> None:
        self.wraps = tx  # followed by `unwrapped`, like every wrapper's
        self.on_updated = on_updated

    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        return self.wraps.update(updates, state, params)

    def to_params(
        self, updates: Updates, state: OptState, params: Params, *, in_place: bool
    ) -> tuple[Params | None, OptState, bool]:
        return update_params(self.wraps, updates, state, params, in_place=in_place)


def in_place(tx: GradientTransformation, on_updated: OnUpdatedInPlace) -> GradientTransformation:
    """`tx` marked for an in-place update by `TrainState.apply_gradients` (see `InPlaceUpdate`)."""
    return GradientTransformation(tx.init, InPlaceUpdate(tx, on_updated))


def update_params(
    tx: GradientTransformation,
    updates: Updates,
    state: OptState,
    params: Params,
    *,
    in_place: bool,
) -> tuple[Params | None, OptState, bool]:
    """`tx`'s new parameters and state, computed directly where `tx` can (``tx.update.to_params``).

    Returns ``(new params, new state, written in place)``; the params are
    None when `tx` deferred (accumulation). What `TrainState.apply_gradients`
    runs eagerly. `sgd`, `adam` and `adamw` (and the wrappers that pass the
    call through: `chain`, `trainable_only`, the distributed strategies)
    offer ``update.to_params``: torch.optim's own arithmetic, eagerly on CPU
    for leaves of one dtype, producing the new parameters themselves rather
    than updates to add, so bit for bit torch's parameters (``p + (new - p)``
    is one rounding away from ``new``) and two elementwise passes fewer.
    With `in_place` (a donating step) they write into `params` and `state`'s
    moments; without, every output is a new tensor and the inputs are
    untouched. Any other optimizer, and these ones elsewhere (compiling,
    under `vmap`, mixed dtypes), run the pure update and `apply_updates` it.
    """
    fn = getattr(tx.update, "to_params", None)
    if fn is not None:
        return fn(updates, state, params, in_place=in_place)
    new_updates, new_state = tx.update(updates, state, params)
    return (None if new_updates is None else apply_updates(params, new_updates)), new_state, False


def writable(groups: list[list[torch.Tensor]]) -> bool:
    """Whether writing into every tensor of `groups` (moments, parameters) changes nothing else.

    Not when a tensor appears twice (it would be updated twice) or shares its
    storage with any other tensor: a view taken of a parameter before the
    update (``first = state.params["w"][0]``, kept as a metric) would show the
    new values, the silent wrong donation must not bring. A tensor's storage
    is referenced once by the tensor and once by the `untyped_storage()`
    handle that asks; a third reference is a view (~0.2 us a tensor).
    """
    tensors = [x for group in groups for x in group]
    if len({id(x) for x in tensors}) != len(tensors):
        return False
    use_count = torch._C._storage_Use_Count
    return all(use_count(x.untyped_storage()._cdata) <= 2 for x in tensors)


def direct_form_applies(
    groups: list[list[torch.Tensor]], spec: Any, params: Params, *, in_place: bool
) -> bool:
    """Whether a ``to_params`` may compute the new parameters from `groups`, its leaf lists.

    `groups` are the gradients' list first, then the lists written (moments,
    parameters), `spec` the gradients' tree structure. No when the
    parameters are shaped otherwise (the pure update and `apply_updates`
    report the mismatch); in place, when a tensor to write is not
    `writable`; into new tensors, when a tensor requires grad (the pure
    update keeps the autograd graph `apply_updates` builds).
    """
    if tree_structure(params) != spec:
        return False
    if in_place:
        return writable(groups[1:])
    return not any(x.requires_grad for group in groups for x in group)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return `params + updates`, leaf by leaf, in each parameter's dtype.

    Eagerly, when both trees have the same structure and every leaf is a
    plain floating tensor (same shape and device as its update, neither
    requiring grad), the sum is one multi-tensor `torch._foreach_add`: the
    same additions (bit for bit) without a Python call per parameter.
    `DTensor` shards (FSDP) add their local tensors the same way.
    Elsewhere (compiling, under a `torch.func` transform, broadcasting
    updates) it is a `tree_map` of `p + u.to(p.dtype)`.
    """
    added = _foreach_added(params, updates)
    if added is not None:
        return added
    return tree_map(_add_leaf, params, updates)


def _add_leaf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return p + u.to(p.dtype)


def _foreach_added(params: Params, updates: Updates) -> Params | None:
    """`apply_updates(params, updates)` as one `torch._foreach_add`, or None where it does not apply."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return None
    ps, spec = tree_flatten(params)
    us, u_spec = tree_flatten(updates)
    if not ps or u_spec != spec:
        return None
    local = local_lists([ps, us])  # FSDP's shards: their local tensors, rewrapped after
    rewrap = None
    if local is not None:
        (ps, us), rewrap = local
    tensor = torch.Tensor
    for p, u in zip(ps, us, strict=True):
        if (
            type(p) is not tensor
            or type(u) is not tensor
            or not p.is_floating_point()
            or p.requires_grad
            or u.requires_grad
            or p.shape != u.shape
            or p.device != u.device
        ):
            return None
    us = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(ps, us, strict=True)]
    added = torch._foreach_add(ps, us)
    return tree_unflatten(spec, added if rewrap is None else rewrap(added))
