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

from .._tree import PyTree, tree_flatten, tree_map, tree_unflatten

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


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return `params + updates`, leaf by leaf, in each parameter's dtype.

    Eagerly, when both trees have the same structure and every leaf is a
    plain floating tensor (same shape and device as its update, neither
    requiring grad), the sum is one multi-tensor `torch._foreach_add`: the
    same additions (bit for bit) without a Python call per parameter.
    Elsewhere (compiling, under a `torch.func` transform, DTensor shards,
    broadcasting updates) it is a `tree_map` of `p + u.to(p.dtype)`.
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
    return tree_unflatten(spec, torch._foreach_add(ps, us))
