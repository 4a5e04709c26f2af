"""Gradient accumulation as a step transform: n micro-batches, one optimizer update.

    step = lf.build(train_step, accumulate_grad_batches=4)
    state, metrics = step(state, batch)   # batch is split into 4 micro-batches

The step function is unchanged. The built step splits every tensor in the
batch into n chunks along dimension 0 and runs the step once per chunk.
Around each chunk, every `TrainState`'s optimizer is wrapped in
`lightfunc.optim.accumulate_gradients`, whose state (the running weighted
sum of the gradients and this chunk's weight) rides in `opt_state` for the
duration of the call: on the first n-1 chunks `apply_gradients` adds the
gradients and defers (the parameters and the step count stay; BatchNorm
buffers and other changes are kept), on the last it applies the sum, once.
For a mean-reduced loss, with each chunk weighted by its share of the
rows, that sum is the gradient of the whole batch, so the update equals
one step on the concatenated batch.

The chunks run as two compiled functions, one for the first n-1 chunks and
one for the last, so a step's memory is that of one micro-batch. The
accumulation wrapper sits outside every other optimizer wrapper, so a
data-parallel gradient reduction and `apply_if_finite`'s finiteness check
see the accumulated gradient, once per update. Metrics of the chunks are
combined by their reductions (`lightfunc._metrics`): floating ones
weighted by each chunk's share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._state import TrainState, map_train_states, train_states
from ._tree import PyTree, tree_flatten, tree_unflatten
from .optim._wrappers import AccumulationState, accumulate_gradients


def micro_step(fn: Callable[[Any, Any], Any], *, final: bool) -> Callable[..., Any]:
    """`fn` as one micro-batch of an accumulated step.

    `(state, accs, batch, weight) -> (state, accs, metrics)` for the first
    chunks, `-> (state, metrics)` for the last; `accs` holds one running
    gradient sum per `TrainState` in the state (None on the first chunk),
    and `weight` (a 0-d tensor) is the chunk's share of the batch.
    """
    name = getattr(fn, "__name__", "step")

    def micro(state: Any, accs: tuple[PyTree, ...] | None, batch: Any, weight: torch.Tensor) -> Any:
        originals = train_states(state)
        if not originals:
            raise TypeError(
                f"accumulate_grad_batches adds up the gradients that reach the optimizer of each "
                f"lightfunc.TrainState in the state, but `{name}`'s state "
                f"({type(state).__name__}) holds none. Keep the params and optimizer in a TrainState."
            )

        def wrap(i: int, ts: TrainState) -> TrainState:
            acc = None if accs is None else accs[i]
            opt_state = AccumulationState(ts.opt_state, acc, weight, final=final)
            return ts.replace(tx=accumulate_gradients(ts.tx), opt_state=opt_state)

        new_state, metrics = fn(map_train_states(wrap, state), batch)
        new_accs: list[PyTree] = []

        def unwrap(i: int, ts: TrainState) -> TrainState:
            wrapped = ts.opt_state
            if not (isinstance(wrapped, AccumulationState) and wrapped.consumed):
                raise TypeError(
                    f"accumulate_grad_batches needs the step to update through "
                    f"TrainState.apply_gradients, which it defers until the last micro-batch; "
                    f"`{name}` never called it (for the TrainState at position {i})."
                )
            new_accs.append(wrapped.acc)
            return ts.replace(tx=originals[i].tx, opt_state=wrapped.inner)

        new_state = map_train_states(unwrap, new_state)
        if final:
            return new_state, metrics
        return new_state, tuple(new_accs), metrics

    micro.__name__ = name
    return micro


def split_batch(batch: Any, n: int) -> tuple[list[Any], list[float]]:
    """`batch` split into `n` chunks along dim 0, and each chunk's share of the rows.

    Chunks differ by at most one row when the batch does not divide evenly
    (each size compiles once); a batch of fewer than `n` rows gives one chunk
    per row. Non-tensor leaves are repeated in every chunk.

    Raises:
        ValueError: the batch has no tensors, or its tensors disagree on dim 0.
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
    # A batch with fewer rows than n (an epoch's short last batch) runs as one-row
    # micro-batches: still one update, equal to one step on that batch. (It used to raise,
    # ending a run at its first epoch end when the dataset did not divide evenly.)
    n = min(n, size)
    per_leaf = [
        x.tensor_split(n) if isinstance(x, torch.Tensor) and x.ndim > 0 else [x] * n for x in leaves
    ]
    chunks = [tree_unflatten(treedef, [parts[i] for parts in per_leaf]) for i in range(n)]
    q, r = divmod(size, n)
    sizes = [q + 1 if i < r else q for i in range(n)]  # as tensor_split cuts them
    return chunks, [s / size for s in sizes]
