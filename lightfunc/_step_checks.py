"""The checks a built step runs on its first call (and, with `validate="always"`, on every call).

What they check, and why, is in `lightfunc._build`'s module docstring: the
returned `(state, metrics)`, the new state's structure, shapes and dtypes,
metrics as 0-d tensors, no input written in place, and, for each
`TrainState`, that the loss depends on `state.params` and that buffers
`lf.apply` updated were not dropped (one eager probe run, only when the
first step looks suspicious). Split out of `_build.py` to keep it readable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._state import TrainState, map_train_states, train_states
from ._tree import PyTree, describe_leaf, tree_flatten_with_paths, tree_structure
from .optim._base import GradientTransformation


def input_versions(tree: PyTree) -> list[int | None]:
    _, leaves, _ = tree_flatten_with_paths(tree)
    return [x._version if isinstance(x, torch.Tensor) else None for x in leaves]


def check_not_mutated(before: list[int | None], tree: PyTree, name: str) -> None:
    paths, leaves, _ = tree_flatten_with_paths(tree)
    for path, leaf, version in zip(paths, leaves, before, strict=True):
        if isinstance(leaf, torch.Tensor) and leaf._version != version:
            raise RuntimeError(
                f"`{name}` modified its input in place at `{path}`. Steps must be pure: "
                f"return new tensors (`x = x + y`, not `x.add_(y)`; clone buffers before "
                f"updating them, as lightfunc.apply does)."
            )


def check_train_output(out: Any, state: Any, name: str) -> None:
    if not (isinstance(out, tuple) and len(out) == 2):
        got = f"a tuple of length {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise TypeError(
            f"`{name}` must return `(new_state, metrics)`, got {got}. "
            f"Eval and predict steps, which return only metrics, are built with lightfunc.build_eval."
        )
    new_state, metrics = out
    _check_same_tree(state, new_state, name)
    _check_metrics(metrics, name)


def _check_same_tree(old: Any, new: Any, name: str) -> None:
    if tree_structure(old) != tree_structure(new):
        old_paths, _, _ = tree_flatten_with_paths(old)
        new_paths, _, _ = tree_flatten_with_paths(new)
        missing = sorted(set(old_paths) - set(new_paths))
        extra = sorted(set(new_paths) - set(old_paths))
        detail = ""
        if missing:
            detail += f" Missing in the returned state: {', '.join(missing[:8])}."
        if extra:
            detail += f" Not in the input state: {', '.join(extra[:8])}."
        raise ValueError(
            f"`{name}` returned a state whose structure differs from its input "
            f"(given {type(new).__name__}, expected {type(old).__name__} of the same structure).{detail} "
            f"Build the new state with state.replace(...) or state.apply_gradients(...)."
        )
    paths, old_leaves, _ = tree_flatten_with_paths(old)
    _, new_leaves, _ = tree_flatten_with_paths(new)
    for path, a, b in zip(paths, old_leaves, new_leaves, strict=True):
        if isinstance(a, torch.Tensor) and (
            not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype
        ):
            raise ValueError(
                f"`{name}` changed the state leaf `{path}`: given {describe_leaf(b)}, "
                f"expected {describe_leaf(a)}. A step must keep every leaf's shape and dtype "
                f"(a changing shape or dtype would recompile every step)."
            )


def _check_metrics(metrics: Any, name: str) -> None:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"`{name}` must return metrics as a dict of 0-d tensors, got {type(metrics).__name__}. "
            f"Return {{}} if there is nothing to report."
        )
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(
                f"`{name}` returned a metric key {key!r} of type {type(key).__name__}; keys must be str."
            )
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise ValueError(
                f"`{name}` returned metric {key!r} as {describe_leaf(value)}; expected a 0-d tensor. "
                f"Reduce it (e.g. .mean()) and keep it a tensor: calling .item() inside a step syncs "
                f"with the device every step."
            )


def check_validate(validate: Any) -> None:
    if not (isinstance(validate, bool) or validate == "always"):
        raise ValueError(
            f'`validate` must be True (check the first call), False (no checks) or "always" '
            f"(check every call: a debug mode), got {validate!r}."
        )


def explain_plain_state(error: Exception, name: str) -> None:
    """Raise a clearer error for `state.apply_gradients` (or `.params`, ...) on a dict state."""
    attr, obj = getattr(error, "name", None), getattr(error, "obj", None)
    if (
        isinstance(error, AttributeError)
        and isinstance(obj, dict)
        and hasattr(TrainState, attr or "-")
    ):
        raise AttributeError(
            f"`{name}` called `.{attr}` on a dict (keys: {sorted(map(str, obj))[:6]}); it is a "
            f"`lightfunc.TrainState` attribute. Create the state with "
            f"`lf.TrainState.create(model, tx)`, or, for a dict of states, call it on the entry: "
            f'`state["model"].{attr}`.'
        ) from error


def check_learns(
    eager: Callable[..., Any], state: Any, batch: Any, new_state: Any, name: str
) -> None:
    """Raise when a `TrainState`'s loss ignores its params, or the step dropped updated buffers.

    Cheap when all is well: one comparison of each `TrainState`'s tensors
    before and after the first step. Only a suspicious result (every
    parameter exactly unchanged though the step count advanced, or a floating
    buffer exactly unchanged) pays for one more, eager, run of the step that
    records the gradients the optimizer received and the buffers `lf.apply`
    updated.
    """
    old_states, new_states = train_states(state), train_states(new_state)
    if len(old_states) != len(new_states):
        return
    frozen_params: list[int] = []
    kept_buffers: list[int] = []
    for i, (old, new) in enumerate(zip(old_states, new_states, strict=True)):
        if not _plain_tensors(old.params) or not _plain_tensors(old.buffers):
            continue  # sharded: comparing would need collectives
        advanced = bool(torch.ne(old.step, new.step).any())  # `.any()`: stacked (ensemble) states
        if advanced and old.params and _all_equal(old.params, new.params):
            frozen_params.append(i)
        if any(
            v.is_floating_point() and k in new.buffers and torch.equal(v, new.buffers[k])
            for k, v in old.buffers.items()
        ):
            kept_buffers.append(i)
    if not frozen_params and not kept_buffers:
        return
    try:
        zero_grads, updated = _probe(eager, state, batch, set(frozen_params))
    except RuntimeError:
        # The probe reads gradients on the host; under vmap (an ensemble step) it cannot.
        # It only explains a suspicious first step, so without it the step stands.
        return
    for i in frozen_params:
        if zero_grads.get(i, False):
            raise ValueError(
                f"`{name}`: the loss does not depend on the parameters of the TrainState "
                f"{_which(i, len(old_states))}: every gradient was exactly zero on the first call, so "
                f"nothing can learn. The step probably calls the module directly (`model(x)`), which "
                f"uses the module's own tensors, not the state's. Call it with the parameters the "
                f"gradient is taken of:\n"
                f"    def loss_fn(params):\n"
                f"        out, new_buffers = lf.apply(model, params, state.buffers, x, train=True)\n"
                f"        return loss(out, y), new_buffers\n"
                f"    (loss, new_buffers), grads = lf.value_and_grad(loss_fn, has_aux=True)(state.params)"
            )
    for i in kept_buffers:
        old, new = old_states[i], new_states[i]
        dropped = [
            k for k in sorted(updated.get(i, ())) if torch.equal(old.buffers[k], new.buffers[k])
        ]
        if dropped:
            listed = ", ".join(f"`{k}`" for k in dropped[:6]) + (" ..." if len(dropped) > 6 else "")
            raise ValueError(
                f"`{name}` dropped buffers that `lf.apply` updated: {listed} of the TrainState "
                f"{_which(i, len(old_states))} kept their old values in the returned state, so "
                f"BatchNorm's running statistics (or other buffers) never change. `lf.apply` returns "
                f"them as `new_buffers`; pass them on: "
                f"`state.apply_gradients(grads, buffers=new_buffers)` (return them from the loss "
                f"function as aux: `lf.value_and_grad(loss_fn, has_aux=True)`). If the statistics "
                f"should stay fixed, call `lf.apply(..., train=False)`."
            )


def _which(i: int, n: int) -> str:
    return "in the state" if n == 1 else f"number {i} (in tree order) of the state"


def _plain_tensors(tree: dict[str, torch.Tensor]) -> bool:
    return all(type(v) is torch.Tensor for v in tree.values())


def _all_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _probe(
    eager: Callable[..., Any], state: Any, batch: Any, watch_grads: set[int]
) -> tuple[dict[int, bool], dict[int, set[str]]]:
    """Run the step eagerly once; which `TrainState`s got all-zero gradients, which buffers
    `lf.apply` updated (in place, on the copies it makes)."""
    zero_grads: dict[int, bool] = {}

    def record(i: int, ts: TrainState) -> TrainState:
        if i not in watch_grads:
            return ts
        inner = ts.tx

        def update(updates: Any, state: Any, params: Any | None = None) -> tuple[Any, Any]:
            leaves = [g for g in tree_flatten_with_paths(updates)[1] if isinstance(g, torch.Tensor)]
            zero_grads[i] = zero_grads.get(i, True) and all(not g.any() for g in leaves)
            return inner.update(updates, state, params)

        return ts.replace(tx=GradientTransformation(inner.init, update))

    buffer_names = {
        id(b): (i, k) for i, ts in enumerate(train_states(state)) for k, b in ts.buffers.items()
    }
    with _BufferWatch(buffer_names) as watch:
        eager(map_train_states(record, state), batch)
    return zero_grads, watch.updated


class _BufferWatch(torch.overrides.TorchFunctionMode):
    """Records which buffers get written in place through the copies `lf.apply` makes of them.

    `lf.apply` clones each buffer and lets the module update the clone (BatchNorm's
    running statistics, `num_batches_tracked`); a clone written in place, or handed to
    a normalisation in training mode, marks its buffer as updated.
    """

    def __init__(self, buffer_names: dict[int, tuple[int, str]]) -> None:
        super().__init__()
        self.sources = buffer_names
        self.clones: dict[int, tuple[int, str]] = {}
        self.keep: list[torch.Tensor] = []  # the clones, alive so their ids stay unique
        self.updated: dict[int, set[str]] = {}

    def _mark(self, t: Any) -> None:
        where = self.clones.get(id(t)) if isinstance(t, torch.Tensor) else None
        if where is not None:
            self.updated.setdefault(where[0], set()).add(where[1])

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fname = getattr(func, "__name__", "")
        if fname == "clone" and args and id(args[0]) in self.sources:
            self.clones[id(out)] = self.sources[id(args[0])]
            self.keep.append(out)
        elif fname.endswith("_") and not fname.endswith("__") and args:
            self._mark(args[0])
        elif fname in ("batch_norm", "instance_norm"):
            # F.batch_norm, torch.batch_norm and their instance_norm twins all take the
            # training flag (`use_input_stats`) sixth; only then are running statistics written.
            training = (
                args[5] if len(args) > 5 else kwargs.get("training", kwargs.get("use_input_stats"))
            )
            if training:
                for value in (*args, *kwargs.values()):
                    self._mark(value)
        return out
