"""The pieces both step transforms share: argument checks, buffer averaging, metric reduction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._metrics import Reduction, batch_size, reduce_over_processes
from .._state import TrainState, map_train_states, train_states
from .._tree import PyTree
from . import _collectives
from ._mesh import Mesh


def require_train_states(state: PyTree, transform: str) -> list[TrainState]:
    """The state's `TrainState`s; TypeError naming `transform` when there are none."""
    found = train_states(state)
    if not found:
        raise TypeError(
            f"`{transform}` reduces the gradients that reach the optimizer of each "
            f"lightfunc.TrainState in the state, but the state ({type(state).__name__}) holds "
            f"none. Keep each model's params and optimizer in a TrainState (a dict or "
            f"dataclass of several is fine), or wrap your optimizer yourself with "
            f"lightfunc.distributed.reduce_gradients(tx, mesh)."
        )
    return found


def check_mesh(mesh: Any, transform: str) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`{transform}`: `mesh` must be a lightfunc.distributed.Mesh (from "
            f"lightfunc.distributed.init_mesh()), got {type(mesh).__name__}."
        )
    return mesh


def check_bucket_cap(bucket_cap_mb: Any) -> int:
    """`bucket_cap_mb` validated, in bytes."""
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, int | float):
        raise TypeError(f"`bucket_cap_mb` must be a number, got {bucket_cap_mb!r}.")
    if not bucket_cap_mb > 0:
        raise ValueError(
            f"`bucket_cap_mb` must be > 0, got {bucket_cap_mb}. Use a large value (e.g. 1e6) "
            f"for a single bucket per dtype."
        )
    return int(bucket_cap_mb * 2**20)


def average_buffers(state: PyTree, mesh: Mesh, cap_bytes: int) -> PyTree:
    """Every `TrainState`'s floating buffers averaged over the ranks (one collective per bucket).

    Running statistics (BatchNorm) are computed on each rank's own batch;
    averaging them keeps every rank's state identical, as DDP does by
    broadcasting rank 0's buffers.
    """
    found = train_states(state)
    keys = [
        (i, name)
        for i, ts in enumerate(found)
        for name, b in ts.buffers.items()
        if isinstance(b, torch.Tensor) and b.is_floating_point()
    ]
    if not keys:
        return state
    averaged = _collectives.all_reduce(
        [found[i].buffers[name] for i, name in keys], mesh, "avg", cap_bytes
    )
    new: dict[int, dict[str, torch.Tensor]] = {}
    for (i, name), value in zip(keys, averaged, strict=True):
        new.setdefault(i, dict(found[i].buffers))[name] = value
    return map_train_states(lambda i, ts: ts.replace(buffers=new[i]) if i in new else ts, state)


def reduce_metrics(
    metrics: Any,
    batch: Any,
    mesh: Mesh,
    cap_bytes: int,
    declared: Mapping[str, Reduction] | None = None,
) -> Any:
    """`metrics` combined over all ranks by each metric's reduction (`lightfunc._metrics`).

    Means are weighted by each rank's batch size (the leading dimension of
    `batch`); integer metrics are summed, booleans OR-ed, unless `declared`
    says otherwise. Anything but a mapping of 0-d tensors (a predict step's
    outputs) is returned unchanged.
    """
    count = torch.tensor(float(batch_size(batch)), device=mesh.device)

    def all_reduce(tensors: list[torch.Tensor], op: str) -> list[torch.Tensor]:
        return _collectives.all_reduce(tensors, mesh, op, cap_bytes)

    return reduce_over_processes(metrics, count, declared or {}, all_reduce)
