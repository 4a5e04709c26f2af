"""`build(train_step, donate=True)`: the new state is written into the old state's storage.

A pure step keeps its input: while the update runs, the old parameters and
optimizer moments and the new ones are all alive, and a caller that keeps the
old state keeps both sets for good. `torch.optim` updates in place and holds
one set. Donation gives a built step the same footprint, opt-in:

- Compiled: inside the step, after the user's function returned its new
  state, every tensor of the old state that has a same-shaped, same-dtype
  counterpart in the new state receives the new values (`copy_`), and the
  state returned is made of the old tensors. The copy is an input mutation
  that inductor folds into the kernels computing the new values: they write
  straight into the old storage, so no second state is allocated.
- Eager: nothing is copied (a copy would cost time and save no memory);
  instead `TrainState.apply_gradients` runs the optimizer's in-place form
  where it has one (`sgd`, `adam`, `adamw`: torch.optim's own in-place arithmetic,
  see `updating_in_place_during`), so the new parameters and moments are
  written into the old tensors as they are computed. Either way the old
  state is marked consumed, so a step behaves alike compiled and eager.
- The state object passed in is *consumed*: its fields are replaced by a
  marker whose every use raises `DonatedStateError`, naming the step. A
  consumed state can never be read by mistake and show the next step's
  values, which is the silent wrong donation would otherwise invite.

What is not donated (the new tensor is returned as a pure step would): a
leaf whose shape, dtype, device or layout changed, a leaf the step returned
unchanged (the same tensor), a tensor that appears at two paths of the old
state or that the new state keeps at another path, and tensor subclasses
such as the DTensor shards of `FSDP` (`build` refuses a compiled FSDP
step with `donate=True`; an eager one updates its shards in place). Metrics are returned as copies, so that none shows values a
later call writes. Not supported: a state whose tensors overlap in memory
(views of one another), where two writes would land on the same elements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optree
import torch

from ._rng import RngKey
from ._state import TrainState, map_train_states
from ._tree import NAMESPACE, tree_rebuild, tree_walk
from .optim._base import InPlaceUpdate, in_place


class DonatedStateError(RuntimeError):
    """A state given to a donating step (`build(..., donate=True)`) was used afterwards."""


class Donated:
    """What the fields of a consumed state hold: any use raises `DonatedStateError`."""

    __slots__ = ("_message",)

    def __init__(self, message: str) -> None:
        object.__setattr__(self, "_message", message)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise DonatedStateError(object.__getattribute__(self, "_message"))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # copy / pickle / inspect protocols
            raise AttributeError(name)
        self._refuse()

    def __repr__(self) -> str:
        return "<donated>"

    __getitem__ = __setitem__ = __iter__ = __len__ = __bool__ = __contains__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __matmul__ = __neg__ = __float__ = __int__ = _refuse
    __index__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __setattr__ = _refuse


def _refuse_flatten(marker: Donated) -> Any:
    marker._refuse()


# Any walk over a consumed state (`lf.save`, `tree_map`, a checkpoint) meets the marker as a
# pytree node, whose flattening raises the marker's message instead of treating it as a leaf.
optree.register_pytree_node(
    Donated,
    _refuse_flatten,  # type: ignore[arg-type]
    lambda _, __: None,  # type: ignore[arg-type,return-value]
    namespace=NAMESPACE,
)


def is_consumed(state: Any) -> bool:
    """Whether `state`, or a state one level inside it (a dict of states), was consumed."""
    if isinstance(state, Donated) or _has_marker(state):
        return True
    if isinstance(state, dict | list | tuple):
        items = state.values() if isinstance(state, dict) else state
        return any(isinstance(v, Donated) or _has_marker(v) for v in items)
    return False


def _has_marker(node: Any) -> bool:
    fields = getattr(node, "__dict__", None)
    if not dataclasses.is_dataclass(node) or fields is None:
        return False
    return any(isinstance(v, Donated) for v in fields.values())


def refuse_consumed(state: Any, name: str) -> None:
    """Raise `DonatedStateError` when `state` was consumed by an earlier donating call."""
    if is_consumed(state):
        raise DonatedStateError(_message(name, "passed to"))


def _message(name: str, how: str) -> str:
    return (
        f"This state was donated to `{name}` (built with donate=True): its tensors now hold the "
        f"next step's values, so it was {how} a step that already consumed it. Use the state the "
        f"step returned (`state, metrics = step(state, batch)`), or build the step without "
        f"`donate=True` to keep old states readable (at the cost of a second copy of the state "
        f"while the update runs)."
    )


def consume(state: Any, name: str, *, keep: Any) -> None:
    """Mark `state` consumed, so that any later use of it raises `DonatedStateError`.

    The tensor-holding fields of a dataclass state (a `TrainState`: params,
    buffers, opt_state, step) are set to a `Donated` marker through
    `object.__setattr__`, and the old dicts they held (`state.params`, kept
    by a caller as `p = state.params`) have their tensors replaced by it too,
    unless the new state `keep` holds the same dict. A dict or list of
    states (a GAN's `{"g": ..., "d": ...}`) is marked one level down. Deeper
    containers are left as they are: walking the whole tree would cost every
    step more than the rest of the bookkeeping (~70 us on a 6-tensor MLP).
    """
    marker = Donated(_message(name, "used after"))
    kept = {id(keep)}
    for node in _nodes_one_level(keep):
        kept.add(id(node))
        kept.update(id(child) for child in _children(node))
    for node in _nodes_one_level(state):
        if id(node) in kept:
            continue
        if isinstance(node, dict):
            _mark_dict(node, marker)
            continue
        for field, value in zip(*_field_names_and_values(node), strict=True):
            if isinstance(value, RngKey):  # holds no tensors: the key stays readable
                continue
            if isinstance(value, torch.Tensor | dict | list | tuple) or dataclasses.is_dataclass(
                value
            ):
                if isinstance(value, dict) and id(value) not in kept:
                    _mark_dict(value, marker)
                object.__setattr__(node, field, marker)


def _nodes_one_level(tree: Any) -> list[Any]:
    """`tree` itself when it is a state (a dataclass or a dict of tensors), else its items."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [tree]
    if isinstance(tree, dict) and any(isinstance(v, torch.Tensor) for v in tree.values()):
        return [tree]
    items = (
        tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list | tuple) else ()
    )
    return [
        v
        for v in items
        if (dataclasses.is_dataclass(v) and not isinstance(v, type)) or isinstance(v, dict)
    ]


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node.values())
    return _field_names_and_values(node)[1]


#: A `TrainState`'s pytree children (`tx` is static), read without optree's walk: consuming a
#: state runs twice per donating eager step, and the walk cost ~6 us of its ~26 us each.
_TRAIN_STATE_CHILDREN = ("params", "buffers", "opt_state", "step", "rng")


def _field_names_and_values(node: Any) -> tuple[list[str], list[Any]]:
    """The pytree children of a registered dataclass node (its static fields, e.g. `tx`, are not)."""
    if type(node) is TrainState:
        names = list(_TRAIN_STATE_CHILDREN)
        return names, [getattr(node, n) for n in names]
    children, _, entries, _ = optree.tree_flatten_one_level(node, namespace=NAMESPACE)
    return list(entries), list(children)


def _mark_dict(node: dict[Any, Any], marker: Donated) -> None:
    for key, value in list(node.items()):
        if isinstance(value, torch.Tensor):
            node[key] = marker


def write_back(old: Any, new: Any, metrics: Any = None) -> tuple[Any, Any]:
    """(`new` rebuilt on `old`'s tensors, `metrics` copied), after copying `new` into `old`.

    Runs inside the compiled step, as plain Python over the trees (what
    dynamo can trace); the copies are input mutations of the graph. Leaves
    that cannot be donated keep the new tensor. Not protected: a new leaf
    that is a *view* of a donated old tensor at another path (`state.w.view(-1)`
    stored elsewhere) shows the written values, as it would in eager code
    that updates in place; identical tensors are protected.
    """
    if metrics is not None:
        # Metrics leave the step as copies: one that is (or views) a state tensor would
        # otherwise show the values this or a later donating call writes there. They are small.
        metrics = _copied(metrics)
    old_paths, old_leaves = tree_walk(old)
    new_paths, new_leaves = tree_walk(new)
    if old_paths != new_paths:  # the structure changed: the first call's checks report it
        return new, metrics
    ids = [id(t) for t in old_leaves]
    skip = {i for i in ids if ids.count(i) > 1}  # one tensor at two paths: two values to hold
    # An old tensor the new state keeps at another path must keep its old values there.
    skip.update(id(n) for o, n in zip(old_leaves, new_leaves, strict=True) if o is not n)
    out = list(new_leaves)
    with torch.no_grad():
        for i, (o, n) in enumerate(zip(old_leaves, new_leaves, strict=True)):
            if o is not n and id(o) not in skip and _compatible(o, n):
                o.copy_(n)
                out[i] = o
    return tree_rebuild(new, iter(out)), metrics


def _compatible(o: Any, n: Any) -> bool:
    return (
        type(o) is torch.Tensor
        and type(n) is torch.Tensor
        and o.shape == n.shape
        and o.dtype == n.dtype
        and o.device == n.device
        and o.layout == torch.strided
        and n.layout == torch.strided
        and not o.requires_grad
    )


def updating_in_place_during(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`fn` (an eager step) with `TrainState.apply_gradients` updating in place while it runs.

    Optimizers that can (`sgd`, `adam`, `adamw`) then write the new parameters and
    moments into the old tensors, as torch.optim does: no second copy of
    them is ever allocated. The parameters and optimizer state of the state
    `apply_gradients` was called on are marked consumed right there, so that
    the rest of the step cannot read the overwritten values as old ones (the
    silent wrong this would invite); its step count, buffers and key stay
    readable.
    """
    message = (
        f"This state's parameters and optimizer state were updated in place by "
        f"`apply_gradients` inside `{name}` (built with donate=True and run eagerly): they now "
        f"hold the new values, so they cannot be read as the old ones. Read what you need "
        f"from them before calling `apply_gradients`, use the state that call returned, or "
        f"build the step without `donate=True` to keep the old state readable."
    )

    def on_updated(old: Any, new: Any) -> None:
        # What `consume(old, keep=new)` does, for the two fields the update wrote (the step
        # count, buffers and key stay readable) and without its walk of both states.
        marker = Donated(message)
        for field in ("params", "opt_state"):
            value = getattr(old, field)
            if isinstance(value, dict) and value is not getattr(new, field):
                _mark_dict(value, marker)
            object.__setattr__(old, field, marker)

    def updating(state: Any, *rest: Any) -> Any:
        # Each TrainState given carries the mark in its optimizer for this call only (no
        # global): `apply_gradients` on it, or on a state derived from it, writes in place.
        given: dict[int, TrainState] = {}

        def mark(_: int, ts: TrainState) -> TrainState:
            marked = ts.replace(tx=in_place(ts.tx, on_updated))
            given[id(marked)] = ts
            return marked

        def unmark(_: int, ts: TrainState) -> TrainState:
            if id(ts) in given:  # returned as it was given: the caller's own object
                return given[id(ts)]
            update = ts.tx.update
            return ts.replace(tx=update.wraps) if isinstance(update, InPlaceUpdate) else ts

        # A lone TrainState (the common case) without the tree walk of `map_train_states`.
        lone = type(state) is TrainState
        out = fn(mark(0, state) if lone else map_train_states(mark, state), *rest)
        new = out[0]
        new = unmark(0, new) if type(new) is TrainState else map_train_states(unmark, new)
        # Metrics leave as copies, as a compiled donating step's do: one that is a parameter
        # or a view of one (`state.params["w"][0]`, read before the update) would otherwise
        # show the values written in place, now and at every later step.
        return (new, *out[1:-1], _copied(out[-1]))

    updating.__name__ = getattr(fn, "__name__", "step")
    updating.__qualname__ = getattr(fn, "__qualname__", "step")
    return updating


def _copied(metrics: Any) -> Any:
    _, leaves = tree_walk(metrics)
    return tree_rebuild(metrics, iter([m.clone() for m in leaves]))


def donating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (returning `(state, ..., metrics)`, the state first and the metrics last) with donation.

    The first argument is the state: the new state returned first is written
    into it. A micro-batch step's `(state, accs, metrics)` works the same way.
    """

    def donated(state: Any, *rest: Any) -> Any:
        out = fn(state, *rest)
        new_state, metrics = write_back(state, out[0], out[-1])
        return (new_state, *out[1:-1], metrics)

    donated.__name__ = getattr(fn, "__name__", "step")
    donated.__qualname__ = getattr(fn, "__qualname__", "step")
    return donated
