"""Bucketed functional collectives: what `data_parallel` and `fully_sharded` put in a step's graph.

(The per-unit all-gather and reduce-scatter of sharded parameters live in
`lightfunc._sharded_func`, which `lightfunc._func.apply` calls.)

Functional collectives (`torch.distributed._functional_collectives`) return
new tensors instead of writing into their inputs, so they fit a pure step,
and `torch.compile` traces them into the step's graph. Tensors are packed
into flat buckets first: one collective per bucket, not one per tensor (on
gloo, one bucket was about 3x faster than a collective per parameter).

Every result is waited on here: an unwaited functional collective warns
when the process exits, and on CPU a wait is not a device-to-host copy.

Row layout of a sharded tensor (torch.chunk's, as DTensor `Shard(0)`): with
`n` rows over `w` ranks, each chunk holds `c = ceil(n / w)` rows and rank
`r` holds rows `[min(r*c, n), min((r+1)*c, n))` (the last ranks may hold
fewer, or none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed._functional_collectives as funcol

if TYPE_CHECKING:
    from ._mesh import Mesh


def wait(t: torch.Tensor) -> torch.Tensor:
    """The finished result of a functional collective (eager: an `AsyncCollectiveTensor`)."""
    if isinstance(t, funcol.AsyncCollectiveTensor):
        return t.wait()
    return funcol.wait_tensor(t)


def buckets(tensors: Sequence[torch.Tensor], cap_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped into buckets of one dtype and at most `cap_bytes` each.

    Order is kept within a dtype; a tensor larger than the cap gets a bucket
    of its own. A cap <= 0 puts each dtype in a single bucket.
    """
    out: list[list[int]] = []
    open_bucket: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        size = t.numel() * t.element_size()
        current, used = open_bucket.get(t.dtype, ([], 0))
        if current and cap_bytes > 0 and used + size > cap_bytes:
            current, used = [], 0
        if not current:
            out.append(current)
        current.append(i)
        open_bucket[t.dtype] = (current, used + size)
    return out


def all_reduce(
    tensors: Sequence[torch.Tensor], mesh: Mesh, op: str, cap_bytes: int
) -> list[torch.Tensor]:
    """`tensors` reduced over `mesh` ("avg", "sum", ...): one flat collective per bucket."""
    groups = buckets(tensors, cap_bytes)
    pending = [
        funcol.all_reduce(torch.cat([tensors[i].reshape(-1) for i in group]), op, mesh.device_mesh)
        for group in groups
    ]
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for group, flat in zip(groups, pending, strict=True):
        parts = wait(flat).split([tensors[i].numel() for i in group])
        for i, part in zip(group, parts, strict=True):
            out[i] = part.view(tensors[i].shape)
    return out


def chunk_rows(rows: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(rows per chunk, first row, number of rows) of `rank`'s chunk of `rows` rows."""
    chunk = math.ceil(rows / world_size) if rows else 0
    start = min(rank * chunk, rows)
    return chunk, start, min(start + chunk, rows) - start


def reduce_scatter_rows(
    fulls: Sequence[torch.Tensor], mesh: Mesh, op: str, cap_bytes: int
) -> list[torch.Tensor]:
    """Each rank's row chunk of `fulls` reduced over `mesh`: one reduce-scatter per bucket.

    Each tensor is padded to `world_size` whole chunks and laid out as `(world_size, chunk)`; a
    bucket concatenates those along dim 1, and the reduce-scatter hands
    rank `r` the reduced row `r`, which is split back and cut to its rows.
    """
    world_size, rank = mesh.world_size, mesh.global_rank
    tables = []
    for t in fulls:
        chunk = chunk_rows(t.shape[0], world_size, 0)[0]
        tables.append(_pad_rows(t, chunk * world_size).reshape(world_size, -1))
    groups = buckets(tables, cap_bytes)
    pending = [
        funcol.reduce_scatter_single(
            torch.cat([tables[i] for i in group], dim=1).reshape(-1), op, 0, mesh.device_mesh
        )
        for group in groups
    ]
    out: list[torch.Tensor] = [torch.empty(0)] * len(fulls)
    for group, flat in zip(groups, pending, strict=True):
        parts = wait(flat).split([tables[i].shape[1] for i in group])
        for i, part in zip(group, parts, strict=True):
            t = fulls[i]
            _, _, rows = chunk_rows(t.shape[0], world_size, rank)
            out[i] = part.view(-1, *t.shape[1:])[:rows]
    return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])
