"""Sharded parameters (FSDP) as function inputs: gathered one unit at a time.

What `lightfunc._func.apply` and `value_and_grad` do when the parameters they
are given are `DTensor` row shards (`lightfunc.distributed.FSDP`): see the
comment below for how. Split out of `_func.py`, which calls `_apply_sharded`,
`_grad_sharded` and `_grad_gathered`; `lightfunc.distributed` reads the units
(`unit_names`, `check_units`, `GatherPolicy`) and `gathered` from here.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from ._tree import tree_detach, tree_flatten, tree_leaves, tree_map, tree_unflatten

Params = dict[str, torch.Tensor]
Buffers = dict[str, torch.Tensor]

# ---- Sharded parameters (FSDP): gathered one unit at a time ----------------------------------
#
# Under `lightfunc.distributed.FSDP` the parameters a step sees are `DTensor` row
# shards (`Shard(0)`). `apply` and `value_and_grad` recognise them (data-driven:
# no flag, no global) and never build the whole model's parameters at once in
# an eager step:
#
# - `apply` gathers the parameters that belong to no unit once, then each unit's
#   (default: every child of an `nn.ModuleList` and every Transformer layer;
#   `FSDP(mesh, units=...)` chooses others through a `GatherPolicy` on torch's
#   function-mode stack) in a forward pre-hook, right before the unit runs, and
#   drops them after it; the next unit's gather is issued as one unit starts, so
#   that it travels while that unit computes (`_Schedule`, as FSDP2 prefetches).
#   The gather is an autograd Function whose backward
#   reduce-scatters (averages) the unit's gradients into shards. Under autocast,
#   Linear / Conv weights travel and live in autocast's dtype (`_gather_dtypes`).
#   While the unit runs, saved-tensor hooks replace any tensor autograd would
#   keep that lives in the gathered storage (a weight, or a view of it) by a
#   token, and the backward re-gathers the unit once when it first needs one
#   (issuing the re-gather of the unit before it in the forward at the same time).
# - `value_and_grad` differentiates with `torch.autograd.grad` over the shards
#   (`torch.func.grad` cannot differentiate through DTensor, and functorch
#   disables saved-tensor hooks), and returns averaged `DTensor` shard gradients.
#
# Under `torch.compile` the step gathers all of it at once instead: one
# all-gather, `torch.func` on the full tensors, one reduce-scatter. Per unit
# inside the graph is blocked in torch 2.13 by: module hooks registered inside
# the compiled region and saved-tensor hooks are not traced; the functional
# collectives' autograd (a generated autograd.Function without `setup_context`)
# raises under `torch.func.grad`, eager or compiled. What does trace (probed on
# 2 gloo ranks, fullgraph, gradients equal to one process): gathers placed at
# each parameter's use by parametrizations registered on the module before
# compiling, differentiated with `torch.autograd.grad` under
# `torch._dynamo.config.trace_autograd_ops=True`. That needs the module before
# the compile and a recompute policy for the backward's re-gather (SimpleFSDP's).


def _dtensor_type() -> Any:
    """`DTensor`, if torch.distributed.tensor is loaded (else no DTensor can exist)."""
    if "torch.distributed.tensor" not in sys.modules:
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_row_shard(x: Any) -> bool:
    dtensor = _dtensor_type()
    return (
        dtensor is not None
        and isinstance(x, dtensor)
        and any(getattr(p, "dim", None) == 0 for p in x.placements)
    )


def _has_shards(tree: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(x, dtensor) for x in tree_leaves(tree))


def _chunk(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """(rows per chunk, rows of `rank`'s chunk): torch.chunk's layout, as `Shard(0)`."""
    chunk = -(-rows // world_size) if rows else 0
    start = min(rank * chunk, rows)
    return chunk, min(start + chunk, rows) - start


def _wait(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, funcol.AsyncCollectiveTensor):
        return t.wait()
    return funcol.wait_tensor(t)


class _InFlight:
    """An all-gather of DTensor row shards, issued: `finish()` waits and returns the full tensors.

    `dtypes` (default: the shards' own) is the dtype each tensor travels and
    arrives in: a shard is cast before the gather, so a bfloat16 gather moves
    and holds half the bytes. Mixed dtypes travel as the bytes of one buffer,
    still one collective. Issued at construction (eager functional
    collectives run in the background), so the next unit's gather can be on
    its way while the current unit computes (`_Schedule`).
    """

    __slots__ = ("dtypes", "order", "shards", "sizes", "table", "waited")

    def __init__(self, shards: Sequence[Any], dtypes: Sequence[torch.dtype] | None = None) -> None:
        mesh, world = shards[0].device_mesh, shards[0].device_mesh.size()
        with torch.no_grad():
            locals_ = [d.to_local() for d in shards]
        self.shards = shards
        self.dtypes = list(dtypes) if dtypes is not None else [x.dtype for x in locals_]
        padded = []
        for x, d, dtype in zip(locals_, shards, self.dtypes, strict=True):
            chunk, _ = _chunk(d.shape[0], world, 0)
            x = x.to(dtype)
            pad = (
                x
                if x.shape[0] == chunk
                else torch.cat([x, x.new_zeros(chunk - x.shape[0], *x.shape[1:])])
            )
            padded.append(pad.reshape(-1))
        self.order: list[int] | None = None
        if len(set(self.dtypes)) == 1:
            flat = torch.cat(padded)
            self.sizes = [p.numel() for p in padded]
        else:  # as bytes, the widest dtypes first so that every part stays aligned
            self.order = sorted(range(len(padded)), key=lambda i: -padded[i].element_size())
            raw = [padded[i].view(torch.uint8) for i in self.order]
            row = sum(r.numel() for r in raw)
            raw.append(raw[0].new_zeros(-row % 8))
            flat = torch.cat(raw)
            self.sizes = [r.numel() for r in raw[:-1]]
        self.table = funcol.all_gather_single(flat, 0, mesh)
        self.waited = False

    def wait(self) -> None:
        """Wait for the collective (idempotent), without copying anything out."""
        if not self.waited:
            self.table, self.waited = _wait(self.table), True

    def finish(self) -> list[torch.Tensor]:
        """The full tensors, each copied into its own storage (the buffer is freed at once,
        and each tensor can be recognised by its storage)."""
        self.wait()
        table = self.table.view(self.shards[0].device_mesh.size(), -1)
        if self.order is None:
            parts = list(table.split(self.sizes, dim=1))
        else:
            parts = [torch.empty(0)] * len(self.sizes)
            start = 0
            for i, size in zip(self.order, self.sizes, strict=True):
                parts[i] = table[:, start : start + size].view(self.dtypes[i])
                start += size
        return [
            part.reshape(-1, *d.shape[1:])[: d.shape[0]].contiguous()
            for part, d in zip(parts, self.shards, strict=True)
        ]


def _gather_rows(
    shards: Sequence[Any], dtypes: Sequence[torch.dtype] | None = None
) -> list[torch.Tensor]:
    """The full tensors of DTensor row shards `shards`: one all-gather (see `_InFlight`)."""
    return _InFlight(shards, dtypes).finish()


def _scatter_rows(fulls: Sequence[torch.Tensor], shards: Sequence[Any]) -> list[torch.Tensor]:
    """Each rank's averaged row chunk of the per-rank `fulls`: one reduce-scatter.

    Waited for at once. (Left in flight until the next unit's, as FSDP2
    does, the chunks would be `AsyncCollectiveTensor` views until the end of
    the backward, and turning them back into plain `DTensor` shards cost
    more CPU time than the overlap saved on the 2-core gloo bench.)
    """
    mesh, world = shards[0].device_mesh, shards[0].device_mesh.size()
    rank = mesh.get_local_rank()
    tables = []
    for g, d in zip(fulls, shards, strict=True):
        g = g.to(d.dtype)  # reduced in the parameters' dtype (float32 after a bfloat16 gather)
        chunk, _ = _chunk(d.shape[0], world, 0)
        pad = chunk * world - g.shape[0]
        g = torch.cat([g, g.new_zeros(pad, *g.shape[1:])]) if pad else g
        tables.append(g.reshape(world, -1))
    flat = torch.cat(tables, dim=1).reshape(-1)
    parts = _wait(funcol.reduce_scatter_single(flat, "avg", 0, mesh)).split(
        [t.shape[1] for t in tables]
    )
    return [
        part.view(-1, *d.shape[1:])[: _chunk(d.shape[0], world, rank)[1]]
        for part, d in zip(parts, shards, strict=True)
    ]


class _Gather(torch.autograd.Function):
    """Row shards in, full tensors out; the backward reduce-scatters (averages) the gradients.

    The all-gather itself is issued before (`_InFlight`, possibly while the
    previous unit ran); the forward waits for it and copies the tensors out.
    """

    @staticmethod
    def forward(ctx: Any, inflight: _InFlight, *locals_: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.shards = inflight.shards  # DTensors: the layout, and the state's own shards (no copy)
        return tuple(inflight.finish())

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, *_scatter_rows(grads, ctx.shards))


def _gather(
    shards: Sequence[Any],
    dtypes: Sequence[torch.dtype] | None = None,
    inflight: _InFlight | None = None,
) -> list[torch.Tensor]:
    """Full tensors of DTensor row shards; differentiable when the shards require grad.

    `inflight`: their all-gather, if already issued (with these `dtypes`).
    """
    inflight = inflight if inflight is not None else _InFlight(shards, dtypes)
    if torch.is_grad_enabled() and any(d.requires_grad for d in shards):
        locals_ = [d.to_local() for d in shards]
        return list(_Gather.apply(inflight, *locals_))
    return inflight.finish()


def _whole(x: Any) -> Any:
    """A replicated DTensor's local value, its gradient averaged over the ranks."""
    from torch.distributed.tensor import Partial

    return x.to_local(grad_placements=[Partial("avg")])


#: What chooses the units: None (the default), a module class or a tuple of them,
#: a predicate `(name, sub_module) -> bool`, or a list of sub-module names,
#: sub-modules and classes.
Units = Any


def check_units(units: Units, where: str) -> Units:
    """`units` if it has one of the accepted forms (see `Units`), else a TypeError."""
    if units is None or _is_module_class(units) or _is_class_tuple(units):
        return units
    if callable(units) and not isinstance(units, torch.nn.Module):
        return units
    if isinstance(units, list | tuple) and all(
        isinstance(u, str | torch.nn.Module) or _is_module_class(u) for u in units
    ):
        return units
    raise TypeError(
        f"`{where}(units=...)` takes None (every child of an nn.ModuleList and every "
        f"Transformer layer), an nn.Module class or a tuple of them, a predicate "
        f"(name, module) -> bool, or a list of sub-module names (e.g. ['blocks.0', "
        f"'blocks.1']), sub-modules or classes; got {_describe_units(units)}."
    )


def _is_module_class(u: Any) -> bool:
    return isinstance(u, type) and issubclass(u, torch.nn.Module)


def _is_class_tuple(u: Any) -> bool:
    return isinstance(u, tuple) and bool(u) and all(_is_module_class(c) for c in u)


def _describe_units(units: Any) -> str:
    if isinstance(units, list | tuple):
        bad = next(
            (u for u in units if not (isinstance(u, str | torch.nn.Module) or _is_module_class(u))),
            None,
        )
        return f"a {type(units).__name__} holding {type(bad).__name__} {bad!r}"
    return f"{type(units).__name__} {units!r}"


def unit_names(module: torch.nn.Module, units: Units = None) -> list[str]:
    """Qualified names of the sub-modules whose sharded parameters are gathered together.

    `units` (see `Units`; `FSDP(mesh, units=...)` passes it): a class or a
    predicate chooses the outermost sub-modules it matches (a match's own
    sub-modules are not looked at); a list names them, as names
    (`"blocks.0"`), sub-modules or classes. None: what
    `lightfunc.distributed.set_units` marked on `module`, else every child
    of an `nn.ModuleList` and every `nn.TransformerEncoderLayer` /
    `nn.TransformerDecoderLayer` (the outermost ones).

    Raises:
        ValueError: a name or sub-module in `units` is not inside `module`.
    """
    if units is None:
        chosen = getattr(module, "_lightfunc_units", None)
        if chosen is not None:
            return list(chosen)
        layers = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
        return _outermost(
            module,
            lambda name, m, parent: (
                isinstance(parent, torch.nn.ModuleList) or isinstance(m, layers)
            ),
        )
    if _is_module_class(units) or _is_class_tuple(units):
        return _outermost(module, lambda name, m, parent: isinstance(m, units))
    if not isinstance(units, list | tuple):
        return _outermost(module, lambda name, m, parent: bool(units(name, m)))
    names = {id(m): name for name, m in module.named_modules() if name}
    known = set(names.values())
    chosen_names: list[str] = []
    for u in units:
        if isinstance(u, str) and u in known:
            chosen_names.append(u)
        elif isinstance(u, torch.nn.Module) and id(u) in names:
            chosen_names.append(names[id(u)])
        elif not _is_module_class(u):
            # In the model's order (a set's order differs from rank to rank).
            some = ", ".join(repr(n) for n in list(dict.fromkeys(names.values()))[:6])
            given = repr(u) if isinstance(u, str) else f"a {type(u).__name__} sub-module"
            raise ValueError(
                f"`units` holds {given}, which is not inside the {type(module).__name__} "
                f"given to lf.apply (its sub-modules include {some}). Pass names from "
                f"`model.named_modules()`, sub-modules of that model, or classes."
            )
    classes = tuple(u for u in units if _is_module_class(u))
    if classes:
        inside = tuple(c + "." for c in chosen_names)
        chosen_names += [
            n
            for n in _outermost(module, lambda name, m, parent: isinstance(m, classes))
            if n not in chosen_names and not n.startswith(inside)
        ]
    return chosen_names


def _outermost(module: torch.nn.Module, match: Callable[[str, Any, Any], bool]) -> list[str]:
    """Names of the outermost sub-modules for which `match(name, sub_module, parent)` holds."""
    out: list[str] = []

    def walk(prefix: str, m: torch.nn.Module) -> None:
        for name, child in m.named_children():
            if match(prefix + name, child, m):
                out.append(prefix + name)
            else:
                walk(f"{prefix}{name}.", child)

    walk("", module)
    return out


class _Token:
    """What a unit's saved-tensor hook keeps instead of a view of a gathered parameter."""

    __slots__ = ("index", "offset", "size", "stride")

    def __init__(self, index: int, t: torch.Tensor) -> None:
        self.index, self.size, self.stride, self.offset = (
            index,
            t.size(),
            t.stride(),
            t.storage_offset(),
        )


class _Unit:
    """One unit of an `lf.apply` call: its sub-module, its shards, their names inside it."""

    __slots__ = ("local_names", "module", "owners", "shards")

    def __init__(self, module: torch.nn.Module, local_names: list[str], shards: list[Any]) -> None:
        self.module, self.local_names, self.shards = module, local_names, shards
        self.owners = [_owner(module, n) for n in local_names]


class _Run:
    """One forward of a unit with autograd on: what its backward re-gathers, and when."""

    __slots__ = ("__weakref__", "dtypes", "full", "shards", "tokens")

    def __init__(self, shards: list[Any], dtypes: list[torch.dtype]) -> None:
        self.shards, self.dtypes = shards, dtypes
        self.tokens = 0  # tensors of the gathered storage that autograd saved as tokens
        self.full: list[torch.Tensor] | None = None  # re-gathered by the first unpack


class _Schedule:
    """The collectives of one `lf.apply` call that run ahead of their use, as FSDP2's do.

    - Forward: while unit i runs, unit i+1's all-gather is on its way (the
      units in the order the model registers them; a unit that runs out of
      that order finds no gather ahead for it, waits for the one in flight,
      drops it and gathers its own: correct, one wasted collective).
    - Backward (`backward=True`, only under `lf.value_and_grad`, which calls
      `drain` when the backward is done): when a unit's backward re-gathers
      it, the re-gather of the unit that ran before it in the forward is
      issued too. (Reduce-scatters are waited for at once: see `_scatter_rows`.)

    Every rank runs the same model, so every rank issues the same
    collectives in the same order, as without the schedule. At most one
    gather is ahead at any time: one unit's parameters more than a
    synchronous schedule holds. Measured on the 2-core gloo bench
    (bench/results/distributed.md): no measurable change in step time (per
    step 0.97x-1.04x the synchronous schedule's, within the spread), as a
    collective there cannot run beside the compute without taking a core
    from a rank; on devices whose collectives run beside the compute, this
    is what overlaps them.
    """

    def __init__(self, backward: bool) -> None:
        self.backward = backward
        self.ahead: tuple[Any, _InFlight] | None = None
        self.runs: list[weakref.ref[_Run]] = []

    def take(self, key: Any) -> _InFlight | None:
        """The gather issued ahead for `key`, else None (any other in flight is waited, dropped)."""
        ahead, self.ahead = self.ahead, None
        if ahead is None:
            return None
        if ahead[0] is key or (isinstance(key, tuple) and ahead[0] == key):
            return ahead[1]
        ahead[1].wait()
        return None

    def issue(self, key: Any, shards: list[Any], dtypes: list[torch.dtype]) -> None:
        self.drop()
        self.ahead = (key, _InFlight(shards, dtypes))

    def drop(self) -> None:
        if self.ahead is not None:
            self.ahead[1].wait()
            self.ahead = None

    def regather(self, run: _Run) -> list[torch.Tensor]:
        """`run`'s parameters again, for its backward; the previous run's re-gather goes ahead."""
        inflight = self.take(run) or _InFlight(run.shards, run.dtypes)
        if self.backward:
            at = next(i for i, r in enumerate(self.runs) if r() is run)
            for ref in reversed(self.runs[:at]):
                prev = ref()
                if prev is not None and prev.tokens and prev.full is None:
                    self.issue(prev, prev.shards, prev.dtypes)
                    break
        return inflight.finish()

    def drain(self) -> None:
        """Wait for the gather still in flight (the backward is over, or failed)."""
        self.drop()


def _unit_hooks(plan: list[_Unit], at: int, policy: GatherPolicy, schedule: _Schedule) -> list[Any]:
    """Forward hooks on unit `plan[at]`: gather its shards before it runs, release them after.

    The gather was issued while the previous unit ran, if the schedule
    guessed right; this unit's issues the next unit's.
    """
    unit = plan[at]
    stacks: list[contextlib.ExitStack] = []

    def before(_: torch.nn.Module, __: Any) -> None:
        dtypes = _gather_dtypes(unit.owners, unit.shards, policy)  # autocast's state as it runs
        key = (at, *dtypes)
        inflight = schedule.take(key) or _InFlight(unit.shards, dtypes)
        if at + 1 < len(plan):
            following = plan[at + 1]
            ahead = _gather_dtypes(following.owners, following.shards, policy)
            schedule.issue((at + 1, *ahead), following.shards, ahead)
        full = _gather(unit.shards, dtypes, inflight)
        stack = contextlib.ExitStack()
        stack.enter_context(
            _reparametrize_module(unit.module, dict(zip(unit.local_names, full, strict=True)))
        )
        if torch.is_grad_enabled():
            run = _Run(unit.shards, dtypes)
            schedule.runs.append(weakref.ref(run))
            storages = {t.untyped_storage().data_ptr(): i for i, t in enumerate(full)}
            stack.enter_context(
                torch.autograd.graph.saved_tensors_hooks(*_releasing(storages, run, schedule))
            )
        stacks.append(stack)

    def after(*_: Any) -> None:
        stacks.pop().close()

    return [
        unit.module.register_forward_pre_hook(before),
        unit.module.register_forward_hook(after, always_call=True),
    ]


def _releasing(
    storages: dict[int, int], run: _Run, schedule: _Schedule
) -> tuple[Callable[..., Any], ...]:
    """Saved-tensor hooks: gathered storage is kept as a token and re-gathered once in backward."""

    def pack(t: torch.Tensor) -> Any:
        index = storages.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if index is None:
            return t
        run.tokens += 1
        return _Token(index, t)

    def unpack(saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Token):
            return saved
        if run.full is None:  # the unit's backward: one all-gather for all of its nodes
            with torch.no_grad():
                run.full = schedule.regather(run)
        return run.full[saved.index].as_strided(saved.size, saved.stride, saved.offset)

    return pack, unpack


class GatherOnUse(TorchFunctionMode):
    """Outside `apply`, a DTensor shard used by any torch op is its full tensor, gathered once.

    What lets a sharded step use parameters directly (a temperature, an
    offset added to the logits) as a one-process step does. The gradient
    flows back through the gather (reduce-scattered, averaged).
    """

    def __init__(self, *, backward: bool = False) -> None:
        super().__init__()
        self.paused = 0  # > 0 inside `apply`, which gathers per unit itself
        self.full: dict[int, tuple[Any, torch.Tensor]] = {}
        # `lf.value_and_grad`'s (backward=True) drains, after its backward, the schedules of
        # the `apply` calls inside, which may then leave collectives in flight.
        self.backward = backward
        self.schedules: list[_Schedule] = []

    def drain(self) -> None:
        """Wait for the collectives the `apply` calls inside left in flight."""
        for schedule in self.schedules:
            schedule.drain()
        self.schedules.clear()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        dtensor = _dtensor_type()
        if self.paused or not any(isinstance(x, dtensor) for x in tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        args, kwargs = tree_map(self._full, (args, kwargs))
        return func(*args, **kwargs)

    def _full(self, x: Any) -> Any:
        if not isinstance(x, _dtensor_type()):
            return x
        if id(x) not in self.full:
            self.full[id(x)] = (x, _gather([x])[0] if _is_row_shard(x) else _whole(x))
        return self.full[id(x)][1]


@contextlib.contextmanager
def _paused() -> Any:
    modes = [m for m in _get_current_function_mode_stack() if isinstance(m, GatherOnUse)]
    for m in modes:
        m.paused += 1
    try:
        yield
    finally:
        for m in modes:
            m.paused -= 1


class GatherPolicy(TorchFunctionMode):
    """How `lf.apply` gathers sharded parameters, set by the FSDP step around the user's step.

    A mode on torch's function-mode stack (where `lf.apply` finds it; no
    global), passing every torch call through unchanged.

    Args:
        units: which sub-modules gather together (see `Units`, `unit_names`).
        compute_dtype: under autocast, gather the parameters of `nn.Linear`
            and `nn.Conv*` layers (their own `forward`) in autocast's dtype,
            the dtype autocast would cast them to anyway; their gradients are
            reduced in the parameters' dtype.
    """

    def __init__(self, units: Units = None, *, compute_dtype: bool = True) -> None:
        super().__init__()
        self.units = units
        self.compute_dtype = compute_dtype

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _policy() -> GatherPolicy:
    """The innermost `GatherPolicy` in force, else the default one."""
    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, GatherPolicy):
            return mode
    return GatherPolicy()


def _autocast_forwards() -> set[Any]:
    """The `forward`s whose parameters autocast casts to its lower-precision dtype."""
    nn = torch.nn
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {k.forward for k in (*kinds, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)}


def _owner(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """The sub-module of `module` that holds the parameter `name` (`module` if none does)."""
    try:
        return module.get_submodule(name.rpartition(".")[0])
    except AttributeError:
        return module


def _gather_dtypes(
    owners: Sequence[torch.nn.Module], shards: Sequence[Any], policy: GatherPolicy
) -> list[torch.dtype]:
    """The dtype each shard is gathered in: autocast's for a Linear / Conv layer's, else its own.

    Autocast would cast those parameters to its dtype at their use anyway
    (rounding each element, so casting the shard first gives the same
    values); gathering them cast halves the bytes moved and held, as FSDP2's
    `MixedPrecisionPolicy(param_dtype=torch.bfloat16)` does, while every
    other parameter (norms, embeddings) stays in its own dtype, as autocast
    leaves it. The gradients come back in the parameters' own dtype.
    """
    own = [d.dtype for d in shards]
    device = shards[0].device.type if shards else "cpu"
    if not (policy.compute_dtype and torch.is_autocast_enabled(device)):
        return own
    low = torch.get_autocast_dtype(device)
    cast = _autocast_forwards()
    return [
        low if dtype == torch.float32 and type(owner).forward in cast else dtype
        for owner, dtype in zip(owners, own, strict=True)
    ]


def _apply_sharded(
    module: torch.nn.Module, params: Params, buffers: Buffers, args: Any, kwargs: Any
) -> Any:
    """`functional_call` with DTensor shards: the non-unit parameters at once, units one by one."""
    dtensor = _dtensor_type()
    policy = _policy()
    rows = [n for n, p in params.items() if _is_row_shard(p)]
    units: dict[str, list[str]] = {}
    claimed: set[str] = set()
    if not torch.compiler.is_compiling():
        names = unit_names(module, policy.units)
        for unit in sorted(names, key=len, reverse=True):  # the deepest first
            units[unit] = [n for n in rows if n.startswith(unit + ".") and n not in claimed]
            claimed.update(units[unit])
    root = [n for n in rows if n not in claimed]
    plain = {
        n: _whole(p) if dtensor is not None and isinstance(p, dtensor) else p
        for n, p in params.items()
        if n not in rows
    }
    # The units in the order the model registers them: the order they are expected to run in.
    modules = module.named_modules(remove_duplicate=False)  # every path of a shared sub-module
    position = {name: i for i, (name, _) in enumerate(modules)}
    plan = [
        _Unit(
            module.get_submodule(unit),
            [n[len(unit) + 1 :] for n in names],
            [params[n] for n in names],
        )
        for unit, names in sorted(
            units.items(), key=lambda item: position.get(item[0], len(position))
        )
        if names
    ]
    mode = _value_and_grad_mode()
    schedule = _Schedule(backward=mode is not None and torch.is_grad_enabled())
    if mode is not None and schedule.backward:
        mode.schedules.append(schedule)
    handles: list[Any] = []
    try:
        if root:
            shards = [params[n] for n in root]
            dtypes = _gather_dtypes([_owner(module, n) for n in root], shards, policy)
            inflight = _InFlight(shards, dtypes)
            if plan:  # the first unit's gather travels with the rest's
                first = _gather_dtypes(plan[0].owners, plan[0].shards, policy)
                schedule.issue((0, *first), plan[0].shards, first)
            plain.update(zip(root, _gather(shards, dtypes, inflight), strict=True))
        for at in range(len(plan)):
            handles += _unit_hooks(plan, at, policy, schedule)
        return functional_call(module, (plain, buffers), args, kwargs, strict=False)
    finally:
        for h in handles:
            h.remove()
        schedule.drop()  # a gather issued for a unit that did not run


def _value_and_grad_mode() -> GatherOnUse | None:
    """The `GatherOnUse` of the `lf.value_and_grad` call in progress (which drains schedules)."""
    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, GatherOnUse):
            return mode if mode.backward else None
    return None


def _grad_sharded(
    fn: Callable[..., Any],
    argnums: int | tuple[int, ...],
    has_aux: bool,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Any, Any]:
    """Eager: `torch.autograd.grad` over leaf copies of the shards (same storage, no copy)."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    args_l = list(args)
    leaves: list[torch.Tensor] = []
    specs = []
    for i in nums:
        flat, spec = tree_flatten(args_l[i])
        flat = [
            x.detach().requires_grad_()
            if isinstance(x, torch.Tensor) and x.is_floating_point()
            else x
            for x in flat
        ]
        leaves += [x for x in flat if isinstance(x, torch.Tensor) and x.requires_grad]
        specs.append((spec, flat))
        args_l[i] = tree_unflatten(spec, flat)
    mode = GatherOnUse(backward=True)
    try:
        with torch.enable_grad(), mode:
            out = fn(*args_l, **kwargs)
        loss = out[0] if has_aux else out
        found = torch.autograd.grad(loss, leaves, allow_unused=True)
    finally:
        mode.drain()
    by_leaf = {id(x): _reduced(x, g) for x, g in zip(leaves, found, strict=True)}
    grads = [tree_unflatten(spec, [by_leaf.get(id(x), x) for x in flat]) for spec, flat in specs]
    value = (loss.detach(), tree_detach(out[1])) if has_aux else loss.detach()
    return (grads[0] if isinstance(argnums, int) else tuple(grads)), value


def _reduced(leaf: torch.Tensor, grad: Any) -> Any:
    """A leaf's gradient, averaged over the ranks: row shards are already, partial ones now."""
    if grad is None:
        return torch.zeros_like(leaf)
    if _is_row_shard(grad) or not hasattr(grad, "placements"):
        return grad
    from torch.distributed.tensor import Replicate

    return grad.redistribute(placements=[Replicate()] * len(grad.placements))


def _full_leaves(leaves: list[Any]) -> list[Any]:
    """DTensor leaves as full plain tensors (row shards in one all-gather), others as they are."""
    rows = [x for x in leaves if _is_row_shard(x)]
    gathered = iter(_gather_rows(rows) if rows else [])
    dtensor = _dtensor_type()
    return [
        next(gathered) if _is_row_shard(x) else x.to_local() if isinstance(x, dtensor) else x
        for x in leaves
    ]


def gathered(tree: Any) -> Any:
    """`tree` with every DTensor leaf replaced by its full plain tensor (one all-gather)."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(spec, _full_leaves(leaves))


def _grad_gathered(
    func_grad: Callable[..., tuple[Any, Any]],
    argnums: int | tuple[int, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Any, Any]:
    """Compiled: every shard gathered at once, `torch.func` on full tensors, one reduce-scatter."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    nums = (argnums,) if isinstance(argnums, int) else argnums
    args_l = list(args)
    flats = [tree_flatten(args_l[i]) for i in nums]
    every = [x for flat, _ in flats for x in flat]
    rows = [x for x in every if _is_row_shard(x)]
    plain = _full_leaves(every)
    start = 0
    for i, (flat, spec) in zip(nums, flats, strict=True):
        args_l[i] = tree_unflatten(spec, plain[start : start + len(flat)])
        start += len(flat)
    grads, value = func_grad(*args_l, **kwargs)
    g_flats = [tree_flatten(g)[0] for g in ((grads,) if isinstance(argnums, int) else grads)]
    g_rows = [
        g
        for (flat, _), gs in zip(flats, g_flats, strict=True)
        for x, g in zip(flat, gs, strict=True)
        if _is_row_shard(x)
    ]
    scattered = iter(_scatter_rows(g_rows, rows) if rows else [])

    def shard(x: Any, g: torch.Tensor) -> Any:
        if _is_row_shard(x):
            return DTensor.from_local(
                next(scattered),
                x.device_mesh,
                x.placements,
                run_check=False,
                shape=x.shape,
                stride=x.stride(),
            )
        if isinstance(x, DTensor):
            n = len(x.placements)
            partial = DTensor.from_local(g, x.device_mesh, [Partial("avg")] * n, run_check=False)
            return partial.redistribute(placements=[Replicate()] * n)
        return g

    out = [
        tree_unflatten(spec, [shard(x, g) for x, g in zip(flat, gs, strict=True)])
        for (flat, spec), gs in zip(flats, g_flats, strict=True)
    ]
    return (out[0] if isinstance(argnums, int) else tuple(out)), value
