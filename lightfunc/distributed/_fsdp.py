"""Fully-sharded data parallelism (ZeRO-3) as a step transform, gathered one unit at a time.

    state = lightfunc.distributed.shard_state(state, mesh)   # params + optimizer state as DTensors
    step = lightfunc.build(lightfunc.distributed.fully_sharded(train_step, mesh))

Between steps every rank holds only its row chunk (`Shard(0)`) of each
parameter and of each optimizer-state tensor, as `DTensor`s whose local
tensors own their storage: 1/N of the bytes. The user's step is unchanged
and sees those shards as its parameters:

1. `lightfunc.apply` recognises sharded parameters and gathers them per
   unit (default: each child of an `nn.ModuleList` and each Transformer
   layer; `fully_sharded(..., units=...)` / `FSDP(mesh, units=...)` choose
   others): the parameters outside every unit once, at the start of the
   call, and each unit's in one all-gather right before the unit runs; they
   are dropped after it. The next unit's all-gather is issued as a unit
   starts, so that it travels while the unit computes (FSDP2's prefetch;
   at most one unit ahead). While a unit runs, saved-tensor hooks keep a token
   instead of any tensor in the gathered storage (a weight, or a view of
   it), and the unit is re-gathered once when its backward first needs it
   (with the re-gather of the unit before it issued at the same time).
   Under a "-mixed" precision the weights of `nn.Linear` / `nn.Conv*` layers
   are gathered in the compute dtype (autocast would cast them at their use
   anyway: the same values, half the bytes moved and held, and autocast
   keeps no extra copy for the backward); their gradients are reduced in
   float32.
2. `lightfunc.value_and_grad` sees the sharded leaves and differentiates
   with `torch.autograd.grad` over them; the gather's backward
   reduce-scatters (averages) each unit's gradients: the gradients come
   out as `DTensor` shards, already averaged over the ranks.
3. The optimizer updates the shards as `DTensor`s: elementwise math stays
   local; anything global (`clip_by_global_norm`'s norm) is reduced over the
   ranks by DTensor. No full-size gradient, update or parameter is built.

Why this way: `torch.func.grad` cannot differentiate through DTensor in
torch 2.13, and functorch disables saved-tensor hooks, so the eager step
uses `torch.autograd.grad`. The alternative that keeps `torch.func` (a
gather Function that re-runs each unit in its backward, as activation
checkpointing does) would cost a second forward of every unit and must
replay dropout's random draws; it was not built. Keeping tokens instead of
the gathered weights re-gathers but recomputes nothing. Measured
(bench/results/distributed.md, 25.5M-parameter GPT): the state is 1/N per
rank and the step's peak falls with N; see there for the comparison with
torch FSDP2 and where the remaining difference comes from.

Under `torch.compile`, dynamo traces neither hooks registered inside the
compiled region nor saved-tensor hooks, so a compiled step gathers all
parameters in one all-gather (float32), differentiates the full tensors
with `torch.func`, and reduce-scatters all gradients in one collective,
inside one graph. Its transient memory is the full parameters and
gradients (as a replicated step); the state between steps is still 1/N.
Gathering per unit inside the graph (SimpleFSDP) is not built: in torch
2.13 the functional collectives' autograd raises under `torch.func.grad`
(eager and compiled), so it needs `torch.autograd.grad` traced by dynamo
(`torch._dynamo.config.trace_autograd_ops=True`), the gathers attached to
the module before compiling (parametrizations), and a recompute policy so
the backward re-gathers instead of keeping every unit (see `lightfunc/_sharded_func.py`).

Compiled compute with per-unit gathers is the other route, and the one to
use: `lf.compile_regions(model)` compiles each block's `forward` (inductor)
and the step stays eager. The FSDP hooks run around the compiled forwards
(gather before, release after), AOTAutograd's compiled backward of a block
saves its gathered weights through `ctx.save_for_backward`, where the
saved-tensor hooks turn them into tokens, and the block is re-gathered for
its backward as in an eager step (tests/test_fsdp.py counts the gathers and
tokens). torchtitan pairs FSDP2 with per-block `torch.compile` the same way.

The policy (`units`, `gather_in_compute_dtype`) reaches `lf.apply` as a
`GatherPolicy` on torch's function-mode stack for the duration of the
step: `lf.apply` is called inside the user's step, where no argument of
the strategy can reach it, and a mode on that stack is no global.

Inside the differentiated function, a parameter used by a torch op
outside `lf.apply` (a temperature, an offset) is gathered on use
(`GatherOnUse`); elsewhere in the step the parameters are `DTensor`s, with
DTensor's global meaning (a norm is the whole parameter's norm).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from .._metrics import Reduction
from .._sharded_func import GatherOnUse, GatherPolicy, Units, check_units, gathered, unit_names
from .._state import TrainState, map_train_states
from .._tree import PyTree, tree_flatten, tree_flatten_with_paths, tree_map, tree_unflatten
from ..optim._base import GradientTransformation, OptState, Params, Updates, update_params
from ..optim._wrappers import unwrapped
from . import _collectives
from ._mesh import Mesh
from ._states import average_buffers, check_bucket_cap, check_mesh, require_train_states
from ._states import reduce_metrics as _reduce

StepFn = Callable[[Any, Any], Any]


def shard_state(state: PyTree, mesh: Mesh) -> PyTree:
    """`state` with every `TrainState`'s params and optimizer state sharded over `mesh`.

    Tensors with at least one dimension become `DTensor`s sharded by rows
    (`Shard(0)`, torch.chunk's layout: the last ranks may hold fewer rows),
    each rank's chunk in storage of its own; 0-d parameters become
    replicated `DTensor`s; 0-d optimizer-state tensors (step counts) and
    buffers stay plain and replicated. Rank 0's values are the ones kept
    (scattered from rank 0), so the ranks need not agree on the initial
    state beforehand. Tensors that are `DTensor`s already are kept. Every
    rank must call it. On a one-process mesh the state is returned unchanged.

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
        d = distribute_tensor(x, mesh.device_mesh, [Shard(0)])
        return _as_dtensor(_owned(d.to_local()), d)

    def like(template: Any, x: Any) -> Any:
        """`x` laid out as the optimizer would make it for sharded params (`template`)."""
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return x
        if isinstance(template, DTensor) and x.ndim == 0:  # a 0-d parameter's moment
            return distribute_tensor(x, mesh.device_mesh, [Replicate()])
        return shard(x, replicate_scalars=False)

    def shard_train_state(_: int, ts: TrainState) -> TrainState:
        params = tree_map(functools.partial(shard, replicate_scalars=True), ts.params)
        template = ts.tx.init(params)  # which 0-d entries the update makes DTensors
        try:
            opt_state = tree_map(like, template, ts.opt_state)
        except ValueError:  # a state not shaped like a fresh one: the plain rule
            opt_state = tree_map(functools.partial(shard, replicate_scalars=False), ts.opt_state)
        return ts.replace(params=params, opt_state=opt_state)

    return map_train_states(shard_train_state, state)


def gather_state(state: PyTree) -> PyTree:
    """`state` with every `DTensor` replaced by the full plain tensor (on every rank).

    For exporting, evaluating outside a sharded step, or comparing with a
    one-process run. Every rank must call it (it all-gathers).
    """

    def full(x: Any) -> Any:
        return x.full_tensor() if isinstance(x, DTensor) else x

    return tree_map(full, state)


def set_units(module: torch.nn.Module, units: Iterable[Any]) -> torch.nn.Module:
    """Mark which sub-modules of `module` gather their sharded parameters together.

    Prefer `FSDP(mesh, units=...)` (or `fully_sharded(..., units=...)`),
    which takes the same forms and needs no marking; this marks the model
    itself, for steps built without them and for `init_sharded`'s grouping,
    and stays for compatibility. A strategy's `units` wins over the mark.

    Args:
        module: the model (it is marked, not changed otherwise; a meta-device
            model works).
        units: sub-modules of `module`, their names (`"blocks.0"`), or module
            classes (every outermost instance is a unit). Empty: no units,
            every parameter gathered at the start of the call.

    Returns:
        `module`, marked.

    Raises:
        TypeError: `module` is not an `nn.Module`, or an entry is none of those.
        ValueError: a name or sub-module is not inside `module`.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"`module` must be a torch.nn.Module (the model), got {type(module).__name__}."
        )
    chosen = unit_names(module, check_units(list(units), "set_units"))
    object.__setattr__(module, "_lightfunc_units", tuple(chosen))  # read by lf.apply (unit_names)
    return module


def fully_sharded(
    train_step: StepFn,
    mesh: Mesh,
    *,
    bucket_cap_mb: float = 25.0,
    sync_buffers: bool = True,
    reduce_metrics: bool = True,
    metric_reductions: Mapping[str, Reduction] | None = None,
    units: Units = None,
    gather_in_compute_dtype: bool = True,
) -> StepFn:
    """A train step on parameters and optimizer state sharded by `shard_state` (ZeRO-3).

    Same contract as `data_parallel`: each rank calls it on its own batch,
    and with equal batch sizes the parameters after every step equal a
    one-process run on the concatenated batch. See the module doc for how.

    Args:
        train_step: `train_step(state, batch) -> (state, metrics)`, written for
            one process; it sees the sharded parameters, which `lf.apply` and
            `lf.value_and_grad` gather and reduce.
        mesh: the ranks; on a one-process mesh the step is returned unchanged.
        bucket_cap_mb: most megabytes per collective for buffers, metrics and
            gradients that arrive as plain tensors.
        sync_buffers: average floating buffers over the ranks after the step.
        reduce_metrics: reduce metrics over the ranks (floats averaged,
            integers summed, booleans OR-ed).
        units: which sub-modules `lf.apply` gathers together, one unit at a
            time: None (every child of an `nn.ModuleList` and every
            Transformer layer, or what `set_units` marked), a module class or
            a tuple of them (every outermost instance), a predicate
            `(name, module) -> bool`, or a list of sub-module names
            (`["blocks.0", "blocks.1"]`), sub-modules or classes; `[]`
            gathers every parameter at the start of the call.
        gather_in_compute_dtype: under a "-mixed" precision (autocast), gather
            the weights of `nn.Linear` / `nn.Conv*` layers in the compute dtype
            (bfloat16: half the bytes moved and held), the dtype autocast casts
            them to at their use anyway; their gradients are reduced in
            float32. Such a layer called where autocast is off then sees a
            bfloat16 weight: pass False for such a model.

    Returns:
        A pure step function for `lightfunc.build`; its input and output
        states hold `DTensor` shards.

    Raises:
        TypeError: `mesh` is not a `Mesh`, or `units` has none of the forms
            above; at the first call, the state holds no `TrainState`, or its
            params were not sharded with `shard_state`.
        ValueError: at the first call, `units` names a sub-module the model
            given to `lf.apply` does not have.
    """
    check_mesh(mesh, "fully_sharded")
    cap = check_bucket_cap(bucket_cap_mb)
    check_units(units, "fully_sharded")
    policy = _policy_for(units, gather_in_compute_dtype, "fully_sharded")
    if not mesh.is_distributed:
        return train_step

    @functools.wraps(train_step)
    def fsdp_step(state: PyTree, batch: Any) -> tuple[PyTree, Any]:
        originals = require_train_states(state, "fully_sharded")
        for ts in originals:
            _check_params(ts.params, "fully_sharded")
        # A prepared state (`FSDP.prepare`) already has the sharded update; an
        # unprepared one gets it for this call only.
        inner = map_train_states(
            lambda i, ts: (
                ts
                if updates_shards(ts.tx)
                else ts.replace(
                    tx=_sharded_update(ts.tx, _layout(ts.params), mesh, cap, mark=False)
                )
            ),
            state,
        )
        with _in_force(policy):
            new_state, metrics = train_step(inner, batch)
        new_state = map_train_states(lambda i, ts: ts.replace(tx=originals[i].tx), new_state)
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
    units: Units = None,
    gather_in_compute_dtype: bool = True,
) -> StepFn:
    """An eval (or predict) step on a sharded state: gathered per unit by `lf.apply`, metrics reduced.

    Eager, `lf.apply` gathers one unit at a time and parameters used outside
    it are gathered on use; compiled, every parameter is gathered at the
    start of the call. Metrics (a dict of 0-d tensors) are reduced over the ranks like
    `data_parallel_eval`'s; other outputs are returned as they are. `units`
    and `gather_in_compute_dtype` as for `fully_sharded`.
    """
    check_mesh(mesh, "fully_sharded_eval")
    cap = check_bucket_cap(bucket_cap_mb)
    check_units(units, "fully_sharded_eval")
    policy = _policy_for(units, gather_in_compute_dtype, "fully_sharded_eval")
    if not mesh.is_distributed:
        return eval_step

    @functools.wraps(eval_step)
    def fsdp_eval(state: PyTree, batch: Any) -> Any:
        for ts in require_train_states(state, "fully_sharded_eval"):
            _check_params(ts.params, "fully_sharded_eval")
        if torch.compiler.is_compiling():  # no hooks in a graph: every parameter at once
            out = eval_step(
                map_train_states(lambda _, ts: ts.replace(params=gathered(ts.params)), state), batch
            )
        else:
            with _in_force(policy), GatherOnUse():  # used outside `lf.apply`: gathered on use
                out = eval_step(state, batch)
        return _reduce(out, batch, mesh, cap, metric_reductions)

    return fsdp_eval


def _policy_for(units: Units, compute_dtype: bool, where: str) -> GatherPolicy:
    if not isinstance(compute_dtype, bool):
        raise TypeError(
            f"`{where}(gather_in_compute_dtype=...)` must be True or False, got "
            f"{type(compute_dtype).__name__} {compute_dtype!r}."
        )
    return GatherPolicy(units, compute_dtype=compute_dtype)


def _in_force(policy: GatherPolicy) -> Any:
    """`policy` on torch's mode stack for the call (eager; a compiled step gathers all at once).

    The default policy is what `lf.apply` assumes when it finds none, so it
    is not pushed: a mode on the stack costs a Python call per torch op.
    """
    default = policy.units is None and policy.compute_dtype
    return contextlib.nullcontext() if default or torch.compiler.is_compiling() else policy


def prepare_sharded_update(state: PyTree, mesh: Mesh, *, bucket_cap_mb: float = 25.0) -> PyTree:
    """`state` (sharded by `shard_state`) with every `TrainState`'s optimizer updating its shards.

    What `FSDP(mesh).prepare` does after sharding: the optimizer is wrapped
    once for the run (idempotent). Gradients from `lf.value_and_grad` arrive
    as averaged shards and go straight to the optimizer; plain per-rank
    gradients (a step that builds them itself, full-size) are averaged and
    cut to this rank's rows first, bucketed. The wrapper keeps only the
    parameters' layout (placements and shapes), never their tensors.
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
    """`tx` on this rank's shards; plain full gradients are averaged into shards first."""

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        return tx.update(sharded(updates), state, params)

    def to_params(
        updates: Updates, state: OptState, params: Params, *, in_place: bool
    ) -> tuple[Any, OptState, bool]:
        return update_params(tx, sharded(updates), state, params, in_place=in_place)

    def sharded(updates: Updates) -> Updates:
        g_leaves, spec = tree_flatten(updates)
        plain = [i for i, g in enumerate(g_leaves) if not isinstance(g, DTensor)]
        if not plain:
            return updates
        g_leaves = list(g_leaves)
        _average_plain(g_leaves, plain, layout, mesh, cap)
        return tree_unflatten(spec, g_leaves)

    update.wraps = tx  # type: ignore[attr-defined]
    update.to_params = to_params  # type: ignore[attr-defined]
    if mark:  # a wrapper for the whole run (`prepare_sharded_update`), not for one call
        update.shards_over = mesh  # type: ignore[attr-defined]
    return GradientTransformation(tx.init, update)


def _average_plain(
    grads: list[Any], indices: list[int], layout: list[_Layout], mesh: Mesh, cap: int
) -> None:
    """Replace the plain, full per-rank gradients at `indices` by averaged DTensor shards."""
    rows = [i for i in indices if _is_row_sharded(layout[i])]
    whole = [i for i in indices if not _is_row_sharded(layout[i])]
    parts = _collectives.reduce_scatter_rows([grads[i] for i in rows], mesh, "avg", cap)
    parts += _collectives.all_reduce([grads[i] for i in whole], mesh, "avg", cap)
    for i, part in zip(rows + whole, parts, strict=True):
        grads[i] = _as_dtensor(part, layout[i])


def _owned(local: torch.Tensor) -> torch.Tensor:
    """`local` in storage of its own size (a chunk view would keep its whole source alive)."""
    if local.untyped_storage().nbytes() > local.numel() * local.element_size():
        return local.clone()
    return local


def _as_dtensor(local: torch.Tensor, like: DTensor | _Layout) -> DTensor:
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _is_row_sharded(x: Any) -> bool:
    return isinstance(x, DTensor | _Layout) and any(isinstance(p, Shard) for p in x.placements)


def _check_params(params: PyTree, transform: str) -> None:
    paths, leaves, _ = tree_flatten_with_paths(params)
    for path, leaf in zip(paths, leaves, strict=True):
        _check_sharded(leaf, f"params.{path}", transform)


def _check_sharded(leaf: Any, path: str, transform: str) -> None:
    if not isinstance(leaf, DTensor):
        raise TypeError(
            f"`{transform}` expects a sharded state, but `{path}` is a plain "
            f"{type(leaf).__name__}. Shard the state once before the first step: "
            f"`state = step.prepare(state)` for a step built with `strategy=lfd.FSDP(mesh)` "
            f"(`loop` and `fit` do it), or lightfunc.distributed.shard_state(state, mesh)."
        )
    if any(
        not isinstance(p, Shard | Replicate) or (isinstance(p, Shard) and p.dim != 0)
        for p in leaf.placements
    ):
        raise ValueError(
            f"`{transform}` supports parameters sharded by rows (Shard(0)) or replicated; "
            f"`{path}` has placements {leaf.placements}. Shard the state with lightfunc.distributed.shard_state."
        )
