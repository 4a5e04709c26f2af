"""Gradient accumulation as a step transform: n micro-batches, one optimizer update.

    step = lf.build(train_step, accumulate_grad_batches=4)
    state, metrics = step(state, batch)   # batch is split into 4 micro-batches

The step function is unchanged. The built step splits every tensor in the
batch into n chunks along dimension 0 and runs the step once per chunk.
While it runs, `TrainState.apply_gradients` does not update: on the first
n-1 chunks it hands its gradients to the transform, which adds them into an
accumulator, and returns the state with only the other changes applied
(BatchNorm buffers, say); on the last chunk it applies the weighted mean of
all n gradients, once. For a mean-reduced loss that is the gradient of the
whole batch, so the update equals one step on the concatenated batch.

The chunks are run as two compiled functions, one for the first n-1 chunks
(no optimizer, no gradient communication) and one for the last, so the
memory of a step is that of one micro-batch, and a data-parallel step
reduces its gradients once per update, not once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._tree import PyTree, tree_flatten, tree_map, tree_unflatten


class _Accumulation:
    """What `TrainState.apply_gradients` does inside an accumulated step."""

    def __init__(self, acc: PyTree | None, weight: torch.Tensor, final: bool) -> None:
        self.acc = acc
        self.weight = weight
        self.final = final
        self.grads: PyTree | None = None

    def take(self, grads: PyTree) -> PyTree | None:
        """Record this micro-batch's `grads`; the gradients to apply now, or None to defer."""
        if self.grads is not None:
            raise RuntimeError(
                "`apply_gradients` was called twice in one step under accumulate_grad_batches; "
                "the transform supports one optimizer update per step."
            )
        weighted = tree_map(lambda g: g * self.weight.to(g.dtype), grads)
        total = weighted if self.acc is None else tree_map(torch.add, self.acc, weighted)
        self.grads = total
        return total if self.final else None


_ACTIVE: list[_Accumulation] = []


def active_accumulation() -> _Accumulation | None:
    """The accumulation a step is running under, if any (consulted by `apply_gradients`)."""
    return _ACTIVE[-1] if _ACTIVE else None


def micro_step(fn: Callable[[Any, Any], Any], *, final: bool) -> Callable[..., Any]:
    """`fn` as one micro-batch of an accumulated step.

    `(state, acc, batch, weight) -> (state, acc, metrics)` for the first
    chunks, `-> (state, metrics)` for the last; `acc` is None on the first
    chunk, and `weight` (a 0-d tensor) is the chunk's share of the batch.
    """

    def micro(state: Any, acc: PyTree | None, batch: Any, weight: torch.Tensor) -> Any:
        accumulation = _Accumulation(acc, weight, final)
        _ACTIVE.append(accumulation)
        try:
            new_state, metrics = fn(state, batch)
        finally:
            _ACTIVE.pop()
        if accumulation.grads is None:
            raise TypeError(
                f"accumulate_grad_batches needs the step to update through "
                f"TrainState.apply_gradients, which it defers until the last micro-batch; "
                f"`{getattr(fn, '__name__', 'step')}` never called it."
            )
        if final:
            return new_state, metrics
        return new_state, accumulation.grads, metrics

    micro.__name__ = getattr(fn, "__name__", "step")
    # One cache per compiled function (see `apply_policy`).
    micro.__code__ = micro.__code__.replace()
    return micro


def split_batch(batch: Any, n: int) -> tuple[list[Any], list[float]]:
    """`batch` split into `n` chunks along dim 0, and each chunk's share of the rows.

    Chunks differ by at most one row when the batch does not divide evenly
    (each size compiles once). Non-tensor leaves are repeated in every chunk.

    Raises:
        ValueError: the batch has no tensors, its tensors disagree on dim 0, or
            it has fewer rows than `n`.
    """
    leaves, treedef = tree_flatten(batch)
    rows = {x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.ndim > 0}
    if len(rows) != 1:
        found = "no tensors with a batch dimension" if not rows else f"sizes {sorted(rows)}"
        raise ValueError(
            f"accumulate_grad_batches={n} splits the batch along dim 0, but it has {found}. "
            f"Give batches whose tensors share their first dimension."
        )
    (size,) = rows
    if size < n:
        raise ValueError(
            f"accumulate_grad_batches={n} cannot split a batch of {size} rows into {n} "
            f"micro-batches; the loader's batch size is the size of the whole accumulated "
            f"batch (n micro-batches)."
        )
    per_leaf = [
        x.tensor_split(n) if isinstance(x, torch.Tensor) and x.ndim > 0 else [x] * n for x in leaves
    ]
    chunks = [tree_unflatten(treedef, [parts[i] for parts in per_leaf]) for i in range(n)]
    q, r = divmod(size, n)
    sizes = [q + 1 if i < r else q for i in range(n)]  # as tensor_split cuts them
    return chunks, [s / size for s in sizes]


def mean_metrics(per_chunk: list[dict[str, torch.Tensor]], weights: list[torch.Tensor]) -> Any:
    """Floating metrics weighted by each chunk's share; other metrics from the last chunk."""
    out = dict(per_chunk[-1])
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            parts = [m[key] * w.to(value.dtype) for m, w in zip(per_chunk, weights, strict=True)]
            out[key] = torch.stack(parts).sum()
    return out
