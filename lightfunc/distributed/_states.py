"""Finding the `TrainState`s in a user state, and the pieces both step transforms share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import optree
import torch

from .._state import TrainState
from .._tree import NAMESPACE, PyTree
from . import _collectives
from ._mesh import Mesh


def _is_train_state(x: Any) -> bool:
    return isinstance(x, TrainState)


def train_states(state: PyTree) -> list[TrainState]:
    """The `TrainState`s in `state` (itself, or nested in dicts, tuples, dataclasses), in tree order."""
    leaves = optree.tree_leaves(state, is_leaf=_is_train_state, namespace=NAMESPACE)
    return [x for x in leaves if isinstance(x, TrainState)]


def map_train_states(fn: Callable[[int, TrainState], TrainState], state: PyTree) -> PyTree:
    """`state` with its i-th `TrainState` `ts` replaced by `fn(i, ts)`."""
    leaves, spec = optree.tree_flatten(state, is_leaf=_is_train_state, namespace=NAMESPACE)
    out, i = [], 0
    for leaf in leaves:
        if isinstance(leaf, TrainState):
            leaf = fn(i, leaf)
            i += 1
        out.append(leaf)
    return optree.tree_unflatten(spec, out)


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


F = TypeVar("F", bound=Callable[..., Any])


def fresh_code(fn: F) -> F:
    """`fn` with its own copy of its code object.

    torch.compile caches graphs per code object: without a copy, every step
    this transform returns (train and eval, synced and not) would share one
    cache and its recompile limit, each counting as a recompile of the others.
    """
    fn.__code__ = fn.__code__.replace()
    return fn


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


def reduce_metrics(metrics: Any, mesh: Mesh, cap_bytes: int) -> Any:
    """Metrics over all ranks: floating ones averaged, integer ones summed, booleans OR-ed.

    Anything but a mapping of 0-d tensors (a predict step's outputs) is
    returned unchanged.
    """
    if not isinstance(metrics, Mapping) or not metrics:
        return metrics
    if not all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values()):
        return metrics
    names = list(metrics)
    out = dict(metrics)
    for kind, op in (("float", "avg"), ("int", "sum"), ("bool", "max")):
        chosen = [n for n in names if _kind(metrics[n]) == kind]
        if not chosen:
            continue
        values = [metrics[n] if kind != "bool" else metrics[n].to(torch.int32) for n in chosen]
        reduced = _collectives.all_reduce(values, mesh, op, cap_bytes)
        for n, v in zip(chosen, reduced, strict=True):
            out[n] = v.to(torch.bool) if kind == "bool" else v
    return type(metrics)(out) if isinstance(metrics, dict) else out


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() or t.is_complex() else "int"
