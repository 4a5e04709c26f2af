"""Fully-sharded data parallelism (ZeRO-3 storage) as a step transform.

    state = lightfunc.distributed.shard_state(state, mesh)   # params + optimizer state as DTensors
    step = lightfunc.build(lightfunc.distributed.fully_sharded(train_step, mesh))

Between steps every rank holds only its row chunk (`Shard(0)`) of each
parameter and of each optimizer-state tensor, as `DTensor`s: 1/N of the
memory. A step:

1. all-gathers the parameters (one flat collective per bucket) into plain,
   full tensors, and runs the user's step on them, unchanged:
   `lightfunc.value_and_grad` differentiates plain tensors with `torch.func`;
2. the optimizer it calls is wrapped: the full per-rank gradients are
   reduce-scattered (averaged, one collective per bucket) into this rank's
   chunks, and the real optimizer updates the chunks as `DTensor`s, so that
   anything global in it (`clip_by_global_norm`'s norm) is reduced over the
   ranks by DTensor, while elementwise math stays local;
3. the updated chunks are kept; the rest of the full parameters is dropped.

All of it is one graph under `torch.compile(fullgraph=True)`: all-gathers,
the user's forward and backward, reduce-scatters, the sharded update.

Why not DTensor parameters inside the differentiated function (torchtitan's
SimpleFSDP, gathering each parameter on use with
`redistribute(Replicate).to_local(grad_placements=[Partial])`): in torch
2.13 `torch.func.grad` cannot differentiate through DTensor or functional
collective autograd functions, so it would need `torch.autograd.grad`
inside `lightfunc.value_and_grad` and `trace_autograd_ops` for compiling.
Gathering at the step's boundary keeps the user's step and
`value_and_grad` as they are. The price: the full parameters and gradients
exist together during the step (the memory of a replicated step, plus
sharded optimizer state), instead of one layer's at a time.

The user's step must treat parameters after the optimizer update
elementwise (or leave them alone): rows outside this rank's chunk are not
updated in the full tensors it sees, and are discarded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from .._metrics import Reduction
from .._state import TrainState, map_train_states
from .._tree import PyTree, tree_flatten, tree_flatten_with_paths, tree_map, tree_unflatten
from ..optim._base import GradientTransformation, OptState, Params, Updates
from ..optim._wrappers import unwrapped
from . import _collectives
from ._mesh import Mesh
from ._states import average_buffers, check_bucket_cap, check_mesh, require_train_states
from ._states import reduce_metrics as _reduce

StepFn = Callable[[Any, Any], Any]


def shard_state(state: PyTree, mesh: Mesh) -> PyTree:
    """`state` with every `TrainState`'s params and optimizer state sharded over `mesh`.

    Tensors with at least one dimension become `DTensor`s sharded by rows
    (`Shard(0)`, torch.chunk's layout: the last ranks may hold fewer rows);
    0-d parameters become replicated `DTensor`s; 0-d optimizer-state tensors
    (step counts) and buffers stay plain and replicated. Rank 0's values
    are the ones kept (scattered from rank 0), so the ranks need not agree
    on the initial state beforehand. Every rank must call it. On a
    one-process mesh the state is returned unchanged.

    Raises:
        TypeError: `mesh` is not a `Mesh`, or the state holds no `TrainState`.
    """
    check_mesh(mesh, "shard_state")
    require_train_states(state, "shard_state")
    if not mesh.is_distributed:
        return state

    def shard(x: Any, *, replicate_scalars: bool) -> Any:
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return x
        if x.ndim == 0:
            if not replicate_scalars:
                return x
            return distribute_tensor(x, mesh.device_mesh, [Replicate()])
        return distribute_tensor(x, mesh.device_mesh, [Shard(0)])

    def shard_train_state(_: int, ts: TrainState) -> TrainState:
        return ts.replace(
            params=tree_map(functools.partial(shard, replicate_scalars=True), ts.params),
            opt_state=tree_map(functools.partial(shard, replicate_scalars=False), ts.opt_state),
        )

    return map_train_states(shard_train_state, state)


def gather_state(state: PyTree) -> PyTree:
    """`state` with every `DTensor` replaced by the full plain tensor (on every rank).

    For exporting, evaluating outside a sharded step, or comparing with a
    one-process run. Every rank must call it (it all-gathers).
    """

    def full(x: Any) -> Any:
        return x.full_tensor() if isinstance(x, DTensor) else x

    return tree_map(full, state)


def fully_sharded(
    train_step: StepFn,
    mesh: Mesh,
    *,
    bucket_cap_mb: float = 25.0,
    sync_buffers: bool = True,
    reduce_metrics: bool = True,
    metric_reductions: Mapping[str, Reduction] | None = None,
) -> StepFn:
    """A train step on parameters and optimizer state sharded by `shard_state` (ZeRO-3 storage).

    Same contract as `data_parallel`: each rank calls it on its own batch,
    and with equal batch sizes the parameters after every step equal a
    one-process run on the concatenated batch. See the module doc for how.

    Args:
        train_step: `train_step(state, batch) -> (state, metrics)`, written for
            one process (it sees plain, full parameters).
        mesh: the ranks; on a one-process mesh the step is returned unchanged.
        bucket_cap_mb: most megabytes per all-gather / reduce-scatter.
        sync_buffers: average floating buffers over the ranks after the step.
        reduce_metrics: reduce metrics over the ranks (floats averaged,
            integers summed, booleans OR-ed).

    Returns:
        A pure step function for `lightfunc.build`; its input and output
        states hold `DTensor` shards.

    Raises:
        TypeError: `mesh` is not a `Mesh`; at the first call, the state holds
            no `TrainState`, or its params were not sharded with `shard_state`.
    """
    check_mesh(mesh, "fully_sharded")
    cap = check_bucket_cap(bucket_cap_mb)
    if not mesh.is_distributed:
        return train_step

    @functools.wraps(train_step)
    def fsdp_step(state: PyTree, batch: Any) -> tuple[PyTree, Any]:
        originals = require_train_states(state, "fully_sharded")
        fulls = _gather_params(originals, mesh, cap, "fully_sharded")
        # A prepared state (`FSDP.prepare`) already updates its shards; an
        # unprepared one gets the sharded update for this call only.
        inner = map_train_states(
            lambda i, ts: ts.replace(
                params=fulls[i],
                tx=ts.tx
                if updates_shards(ts.tx)
                else _sharded_update(ts.tx, _layout(ts.params), mesh, cap, mark=False),
            ),
            state,
        )
        new_state, metrics = train_step(inner, batch)
        new_state = map_train_states(
            lambda i, ts: ts.replace(
                params=_keep_own_rows(ts.params, originals[i].params, mesh), tx=originals[i].tx
            ),
            new_state,
        )
        if sync_buffers:
            new_state = average_buffers(new_state, mesh, cap)
        if reduce_metrics:
            metrics = _reduce(metrics, batch, mesh, cap, metric_reductions)
        return new_state, metrics

    return fsdp_step


def fully_sharded_eval(
    eval_step: StepFn,
    mesh: Mesh,
    *,
    bucket_cap_mb: float = 25.0,
    metric_reductions: Mapping[str, Reduction] | None = None,
) -> StepFn:
    """An eval (or predict) step on a sharded state: parameters gathered, metrics reduced.

    The parameters are all-gathered for the call, as in `fully_sharded`;
    metrics (a dict of 0-d tensors) are reduced over the ranks like
    `data_parallel_eval`'s; other outputs are returned as they are.
    """
    check_mesh(mesh, "fully_sharded_eval")
    cap = check_bucket_cap(bucket_cap_mb)
    if not mesh.is_distributed:
        return eval_step

    @functools.wraps(eval_step)
    def fsdp_eval(state: PyTree, batch: Any) -> Any:
        originals = require_train_states(state, "fully_sharded_eval")
        fulls = _gather_params(originals, mesh, cap, "fully_sharded_eval")
        inner = map_train_states(lambda i, ts: ts.replace(params=fulls[i]), state)
        return _reduce(eval_step(inner, batch), batch, mesh, cap, metric_reductions)

    return fsdp_eval


def _gather_params(states: list[TrainState], mesh: Mesh, cap: int, transform: str) -> list[PyTree]:
    """Every state's params as full plain tensors: one all-gather per bucket over all of them."""
    specs, flat = [], []
    for ts in states:
        paths, leaves, spec = tree_flatten_with_paths(ts.params)
        for path, leaf in zip(paths, leaves, strict=True):
            _check_sharded(leaf, f"params.{path}", transform)
        specs.append((spec, len(leaves)))
        flat.extend(leaves)
    rows = [i for i, x in enumerate(flat) if _is_row_sharded(x)]
    gathered = _collectives.all_gather_rows(
        [flat[i].to_local() for i in rows], [flat[i].shape[0] for i in rows], mesh, cap
    )
    full: list[torch.Tensor] = [x.to_local() for x in flat]  # replicated ones are whole already
    for i, g in zip(rows, gathered, strict=True):
        full[i] = g
    out, start = [], 0
    for spec, n in specs:
        out.append(tree_unflatten(spec, full[start : start + n]))
        start += n
    return out


def prepare_sharded_update(state: PyTree, mesh: Mesh, *, bucket_cap_mb: float = 25.0) -> PyTree:
    """`state` (sharded by `shard_state`) with every `TrainState`'s optimizer updating its shards.

    What `FSDP(mesh).prepare` does after sharding: the optimizer is wrapped
    once for the run (idempotent), so that any wrapper put around it later
    (gradient accumulation) sees the full gradients, reduce-scattered once
    per update. The wrapper keeps only the parameters' layout (placements
    and shapes), never their tensors.
    """
    check_mesh(mesh, "prepare_sharded_update")
    cap = check_bucket_cap(bucket_cap_mb)
    if not mesh.is_distributed:
        return state

    def wrap(_: int, ts: TrainState) -> TrainState:
        if updates_shards(ts.tx):
            return ts
        return ts.replace(tx=_sharded_update(ts.tx, _layout(ts.params), mesh, cap, mark=True))

    return map_train_states(wrap, state)


def updates_shards(tx: GradientTransformation) -> bool:
    """Whether `tx` is wrapped by `prepare_sharded_update`."""
    return any(getattr(t.update, "shards_over", None) is not None for t in unwrapped(tx))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one parameter is sharded: a `DTensor`'s placements and global shape, no data."""

    device_mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    strides: tuple[int, ...]

    def stride(self) -> tuple[int, ...]:
        return self.strides


def _layout(sharded_params: PyTree) -> list[_Layout]:
    leaves, _ = tree_flatten(sharded_params)
    return [_Layout(d.device_mesh, tuple(d.placements), d.shape, d.stride()) for d in leaves]


def _sharded_update(
    tx: GradientTransformation, layout: list[_Layout], mesh: Mesh, cap: int, *, mark: bool
) -> GradientTransformation:
    """`tx` on this rank's chunks: full gradients in, reduce-scattered, updated, padded back out."""

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        g_leaves, spec = tree_flatten(updates)  # the full, per-rank gradients
        rows = [i for i, d in enumerate(layout) if _is_row_sharded(d)]
        whole = [i for i, d in enumerate(layout) if not _is_row_sharded(d)]
        local: list[torch.Tensor] = list(g_leaves)
        if rows:
            parts = _collectives.reduce_scatter_rows([g_leaves[i] for i in rows], mesh, "avg", cap)
            for i, part in zip(rows, parts, strict=True):
                local[i] = part
        if whole:
            parts = _collectives.all_reduce([g_leaves[i] for i in whole], mesh, "avg", cap)
            for i, part in zip(whole, parts, strict=True):
                local[i] = part
        grads_sh = tree_unflatten(
            spec, [_as_dtensor(x, d, mesh) for x, d in zip(local, layout, strict=True)]
        )
        params_sh = None
        if params is not None:
            p_leaves, p_spec = tree_flatten(params)
            params_sh = tree_unflatten(
                p_spec,
                [
                    _as_dtensor(_own_rows(p, d, mesh), d, mesh)
                    for p, d in zip(p_leaves, layout, strict=True)
                ],
            )
        updates_sh, state = tx.update(grads_sh, state, params_sh)
        if updates_sh is None:  # a wrapped accumulation deferred
            return None, state
        u_leaves, u_spec = tree_flatten(updates_sh)
        full = [_padded_update(u, d, mesh) for u, d in zip(u_leaves, layout, strict=True)]
        return tree_unflatten(u_spec, full), state

    update.wraps = tx  # type: ignore[attr-defined]
    if mark:  # a wrapper for the whole run (`prepare_sharded_update`), not for one call
        update.shards_over = mesh  # type: ignore[attr-defined]
    return GradientTransformation(tx.init, update)


def _keep_own_rows(params: PyTree, sharded: PyTree, mesh: Mesh) -> PyTree:
    """The new full params cut back to this rank's chunks, as DTensors laid out like `sharded`."""
    leaves, spec = tree_flatten(params)
    layout, _ = tree_flatten(sharded)
    return tree_unflatten(
        spec,
        [_as_dtensor(_own_rows(p, d, mesh), d, mesh) for p, d in zip(leaves, layout, strict=True)],
    )


def _own_rows(full: torch.Tensor, like: DTensor | _Layout, mesh: Mesh) -> torch.Tensor:
    if not _is_row_sharded(like):
        return full
    _, start, rows = _collectives.chunk_rows(like.shape[0], mesh.world_size, mesh.global_rank)
    return full[start : start + rows]


def _padded_update(u: Any, like: DTensor | _Layout, mesh: Mesh) -> torch.Tensor:
    """This rank's chunk of an update, as a full-size tensor that is zero outside the chunk."""
    if isinstance(u, DTensor):
        u = u.redistribute(like.device_mesh, like.placements).to_local()
    if not _is_row_sharded(like):
        return u
    _, start, rows = _collectives.chunk_rows(like.shape[0], mesh.world_size, mesh.global_rank)
    after = like.shape[0] - start - rows
    return torch.cat([u.new_zeros((start, *u.shape[1:])), u, u.new_zeros((after, *u.shape[1:]))])


def _as_dtensor(local: torch.Tensor, like: DTensor | _Layout, mesh: Mesh) -> DTensor:
    return DTensor.from_local(
        local,
        mesh.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _is_row_sharded(x: Any) -> bool:
    return isinstance(x, DTensor | _Layout) and any(isinstance(p, Shard) for p in x.placements)


def _check_sharded(leaf: Any, path: str, transform: str) -> None:
    if not isinstance(leaf, DTensor):
        raise TypeError(
            f"`{transform}` expects a state sharded with lightfunc.distributed.shard_state("
            f"state, mesh), but `{path}` is a plain {type(leaf).__name__}. Shard the state "
            f"once before the first step."
        )
    if any(
        not isinstance(p, Shard | Replicate) or (isinstance(p, Shard) and p.dim != 0)
        for p in leaf.placements
    ):
        raise ValueError(
            f"`{transform}` supports parameters sharded by rows (Shard(0)) or replicated; "
            f"`{path}` has placements {leaf.placements}. Shard the state with lightfunc.distributed.shard_state."
        )
