"""Optimizer wrappers: what happens around an update, kept as optimizer state.

These are how `lightfunc.build`'s update transforms act, with no hidden
state anywhere else: each wraps the optimizer of a `TrainState`, and
whatever it has to remember lives in the optimizer state it returns (the
shape of optax's `apply_if_finite` and `MultiSteps`).

- `apply_if_finite(tx, loss_scale)`: skip an update whose gradients are not
  finite, and count it; with a dynamic `LossScale`, back the scale off on
  an overflow and grow it after a run of good steps. Installed for the
  whole run by `TrainState.with_precision` (float16 policies, or
  `skip_nonfinite=True`); `TrainState.loss_scale` finds its scale.
- `accumulate_gradients(tx)`: add micro-batch gradients into the optimizer
  state and update only on the last micro-batch. Installed by
  `build(..., accumulate_grad_batches=n)` for the duration of one call
  (the running sum exists only while a batch is being split).

An update that applies nothing returns `None` as its updates:
`TrainState.apply_gradients` then leaves the parameters and the step count
alone. It is a Python-level (trace-time) signal, so a compiled step has one
graph for the micro-batches that defer and one for the one that updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._precision import LossScale, all_finite
from .._tree import PyTree, register_dataclass, tree_map, tree_rebuild, tree_walk
from ._base import GradientTransformation, OptState, Params, Updates
from ._local import dtensor_type


@dataclasses.dataclass(frozen=True)
class ApplyIfFiniteState:
    """State of `apply_if_finite`.

    Attributes:
        inner: the wrapped optimizer's state, unchanged by skipped updates.
        loss_scale: the loss scale (dynamic for float16, else fixed at 1.0);
            its `skipped` counts the updates skipped so far.
        last_finite: whether the last update's gradients were finite (0-d bool).
    """

    inner: OptState
    loss_scale: LossScale
    last_finite: torch.Tensor


register_dataclass(ApplyIfFiniteState)


def apply_if_finite(tx: GradientTransformation, loss_scale: LossScale) -> GradientTransformation:
    """`tx`, skipping (and counting) updates whose gradients are not all finite.

    A skipped update returns zero updates (the parameters keep their
    values) and the wrapped optimizer's state as it was (moments, step
    counts and schedules do not advance); `loss_scale.update(finite)` backs
    a dynamic scale off or grows it. No host sync: every choice is a
    `torch.where`. Gradients held as `DTensor` shards (fully-sharded runs)
    are checked on every rank and the verdict agreed over the ranks, so
    all ranks skip together.

    Args:
        tx: the optimizer to wrap.
        loss_scale: the initial scale (`LossScale.create()` for float16,
            `LossScale.fixed()` to only skip and count).

    Returns:
        A `GradientTransformation` whose state is an `ApplyIfFiniteState`.
    """

    def init(params: Params) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(
            inner=tx.init(params),
            loss_scale=loss_scale,
            last_finite=torch.ones((), dtype=torch.bool, device=loss_scale.scale.device),
        )

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        grads = updates
        finite = _agreed_finite(grads)
        updates, inner = tx.update(grads, state.inner, params)
        if updates is None:  # a wrapped accumulation deferred: nothing to check yet
            return None, dataclasses.replace(state, inner=inner)
        updates = tree_map(lambda u: _where(finite, u, torch.zeros_like(u)), updates)
        return updates, ApplyIfFiniteState(
            inner=where_tree(finite, inner, state.inner),
            loss_scale=state.loss_scale.update(finite),
            last_finite=finite,
        )

    update.wraps = tx  # type: ignore[attr-defined]
    return GradientTransformation(init, update)


def unwrapped(tx: GradientTransformation) -> list[GradientTransformation]:
    """`tx` and every optimizer it wraps, outermost first (wrappers mark their `update.wraps`)."""
    chain = [tx]
    while (inner := getattr(chain[-1].update, "wraps", None)) is not None:
        chain.append(inner)
    return chain


def find_state(opt_state: OptState, kind: type[Any]) -> Any:
    """The first state of type `kind` found by following wrapper states' `inner` (or None)."""
    node = opt_state
    while node is not None:
        if isinstance(node, kind):
            return node
        node = getattr(node, "inner", None)
    return None


@dataclasses.dataclass(frozen=True)
class AccumulationState:
    """State of `accumulate_gradients`, present only while one batch is split.

    Attributes:
        inner: the wrapped optimizer's state.
        acc: the weighted sum of this update's micro-batch gradients so far;
            None before the first micro-batch and after the update.
        weight: this micro-batch's share of the whole batch (0-d float32).
        final: whether this micro-batch completes the update (static: the
            deferring and the updating micro-batches compile separately).
        consumed: whether `update` already ran on this state (static), to
            refuse a second update in one micro-batch.
    """

    inner: OptState
    acc: PyTree | None
    weight: torch.Tensor
    final: bool = False
    consumed: bool = False


register_dataclass(AccumulationState, static=("final", "consumed"))


def accumulate_gradients(tx: GradientTransformation) -> GradientTransformation:
    """`tx` applied once to the weighted sum of a batch's micro-batch gradients.

    Each call adds `weight * grads` into `acc`; on a micro-batch that is not
    `final` it returns `None` updates (nothing to apply), on the final one
    the sum goes through `tx`. For a mean-reduced loss and weights equal to
    each micro-batch's share of the rows, the sum is the gradient of the
    whole batch. Used by `build(..., accumulate_grad_batches=n)`, which
    wraps and unwraps the state around each micro-batch.
    """

    def init(params: Params) -> OptState:
        raise TypeError(
            "accumulate_gradients is installed by lightfunc.build(..., accumulate_grad_batches=n) "
            "around each micro-batch; create the state with the plain optimizer."
        )

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        grads = updates
        if state.consumed:
            raise RuntimeError(
                "`apply_gradients` was called twice in one step under accumulate_grad_batches; "
                "the transform supports one optimizer update per step."
            )
        weighted = tree_map(lambda g: g * state.weight.to(g.dtype), grads)
        total = weighted if state.acc is None else tree_map(torch.add, state.acc, weighted)
        if not state.final:
            return None, dataclasses.replace(state, acc=total, consumed=True)
        updates, inner = tx.update(total, state.inner, params)
        return updates, dataclasses.replace(state, inner=inner, acc=None, consumed=True)

    update.wraps = tx  # type: ignore[attr-defined]
    return GradientTransformation(init, update)


def where_tree(flag: torch.Tensor, new: Any, old: Any) -> Any:
    """`new` where the 0-d bool `flag` holds, else `old`, tensor by tensor (inside compiled code)."""
    _, new_leaves = tree_walk(new)
    _, old_leaves = tree_walk(old)
    picked = [_where(flag, a, b) for a, b in zip(new_leaves, old_leaves, strict=True)]
    return tree_rebuild(new, iter(picked))


def _where(flag: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(a, dtensor):
        local = torch.where(flag, a.to_local(), b.to_local())
        return dtensor.from_local(
            local, a.device_mesh, a.placements, run_check=False, shape=a.shape, stride=a.stride()
        )
    return torch.where(flag, a, b)


def _agreed_finite(grads: Updates) -> torch.Tensor:
    """Whether every gradient is finite; for `DTensor` shards, agreed over their ranks."""
    _, leaves = tree_walk(grads)
    dtensor = dtensor_type()
    sharded = [g for g in leaves if dtensor is not None and isinstance(g, dtensor)]
    if not sharded:
        return all_finite(leaves)
    local = all_finite([g.to_local() if isinstance(g, dtensor) else g for g in leaves])
    import torch.distributed._functional_collectives as funcol

    agreed = funcol.all_reduce(local.to(torch.int32), "min", sharded[0].device_mesh)
    return funcol.wait_tensor(agreed).to(torch.bool)
