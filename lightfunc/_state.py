"""`TrainState`: everything a single-model run is, as one immutable pytree."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import optree
import torch

from ._func import buffers_of, params_of
from ._precision import LossScale, Policy, parse_precision
from ._rng import RngKey
from ._tree import NAMESPACE, PyTree, register_dataclass, tree_flatten_with_paths
from .optim._base import (
    GradientTransformation,
    InPlaceUpdate,
    OptState,
    apply_updates,
    update_params,
)
from .optim._masking import is_trainable_only, trainable_only
from .optim._wrappers import ApplyIfFiniteState, apply_if_finite, find_state, unwrapped


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, buffers, optimizer state, step count and RNG key of a run.

    Never mutated: `apply_gradients` and `replace` return new states, so a
    state kept from step k is still step k's state after later steps run.
    It is a pytree (in lightfunc's namespace): `tree_map` reaches every
    tensor, and it can be passed straight into a compiled step.

    Attributes:
        params: dict name -> tensor of trainable parameters (as `named_parameters`).
        buffers: dict name -> tensor of buffers (BatchNorm running stats, ...).
        opt_state: the optimizer's state, a pytree of tensors.
        step: number of optimizer updates applied; 0-d int64 tensor on the params' device.
        rng: the run's random stream position (see `RngKey`); holds no tensors.
        tx: the optimizer (static: part of the tree structure, not a leaf).
            Update transforms wrap it (`lightfunc.optim.apply_if_finite`
            for float16 or `skip_nonfinite`, gradient reduction for `DDP`);
            what they remember lives in `opt_state`.
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: OptState
    step: torch.Tensor
    rng: RngKey | None
    tx: GradientTransformation

    @classmethod
    def create(
        cls,
        model: torch.nn.Module | dict[str, torch.Tensor],
        tx: GradientTransformation,
        *,
        seed: int | None = 0,
        buffers: dict[str, torch.Tensor] | None = None,
        precision: str | int | Policy | None = None,
        skip_nonfinite: bool = False,
        loss_scale: LossScale | None = None,
        skip_unused: bool = True,
    ) -> TrainState:
        """A fresh state from a module (or a dict of parameters) and an optimizer.

        What the module says holds, as with torch.optim: parameters with
        `requires_grad=False` are kept in `params` (so `lf.apply` uses them)
        but never moved, and carry no optimizer state; a parameter whose
        gradient is exactly zero (what `torch.func` gives for a parameter the
        loss does not reach, where torch.optim sees `grad=None`) is left
        alone that step: no weight decay, no moment update. Both come from
        wrapping `tx` in `lightfunc.optim.trainable_only`.

        Args:
            model: an `nn.Module` whose parameters and buffers are copied (the
                module itself is left untouched), or a dict of parameter tensors.
            tx: the optimizer, e.g. `lightfunc.optim.adamw(1e-3)`.
            seed: seed of the run's random stream (dropout and other draws
                inside steps); `None` leaves torch's global generator alone.
                It does not seed the model's initial weights: those were
                drawn when `model` was built, from torch's global generator
                (call `lightfunc.seed_everything` before building it).
            buffers: buffers to use when `model` is a dict.
            precision: a precision string ("bf16-mixed", "16-true", ... see
                `lightfunc.policy`): parameters, floating buffers and the
                optimizer state are stored in its parameter dtype, and
                float16 policies wrap the optimizer in
                `lightfunc.optim.apply_if_finite` with a dynamic `LossScale`.
                Build the step with the same `precision=`.
            skip_nonfinite: wrap the optimizer in `apply_if_finite` with a
                fixed scale of 1.0 under a policy without loss scaling, to
                skip and count updates whose gradients are not finite
                (`build(..., skip_nonfinite=True)`).
            loss_scale: the initial scale to install with them instead of
                the default (`LossScale.create()`: 2**16, grown every 2000
                good steps; `LossScale.fixed()` when no scaling is needed).
            skip_unused: leave a parameter whose gradient is all zeros
                untouched that step, as torch.optim leaves a `grad=None`
                one. Eagerly on the CPU it costs one multi-tensor norm
                pass and one read of a count per step while every
                parameter has a gradient; compiled (or once one is all
                zeros) an `any()` per parameter and a `where` per update
                and moment. False turns it off and applies the update,
                weight decay included.

        Returns:
            A `TrainState` at step 0.

        Example:
            >>> import torch, lightfunc as lf
            >>> state = lf.TrainState.create(torch.nn.Linear(3, 2), lf.optim.sgd(0.1))
            >>> sorted(state.params), int(state.step)
            (['bias', 'weight'], 0)
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(
                f"`seed` must be an int (the run's random stream) or None (no stream), got "
                f"{seed!r} ({type(seed).__name__})."
            )
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"`tx` must be a lightfunc.optim GradientTransformation (e.g. lightfunc.optim.adamw(1e-3)), "
                f"got {type(tx).__name__}. torch.optim optimizers hold mutable state and cannot be used "
                f"in a pure step."
            )
        frozen: tuple[str, ...] = ()
        if isinstance(model, torch.nn.Module):
            params, bufs = params_of(model), buffers_of(model)
            frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
        elif isinstance(model, dict):
            params, bufs = dict(model), dict(buffers or {})
        else:
            raise TypeError(
                f"`model` must be an nn.Module or a dict of tensors, got {type(model).__name__}."
            )
        if (frozen or skip_unused) and not is_trainable_only(tx):
            tx = trainable_only(tx, frozen, skip_unused=skip_unused)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        if precision is not None:
            pol = parse_precision(precision)
            params, bufs = pol.cast_to_param(params), pol.cast_to_param(bufs)
        state = cls(
            params=params,
            buffers=bufs,
            opt_state=tx.init(params),
            step=torch.zeros((), dtype=torch.int64, device=device),
            rng=None if seed is None else RngKey(int(seed)),
            tx=tx,
        )
        if precision is None and not skip_nonfinite and loss_scale is None:
            return state
        return state.with_precision(
            "32-true" if precision is None else precision, skip_nonfinite, loss_scale=loss_scale
        )

    def with_precision(
        self,
        precision: str | int | Policy,
        skip_nonfinite: bool = False,
        *,
        loss_scale: LossScale | None = None,
    ) -> TrainState:
        """This state stored for `precision`: what `create(..., precision=...)` gives.

        Floating parameters, buffers and optimizer state are cast to the
        policy's parameter dtype; a float16 policy (or `skip_nonfinite`)
        wraps the optimizer in `lightfunc.optim.apply_if_finite`, with a
        dynamic `LossScale` for float16 and a fixed one otherwise, unless
        it is wrapped already (`loss_scale` replaces that default scale). A
        state already in that form is returned as it is.

        Example:
            >>> import torch, lightfunc as lf
            >>> state = lf.TrainState.create(torch.nn.Linear(3, 2), lf.optim.adam(1e-3))
            >>> half = state.with_precision("16-true")
            >>> half.params["weight"].dtype, float(half.loss_scale.scale)
            (torch.float16, 65536.0)
        """
        pol = parse_precision(precision)
        changes: dict[str, Any] = {}
        fields: tuple[tuple[str, Any], ...] = (
            ("params", self.params),
            ("buffers", self.buffers),
            ("opt_state", self.opt_state),
        )
        for field, tree in fields:
            # A loss scale stays float32 whatever the policy, under any wrapper.
            leaves, spec = optree.tree_flatten(tree, is_leaf=_is_loss_scale, namespace=NAMESPACE)
            if any(_needs_cast(x, pol.param_dtype) for x in leaves):
                cast = [x if _is_loss_scale(x) else pol.cast_to_param(x) for x in leaves]
                changes[field] = optree.tree_unflatten(spec, cast)
        wants_scale = pol.needs_loss_scaling or skip_nonfinite or loss_scale is not None
        if self.loss_scale is None and wants_scale:
            device = self.step.device
            if loss_scale is not None:
                scale = loss_scale
            elif pol.needs_loss_scaling:
                scale = LossScale.create(device=device)
            else:
                scale = LossScale.fixed(device=device)
            tx = apply_if_finite(self.tx, scale)
            inner = changes.get("opt_state", self.opt_state)
            changes["tx"] = tx
            changes["opt_state"] = ApplyIfFiniteState(
                inner=inner,
                loss_scale=scale,
                last_finite=torch.ones((), dtype=torch.bool, device=device),
            )
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def loss_scale(self) -> LossScale | None:
        """The `LossScale` of this state's `apply_if_finite` optimizer wrapper, if it has one.

        Pass it to `lightfunc.value_and_grad(..., loss_scale=state.loss_scale)`
        in a float16 step; its `skipped` counts the updates skipped so far.
        """
        found = find_state(self.opt_state, ApplyIfFiniteState)
        return None if found is None else found.loss_scale

    def apply_gradients(self, grads: PyTree, **changes: Any) -> TrainState:
        """One optimizer update: a new state with updated params, optimizer state and step.

        Args:
            grads: gradients with the structure of `params`.
            **changes: other fields to replace at the same time (e.g. `buffers=`).

        The optimizer may defer: under `build(..., accumulate_grad_batches=n)`
        it adds the gradients of the first n-1 micro-batches into its state
        and returns `None` updates, and this returns the state with only the
        optimizer state and `changes` replaced (parameters and `step` as
        they were); on the last micro-batch it applies the weighted sum.

        Eagerly (on CPU, leaves of one dtype), `sgd`, `adam` and `adamw`
        compute the new parameters directly with torch.optim's arithmetic, so
        they are torch's bit for bit (``params + updates`` is one rounding
        away; compiled steps add the updates, within that rounding).
        Inside a donating eager step (`build(..., donate=True, compile=False)`)
        optimizers that can (`sgd`, `adam`, `adamw`) write the update into this
        state's parameters and moments instead of new tensors, and this
        state's `params` and `opt_state` are marked consumed: reading them
        afterwards, inside the step or out, raises `DonatedStateError`.
        """
        _check_grads(grads, self.params)
        if torch.compiler.is_compiling():
            mark = None
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
            params = None if updates is None else apply_updates(self.params, updates)
            wrote = False
        else:
            # Eagerly, the optimizers that can (`sgd`, `adam`, `adamw`) compute the new
            # parameters directly, torch.optim's arithmetic; in a donating step
            # (`build(..., donate=True)`) they write them into these parameters and moments.
            mark = _in_place_mark(self.tx)
            params, opt_state, wrote = update_params(
                self.tx, grads, self.opt_state, self.params, in_place=mark is not None
            )
        if params is None:  # deferred (a micro-batch of an accumulated update)
            new = dataclasses.replace(self, opt_state=opt_state, **changes)
        else:
            new = dataclasses.replace(
                self, params=params, opt_state=opt_state, step=self.step + 1, **changes
            )
        if wrote:
            assert mark is not None
            mark.on_updated(self, new)  # `self` shows the new values: it is marked consumed
        return new

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields replaced (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)


register_dataclass(TrainState, static=("tx",))


def _check_grads(grads: PyTree, params: PyTree) -> None:
    """Raise unless `grads` has `params`' structure and each gradient its parameter's shape and dtype.

    torch.optim refuses such a gradient when it is assigned to ``p.grad``;
    without this check the optimizers' arithmetic would broadcast a ``()``
    or ``(1,)`` gradient over its parameter (no error, a wrong update) or
    fail deep inside with no parameter named. A dict of tensors (the usual
    params) is checked without flattening (a few microseconds eagerly;
    compiled, it runs once while tracing).
    """
    if type(grads) is dict and type(params) is dict and grads.keys() == params.keys():
        tensor = torch.Tensor
        for k, g in grads.items():
            p = params[k]
            if type(g) is not tensor or g.shape != p.shape or g.dtype != p.dtype:
                break
        else:
            return
    g_paths, g_leaves, _ = tree_flatten_with_paths(grads)
    p_paths, p_leaves, _ = tree_flatten_with_paths(params)
    if g_paths != p_paths:
        missing = [p for p in p_paths if p not in set(g_paths)]
        extra = [p for p in g_paths if p not in set(p_paths)]
        raise ValueError(
            f"`apply_gradients`: `grads` must have the structure of `state.params` (a "
            f"{type(params).__name__} with {len(p_paths)} leaves), got a {type(grads).__name__} "
            f"with {len(g_paths)} leaves"
            + (f"; missing {missing[:5]}" if missing else "")
            + (f"; not in params {extra[:5]}" if extra else "")
            + ". Pass the gradients `lf.value_and_grad(loss_fn)(state.params)` returns, "
            "transformed leaf by leaf (e.g. with `lf.tree_map`)."
        )
    for path, g, p in zip(p_paths, g_leaves, p_leaves, strict=True):
        if not isinstance(p, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(
                f"`apply_gradients`: the gradient of `{path}` must be a tensor like its "
                f"parameter (shape {tuple(p.shape)}, {p.dtype}), got {type(g).__name__}."
            )
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(
                f"`apply_gradients`: the gradient of `{path}` has shape {tuple(g.shape)} and "
                f"dtype {g.dtype}; its parameter has shape {tuple(p.shape)} and dtype {p.dtype}. "
                f"A gradient must match its parameter in both (torch.optim refuses it as `.grad` "
                f"too); the optimizer would otherwise broadcast it into a wrong update. Compute "
                f"it with `lf.value_and_grad` with respect to `state.params`, and keep "
                f"transforms shape- and dtype-preserving (cast with `.to(p.dtype)`)."
            )


def _in_place_mark(tx: GradientTransformation) -> InPlaceUpdate | None:
    """The mark of a donating eager step among `tx`'s wrappers (a strategy may wrap it)."""
    return next((t.update for t in unwrapped(tx) if isinstance(t.update, InPlaceUpdate)), None)


def _is_loss_scale(x: Any) -> bool:
    return isinstance(x, LossScale)


def _needs_cast(x: Any, dtype: torch.dtype) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype


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
