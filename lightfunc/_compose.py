"""Composing pure steps with `torch.func`: ensembles and per-example gradients.

    stacked = stack_states([TrainState.create(make_model(k), tx, seed=k) for k in range(8)])
    step = lightfunc.build(ensemble(train_step))        # 8 models, one compiled, vmapped step
    state, metrics = step(stacked, batch)                # metrics: means over the members
    members = unstack_states(state)                      # 8 ordinary TrainStates again

    losses, grads = per_example_grads(loss_fn)(params, x, y)   # grads[name]: (N, *param.shape)

A stacked state is an ordinary state (a `TrainState`, or any state pytree)
whose every tensor has one more leading dimension, the member dimension.
`ensemble(train_step)` runs the unchanged single-model step on each member
with `torch.func.vmap`, so a member trains exactly as the model would alone.

Randomness. `vmap(..., randomness="different")` (the default) draws one
batched tensor for every random op, e.g. a `(K, N, H)` dropout mask, from
the step's generator, seeded from the stacked state's one `RngKey`; member k
uses slice k. So members get different masks, a run is reproducible and
resumes exactly, but member k's masks are not those a lone run with member
k's seed would draw. Without random ops, member k matches a lone run of its
state (tested to 1e-6 in fp32, with BatchNorm and AdamW; bit-identical on
CPU). `randomness="same"` gives every member the same masks; `"error"`
raises on any random op.

States are walked by hand here (`_tree.tree_walk` / `tree_rebuild`), not
with `tree_map`: these functions run inside compiled steps, and in torch 2.13
dynamo cannot flatten an optree node that holds an empty dict (the `buffers`
of a model without any). The walk goes through dataclasses, dicts, lists,
tuples and namedtuples; any other object (an `RngKey`, the optimizer) is
static and shared by all members.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch

from ._func import _check_loss, _describe
from ._tree import tree_paths, tree_rebuild, tree_structure, tree_walk

S = TypeVar("S")
Randomness = Literal["error", "different", "same"]
_RANDOMNESS = ("error", "different", "same")


def stack_states(states: Sequence[S]) -> S:
    """Stack K states of the same structure into one, for `ensemble` and `vmap_members`.

    Every tensor of the result has a new leading dimension of size K (member
    k's tensors at index k); everything else (the optimizer, counters) is the
    first state's. The members may differ only in their tensors' values and
    in their `rng` keys: the stacked state keeps the first member's key, which
    seeds the whole ensemble's random stream.

    Args:
        states: at least one state (`TrainState`s, or any state pytrees),
            e.g. made from differently seeded models with the same optimizer.

    Returns:
        A state of the same type as each member, with stacked tensors.

    Raises:
        ValueError: `states` is empty, or the members differ in structure
            (another optimizer, other parameter names) or in a tensor's
            shape, dtype or device (the message names the tree path).

    Example:
        >>> import torch, lightfunc as lf
        >>> tx, states = lf.optim.sgd(0.1), []
        >>> for seed in range(3):
        ...     _ = torch.manual_seed(seed)
        ...     states.append(lf.TrainState.create(torch.nn.Linear(4, 2), tx, seed=seed))
        >>> stacked = lf.stack_states(states)
        >>> tuple(stacked.params["weight"].shape), tuple(stacked.step.shape)
        ((3, 2, 4), (3,))
    """
    states = list(states)
    if not states:
        raise ValueError("`states` is empty; pass at least one state to `stack_states`.")
    first = states[0]
    first_paths, first_leaves = tree_walk(first)
    for k, state in enumerate(states[1:], start=1):
        if _structure(state) != _structure(first):
            raise ValueError(
                f"`states[{k}]` has a different structure from `states[0]`: " + _why(first, state)
            )
        _, leaves = tree_walk(state)
        for path, a, b in zip(first_paths, first_leaves, leaves, strict=True):
            if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
                raise ValueError(
                    f"`states[{k}]` differs from `states[0]` at `{path}`: given "
                    f"{_leaf(b)}, expected {_leaf(a)} (as in `states[0]`). Members must have "
                    f"the same shapes, dtypes and devices."
                )
    columns = zip(*(tree_walk(s)[1] for s in states), strict=True)
    return tree_rebuild(first, iter([torch.stack(column) for column in columns]))


def unstack_states(stacked: S) -> list[S]:
    """Split a stacked state back into its K members (views of `stacked`'s tensors).

    Each member keeps the stacked state's `rng` key: the members' random draws
    came from one batched stream, so there is no per-member key to recover.

    Raises:
        ValueError: `stacked` holds no tensors, a 0-d tensor, or tensors whose
            leading (member) dimensions differ.

    Example:
        >>> import torch, lightfunc as lf
        >>> states = [lf.TrainState.create(torch.nn.Linear(4, 2), lf.optim.sgd(0.1))] * 2
        >>> members = lf.unstack_states(lf.stack_states(states))
        >>> len(members), tuple(members[1].params["weight"].shape)
        (2, (2, 4))
    """
    size = member_count(stacked)
    _, leaves = tree_walk(stacked)
    return [tree_rebuild(stacked, iter([x[k] for x in leaves])) for k in range(size)]


def member_count(stacked: Any) -> int:
    """The number of members K of a stacked state (the size of every tensor's first dimension).

    Raises:
        ValueError: as for `unstack_states`.
    """
    paths, leaves = tree_walk(stacked)
    if not leaves:
        raise ValueError("`stacked` holds no tensors; expected a state made by `stack_states`.")
    sizes: dict[int, str] = {}
    for path, x in zip(paths, leaves, strict=True):
        if x.ndim == 0:
            raise ValueError(
                f"`stacked` has a 0-d tensor at `{path}`, so it is not a stacked state "
                f"(every tensor has a leading member dimension). Make it with `stack_states`."
            )
        sizes.setdefault(x.shape[0], path)
    if len(sizes) > 1:
        found = ", ".join(f"{n} at `{p}`" for n, p in sizes.items())
        raise ValueError(
            f"`stacked` tensors disagree on the member dimension: {found}. "
            f"Make stacked states with `stack_states`."
        )
    return next(iter(sizes))


def vmap_members(
    fn: Callable[..., Any],
    *,
    randomness: Randomness = "error",
    member_axis: int | None = None,
) -> Callable[..., Any]:
    """Run `fn(state, *args)` on every member of a stacked state; outputs gain a member dimension.

    For evaluation and prediction with an ensemble: `fn` is written for one
    member (a single state); the returned function takes the stacked state.

    Args:
        fn: `fn(state, *args) -> tensors` (a tensor, or a dict / tuple / list
            of them), written for one member.
        randomness: `torch.func.vmap`'s: "error" (default: an eval step
            should not draw random numbers), "different" or "same".
        member_axis: None (default): every member sees the same `args`; an
            int: each tensor in `args` has a member dimension at this axis,
            and member k gets index k along it.

    Returns:
        `fn` over the stacked state: every output tensor has a leading
        dimension of size K.

    Example:
        >>> import torch, lightfunc as lf
        >>> model = torch.nn.Linear(4, 2)
        >>> stacked = lf.stack_states([lf.TrainState.create(model, lf.optim.sgd(0.1))] * 3)
        >>> def predict(state, x):
        ...     return lf.apply(model, state.params, state.buffers, x, train=False)[0]
        >>> tuple(lf.vmap_members(predict)(stacked, torch.ones(5, 4)).shape)
        (3, 5, 2)
    """
    _check_randomness(randomness)

    def mapped(stacked: Any, *args: Any) -> Any:
        _, leaves = tree_walk(stacked)

        def one(leaves: list[torch.Tensor], *args: Any) -> Any:
            return fn(tree_rebuild(stacked, iter(leaves)), *args)

        in_dims = (0, *(member_axis for _ in args))
        return torch.func.vmap(one, in_dims=in_dims, randomness=randomness)(leaves, *args)

    mapped.__name__ = getattr(fn, "__name__", "fn")
    return mapped


def ensemble(
    train_step: Callable[[Any, Any], tuple[Any, dict[str, torch.Tensor]]],
    *,
    randomness: Randomness = "different",
    member_axis: int | None = None,
    member_metrics: bool = False,
) -> Callable[[Any, Any], tuple[Any, dict[str, torch.Tensor]]]:
    """Turn a single-model train step into one that trains a stacked ensemble.

    `ensemble(train_step)(stacked, batch)` runs `train_step` on every member
    of `stacked` (made by `stack_states`) with `torch.func.vmap`: one
    graph, one optimizer update per member, compiled as a whole by
    `lightfunc.build`. Member k's new state is what `train_step` returns for
    it alone (see the module docstring on random ops such as dropout).

    Args:
        train_step: a pure `train_step(state, batch) -> (new_state, metrics)`
            for ONE model, unchanged.
        randomness: how random ops draw across members (`torch.func.vmap`'s
            `randomness`): "different" (default: independent dropout masks
            per member), "same" (shared masks) or "error".
        member_axis: None (default): every member trains on the same batch;
            an int: each tensor in the batch has a member dimension at this
            axis, and member k trains on index k along it (e.g. each member
            its own shuffle of the data, or a bootstrap sample).
        member_metrics: also return each member's metrics, as `"{name}/{k}"`.

    Returns:
        A train step `(stacked_state, batch) -> (stacked_state, metrics)`
        whose metrics are each metric's mean over the members (0-d tensors,
        as `lightfunc.build` and the loop expect).

    Example:
        >>> import torch, lightfunc as lf
        >>> model = torch.nn.Linear(3, 1)
        >>> def train_step(state, batch):
        ...     x, y = batch
        ...     def loss_fn(params):
        ...         out, _ = lf.apply(model, params, state.buffers, x, train=True)
        ...         return torch.nn.functional.mse_loss(out, y)
        ...     loss, grads = lf.value_and_grad(loss_fn)(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> stacked = lf.stack_states([lf.TrainState.create(model, lf.optim.sgd(0.1))] * 4)
        >>> step = lf.build(lf.ensemble(train_step), compile=False)
        >>> stacked, metrics = step(stacked, (torch.ones(8, 3), torch.zeros(8, 1)))
        >>> stacked.step.tolist(), tuple(metrics["loss"].shape)
        ([1, 1, 1, 1], ())
    """
    _check_randomness(randomness)
    if not callable(train_step):
        raise TypeError(
            f"`train_step` must be a function `(state, batch) -> (state, metrics)`, "
            f"got {type(train_step).__name__}."
        )

    def ensemble_step(stacked: Any, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        _, leaves = tree_walk(stacked)

        def one(leaves: list[torch.Tensor], batch: Any) -> tuple[list[torch.Tensor], Any]:
            new_state, metrics = train_step(tree_rebuild(stacked, iter(leaves)), batch)
            _, new_leaves = tree_walk(new_state)
            if len(new_leaves) != len(leaves):
                raise ValueError(
                    f"`train_step` returned a state with {len(new_leaves)} tensors from one with "
                    f"{len(leaves)}; it must keep the state's structure (use state.replace(...) "
                    f"or state.apply_gradients(...))."
                )
            return new_leaves, metrics

        in_dims = (0, member_axis)
        new_leaves, metrics = torch.func.vmap(one, in_dims=in_dims, randomness=randomness)(
            leaves, batch
        )
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"`train_step` must return metrics as a dict of 0-d tensors, got "
                f"{type(metrics).__name__}."
            )
        reduced = {name: value.float().mean(0) for name, value in metrics.items()}
        if member_metrics:
            for name, value in metrics.items():
                reduced.update({f"{name}/{k}": value[k] for k in range(value.shape[0])})
        return tree_rebuild(stacked, iter(new_leaves)), reduced

    ensemble_step.__name__ = f"ensemble({getattr(train_step, '__name__', 'train_step')})"
    return ensemble_step


def per_example_grads(
    loss_fn: Callable[..., Any],
    *,
    argnums: int | tuple[int, ...] = 0,
    has_aux: bool = False,
    randomness: Randomness = "different",
) -> Callable[..., tuple[Any, Any]]:
    """The loss and its gradient for every example of a batch: `vmap` of `grad`.

    `loss_fn(params, *example)` is written for ONE example (no batch
    dimension: add one inside, e.g. `x[None]`, for modules that need it) and
    returns a 0-d loss. The returned function takes the whole batch: the
    arguments at `argnums` (the parameters) are shared, every other positional
    argument is split along its first dimension; keyword arguments are shared.

    Args:
        loss_fn: `loss_fn(params, *example) -> loss` or `-> (loss, aux)`.
        argnums: which positional argument(s) to differentiate; they are not split.
        has_aux: `loss_fn` returns `(loss, aux)`; aux is returned per example.
        randomness: `torch.func.vmap`'s: "different" (default: each example
            draws its own dropout mask, as in a batch), "same" or "error".

    Returns:
        `fn(params, *batch) -> (losses, grads)`, or `((losses, aux), grads)`
        with `has_aux`: `losses` has shape (N,), each gradient leaf has shape
        (N, *param.shape). Works eagerly and inside compiled steps.

    Raises:
        TypeError / ValueError: on the first call, when `loss_fn` returns
            something other than a 0-d floating tensor (or a pair with `has_aux`).

    Example:
        >>> import torch, lightfunc as lf
        >>> def loss_fn(w, x, y):
        ...     return (x @ w - y) ** 2
        >>> losses, grads = lf.per_example_grads(loss_fn)(torch.ones(2), torch.eye(2), torch.zeros(2))
        >>> losses.tolist(), grads.tolist()
        ([1.0, 1.0], [[2.0, 0.0], [0.0, 2.0]])
    """
    _check_randomness(randomness)
    shared = {argnums} if isinstance(argnums, int) else set(argnums)

    def checked(*args: Any, **kwargs: Any) -> Any:
        out = loss_fn(*args, **kwargs)
        if has_aux and not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"`per_example_grads(..., has_aux=True)` expects `loss_fn` to return (loss, aux), "
                f"got {_describe(out)}. Return a pair, or pass has_aux=False."
            )
        _check_loss(out[0] if has_aux else out, has_aux)
        return out

    grad_fn = torch.func.grad_and_value(checked, argnums=argnums, has_aux=has_aux)

    def per_example(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        in_dims = tuple(None if i in shared else 0 for i in range(len(args)))
        grads, value = torch.func.vmap(
            lambda *a: grad_fn(*a, **kwargs), in_dims=in_dims, randomness=randomness
        )(*args)
        return value, grads

    per_example.__name__ = f"per_example_grads({getattr(loss_fn, '__name__', 'loss_fn')})"
    return per_example


def _structure(state: Any) -> Any:
    """`state`'s tree structure, ignoring its `rng` key (members are seeded differently)."""
    if dataclasses.is_dataclass(state) and any(f.name == "rng" for f in dataclasses.fields(state)):
        state = dataclasses.replace(state, rng=None)  # type: ignore[type-var]
    return tree_structure(state)


def _why(first: Any, other: Any) -> str:
    """Why two states' structures differ, and the fix, for `stack_states`' error."""
    paths, other_paths = set(tree_paths(first)), set(tree_paths(other))
    missing, extra = sorted(paths - other_paths), sorted(other_paths - paths)
    if missing or extra:
        return (
            f"it lacks {missing[:8]} and has {extra[:8]} in addition. Members must be "
            f"instances of the same model."
        )
    if getattr(first, "tx", None) is not getattr(other, "tx", None):
        return (
            "its optimizer (`tx`) is another object. Create every member with the same "
            "`tx`: `tx = lf.optim.adamw(...)` once, then `TrainState.create(model_k, tx, seed=k)`."
        )
    return (
        f"a static field differs.\n  states[0]: {_structure(first)}\n  other: {_structure(other)}"
    )


def _leaf(x: torch.Tensor) -> str:
    dtype = str(x.dtype).removeprefix("torch.")
    return f"Tensor(shape={tuple(x.shape)}, dtype={dtype}, device={x.device})"


def _check_randomness(randomness: str) -> None:
    if randomness not in _RANDOMNESS:
        raise ValueError(
            f"`randomness` must be one of {', '.join(map(repr, _RANDOMNESS))}, got {randomness!r}."
        )
