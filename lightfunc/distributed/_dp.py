"""Data parallelism as a step transform: each rank its own batch, gradients averaged in the graph.

    mesh = lightfunc.distributed.init_mesh()
    step = lightfunc.build(lightfunc.distributed.data_parallel(train_step, mesh))

Every rank holds the whole state and runs the user's step on its own slice
of the global batch. The gradients are averaged over the ranks between
`value_and_grad` and the optimizer: `data_parallel` hands the user's step a
state whose optimizer (`TrainState.tx`) first averages the gradients, in
flat buckets, with functional collectives, then runs the real optimizer.
`torch.compile` traces those collectives into the step's one graph. The
state that comes back holds the original optimizer again, so the transform
is invisible in the state's structure.

Why the optimizer and not `value_and_grad`: exactly the gradients that
update the parameters are averaged, however they were computed, and no
others (a gradient penalty's input gradients, a gradient-norm metric stay
per-rank); the user's step and `lightfunc.value_and_grad` need no switch;
and a transform inside `data_parallel` that calls the optimizer only on
some micro-batches (gradient accumulation) communicates only on those.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch.distributed.tensor import DTensor

from .._metrics import Reduction
from .._state import TrainState, map_train_states
from .._tree import PyTree, tree_flatten, tree_flatten_with_paths, tree_unflatten
from ..optim._base import GradientTransformation, OptState, Params, Updates, update_params
from ..optim._wrappers import unwrapped
from . import _collectives
from ._mesh import Mesh
from ._states import average_buffers, check_bucket_cap, check_mesh, require_train_states
from ._states import reduce_metrics as _reduce

StepFn = Callable[[Any, Any], Any]
_MEAN_OPS = {"mean": "avg", "sum": "sum"}


def reduce_gradients(
    tx: GradientTransformation,
    mesh: Mesh,
    *,
    op: str = "mean",
    bucket_cap_mb: float = 25.0,
) -> GradientTransformation:
    """`tx` preceded by an all-reduce of the gradients over `mesh`.

    `data_parallel` does this to every `TrainState`'s optimizer; use it
    directly for an optimizer kept outside a `TrainState`.

    Args:
        tx: the optimizer.
        mesh: the ranks to reduce over.
        op: "mean" (data parallelism over equal per-rank batches) or "sum".
        bucket_cap_mb: most megabytes per collective; the gradients are packed
            into flat buckets of one dtype, one all-reduce each.

    Returns:
        A `GradientTransformation` with `tx`'s state (the same `init`).
    """
    check_mesh(mesh, "reduce_gradients")
    if op not in _MEAN_OPS:
        raise ValueError(f"`op` must be 'mean' or 'sum', got {op!r}.")
    cap = check_bucket_cap(bucket_cap_mb)
    return tx if not mesh.is_distributed else _reduced(tx, mesh, cap, _MEAN_OPS[op])


def data_parallel(
    train_step: StepFn,
    mesh: Mesh,
    *,
    bucket_cap_mb: float = 25.0,
    sync_gradients: bool = True,
    sync_buffers: bool = True,
    reduce_metrics: bool = True,
    metric_reductions: Mapping[str, Reduction] | None = None,
) -> StepFn:
    """A train step that averages gradients over the ranks of `mesh` (DDP's semantics).

    Each rank calls the returned step on its own batch (its slice of the
    global batch: a `lightfunc.Loader(..., rank=mesh.global_rank,
    world_size=mesh.world_size)` or `setup_dataloader`). With equal batch
    sizes, the parameters after every step equal those of one process
    training on the concatenated batch (for a loss that is a mean over the
    batch). Every rank must start from the same state (seed the model the
    same way, or `state = mesh.broadcast(state)`).

    Args:
        train_step: `train_step(state, batch) -> (state, metrics)`; its state
            holds one or more `TrainState`s, whose optimizers get the
            averaged gradients.
        mesh: the ranks; on a one-process mesh the step is returned unchanged.
        bucket_cap_mb: most megabytes per all-reduce (one per bucket of one dtype).
        sync_gradients: False gives a step that communicates nothing: each
            rank's optimizer gets its own gradients, buffers and metrics stay
            per-rank. For micro-batches of an accumulation whose optimizer
            runs in a separate, synchronised step.
        sync_buffers: average floating buffers (BatchNorm running statistics)
            over the ranks after the step, keeping every rank's state equal.
            BatchNorm still normalises with each rank's own batch statistics.
        reduce_metrics: return metrics reduced over the ranks: floating
            metrics averaged, integer ones summed, booleans OR-ed.

    Returns:
        A pure step function with the same signature, for `lightfunc.build`.

    Raises:
        TypeError: `mesh` is not a `Mesh`; at the first call, the state holds
            no `TrainState`.

    Example:
        >>> mesh = lightfunc.distributed.init_mesh()                  # doctest: +SKIP
        >>> step = lightfunc.build(data_parallel(train_step, mesh))   # doctest: +SKIP
    """
    check_mesh(mesh, "data_parallel")
    cap = check_bucket_cap(bucket_cap_mb)
    if not mesh.is_distributed:
        return train_step

    @functools.wraps(train_step)
    def dp_step(state: PyTree, batch: Any) -> tuple[PyTree, Any]:
        if not sync_gradients:
            return train_step(state, batch)
        originals = require_train_states(state, "data_parallel")
        if all(reduces_gradients(ts.tx) for ts in originals):  # prepared: `DDP.prepare`
            new_state, metrics = train_step(state, batch)
        else:
            # Not prepared: reduce for this call only. Correct, but under
            # gradient accumulation it communicates on every micro-batch.
            inner = map_train_states(
                lambda i, ts: ts.replace(tx=_reduced(ts.tx, mesh, cap, "avg", mark=False)), state
            )
            new_state, metrics = train_step(inner, batch)
            new_state = map_train_states(lambda i, ts: ts.replace(tx=originals[i].tx), new_state)
        if sync_buffers:
            new_state = average_buffers(new_state, mesh, cap)
        if reduce_metrics:
            metrics = _reduce(metrics, batch, mesh, cap, metric_reductions)
        return new_state, metrics

    return dp_step


def data_parallel_eval(
    eval_step: StepFn,
    mesh: Mesh,
    *,
    bucket_cap_mb: float = 25.0,
    metric_reductions: Mapping[str, Reduction] | None = None,
) -> StepFn:
    """An eval step whose metrics are reduced over the ranks of `mesh`.

    Each rank evaluates its own slice of the data; floating metrics are
    averaged over the ranks (integer ones summed), so every rank gets the
    mean over the global batch when the ranks' batches have equal sizes.
    Outputs that are not a dict of 0-d tensors (a predict step's) are
    returned as they are. On a one-process mesh `eval_step` is returned unchanged.
    """
    check_mesh(mesh, "data_parallel_eval")
    cap = check_bucket_cap(bucket_cap_mb)
    if not mesh.is_distributed:
        return eval_step

    @functools.wraps(eval_step)
    def dp_eval(state: PyTree, batch: Any) -> Any:
        return _reduce(eval_step(state, batch), batch, mesh, cap, metric_reductions)

    return dp_eval


def prepare_gradient_reduction(state: PyTree, mesh: Mesh, *, bucket_cap_mb: float = 25.0) -> PyTree:
    """`state` with every `TrainState`'s optimizer averaging its gradients over `mesh` first.

    What `DDP(mesh).prepare` does (idempotent: an optimizer that already
    reduces is kept). Wrapping it, every rank takes rank 0's parameters,
    buffers and optimizer state, as torch's DistributedDataParallel does. The
    wrapper holds no state, so checkpoints are the same as one process's; on
    a one-process mesh the state is unchanged.
    """
    check_mesh(mesh, "prepare_gradient_reduction")
    cap = check_bucket_cap(bucket_cap_mb)
    map_train_states(_check_not_sharded, state)
    if not mesh.is_distributed:
        return state

    def wrap(_: int, ts: TrainState) -> TrainState:
        if reduces_gradients(ts.tx):
            return ts
        # As torch's DistributedDataParallel does when it wraps a module: every rank starts
        # from rank 0's parameters, buffers and optimizer state. Without it, ranks seeded
        # differently would each train their own weights while checkpoints kept rank 0's
        # (silently: averaged gradients do not pull them together). The broadcast checks the
        # trees first, so a model built differently on one rank is a ValueError naming it.
        params, buffers, opt_state = mesh.broadcast((ts.params, ts.buffers, ts.opt_state))
        return ts.replace(
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            tx=_reduced(ts.tx, mesh, cap, "avg"),
        )

    return map_train_states(wrap, state)


def _check_not_sharded(_index: int, ts: TrainState) -> TrainState:
    paths, leaves, _ = tree_flatten_with_paths(ts.params)
    sharded = [p for p, v in zip(paths, leaves, strict=True) if isinstance(v, DTensor)]
    if sharded:
        raise TypeError(
            f"DDP: this state's parameters are sharded DTensors (`{sharded[0]}`, ...): it was "
            f"prepared for FSDP. Data parallel holds whole tensors on every rank: prepare the "
            f"unsharded state with the DDP step, `step.prepare(state)` (or run the FSDP step "
            f"it was prepared for)."
        )
    return ts


def reduces_gradients(tx: GradientTransformation) -> bool:
    """Whether `tx` is an optimizer wrapped by `reduce_gradients` / `prepare_gradient_reduction`."""
    return any(getattr(t.update, "reduces_over", None) is not None for t in unwrapped(tx))


def _reduced(
    tx: GradientTransformation, mesh: Mesh, cap: int, op: str, *, mark: bool = True
) -> GradientTransformation:
    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        return tx.update(reduce(updates), state, params)

    def to_params(
        updates: Updates, state: OptState, params: Params, *, in_place: bool
    ) -> tuple[Any, OptState, bool]:
        return update_params(tx, reduce(updates), state, params, in_place=in_place)

    def reduce(updates: Updates) -> Updates:
        leaves, spec = tree_flatten(updates)
        return tree_unflatten(spec, _collectives.all_reduce(leaves, mesh, op, cap))

    update.wraps = tx  # type: ignore[attr-defined]
    update.to_params = to_params  # type: ignore[attr-defined]
    if mark:  # a wrapper for the whole run (`prepare_gradient_reduction`), not for one call
        update.reduces_over = mesh  # type: ignore[attr-defined]
    return GradientTransformation(tx.init, update)
