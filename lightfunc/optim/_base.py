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

from .._tree import PyTree, tree_map

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
    """Return `params + updates`, leaf by leaf, in each parameter's dtype."""
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)
