"""`init_sharded`: a meta-device model's parameters as row shards, never whole on every rank.

    with torch.device("meta"):
        model = GPT(config)                              # no memory
    params, buffers = lfd.init_sharded(model, mesh)      # 1/N of the params per rank
    state = lf.TrainState.create(params, tx, buffers=buffers)

Rank 0 materialises the model one group at a time (a unit, as `units=`
chooses them, or one module outside the units), initialises it, scatters
each parameter's row chunks to the ranks and returns the group to the meta
device; the other ranks only ever allocate their chunks. Rank 0's peak is
one group, not the model. The groups are initialised in `named_modules()`
order, which is the order a module's constructor created them in for
models built by registering children as they are created: with the same
seed, the values equal a model built on the CPU in one process (tested for
`Linear`, `Embedding`, `LayerNorm`).

The model stays on the meta device (it holds no weights): `lf.apply` only
needs its structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .._sharded_func import check_units, unit_names
from ._collectives import chunk_rows
from ._mesh import Mesh
from ._states import check_mesh


def init_sharded(
    module: torch.nn.Module,
    mesh: Mesh,
    *,
    init: Callable[[torch.nn.Module], None] | None = None,
    units: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`module`'s parameters as row shards (`DTensor` `Shard(0)`) and its buffers, initialised.

    Args:
        module: a model built on the meta device (`with torch.device("meta"): ...`);
            it is left on the meta device.
        mesh: the ranks. Every rank must call it. On a one-process mesh the
            parameters come back as plain tensors.
        init: called on each materialised sub-module, in `named_modules()`
            order, on rank 0 only; default: its `reset_parameters()` if it
            has one (what its constructor called).
        units: the groups rank 0 materialises one at a time, in the forms
            `FSDP(mesh, units=...)` takes (default: the default units, or
            what `set_units` marked); it changes rank 0's peak, not the values.

    Returns:
        `(params, buffers)` by name, for `lf.TrainState.create(params, tx,
        buffers=buffers)`: 0-d parameters and all buffers are replicated.

    Raises:
        TypeError: `module` is not an `nn.Module`, or `mesh` is not a `Mesh`.
        ValueError: a parameter or buffer of `module` is not on the meta device,
            or `units` names a sub-module `module` does not have.
    """
    check_mesh(mesh, "init_sharded")
    check_units(units, "init_sharded")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if not t.is_meta:
            raise ValueError(
                f"`init_sharded` expects a model built on the meta device, but `{name}` is on "
                f"{t.device}. Build it under `with torch.device('meta'):`."
            )
    init = init or _reset
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    for group in _groups(module, units):
        if mesh.global_rank == 0:
            for _, m in group:
                m.to_empty(device=mesh.device, recurse=False)
            for _, m in group:
                init(m)
        for prefix, m in group:
            for name, p in m.named_parameters(recurse=False):
                params[prefix + name] = _scatter(p, mesh)
            for name, b in m.named_buffers(recurse=False):
                buffers[prefix + name] = _broadcast(b, mesh)
        if mesh.global_rank == 0:
            for _, m in group:
                m.to_empty(device="meta", recurse=False)
    order = [name for name, _ in module.named_parameters()]
    return {name: params[name] for name in order}, buffers


def _reset(m: torch.nn.Module) -> None:
    reset = getattr(m, "reset_parameters", None)
    if callable(reset):
        reset()


def _groups(module: torch.nn.Module, chosen: Any) -> list[list[tuple[str, torch.nn.Module]]]:
    """Modules with their own tensors, grouped by unit, in `named_modules()` order."""
    units = unit_names(module, chosen)
    groups: dict[str, list[tuple[str, torch.nn.Module]]] = {}
    for name, m in module.named_modules():
        if not any(True for _ in m.parameters(recurse=False)) and not any(
            True for _ in m.buffers(recurse=False)
        ):
            continue
        unit = next((u for u in units if name == u or name.startswith(u + ".")), name)
        groups.setdefault(unit, []).append((f"{name}." if name else "", m))
    return list(groups.values())


def _scatter(p: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Rank 0's `p` cut into row chunks: each rank receives only its own."""
    if not mesh.is_distributed:
        return p.detach().clone()
    group = mesh.device_mesh.get_group()
    if p.ndim == 0:
        return DTensor.from_local(_broadcast(p, mesh), mesh.device_mesh, [Replicate()])
    world, rank = mesh.world_size, mesh.global_rank
    chunk, _, rows = chunk_rows(p.shape[0], world, rank)
    out = torch.empty((chunk, *p.shape[1:]), dtype=p.dtype, device=mesh.device)
    parts = None
    if rank == 0:
        full = p.detach()
        pad = chunk * world - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
        parts = list(full.split(chunk))
    dist.scatter(out, parts, src=0, group=group)
    local = out[:rows].clone() if rows < chunk else out
    return DTensor.from_local(
        local, mesh.device_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride()
    )


def _broadcast(t: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    out = (
        t.detach().clone()
        if mesh.global_rank == 0
        else torch.empty(t.shape, dtype=t.dtype, device=mesh.device)
    )
    if mesh.is_distributed:
        dist.broadcast(out, src=0, group=mesh.device_mesh.get_group())
    return out
