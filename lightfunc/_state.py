"""`TrainState`: everything a single-model run is, as one immutable pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._accumulate import active_accumulation
from ._func import buffers_of, params_of
from ._precision import LossScale, Policy, policy
from ._rng import RngKey
from ._tree import PyTree, register_dataclass, tree_leaves
from .optim._base import GradientTransformation, OptState, apply_updates


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
        loss_scale: the dynamic loss scale of a float16 run (or the skip counter
            of `skip_nonfinite`), else None. See `lightfunc.LossScale`.
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: OptState
    step: torch.Tensor
    rng: RngKey | None
    tx: GradientTransformation
    loss_scale: LossScale | None = None

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
    ) -> TrainState:
        """A fresh state from a module (or a dict of parameters) and an optimizer.

        Args:
            model: an `nn.Module` whose parameters and buffers are copied (the
                module itself is left untouched), or a dict of parameter tensors.
            tx: the optimizer, e.g. `lightfunc.optim.adamw(1e-3)`.
            seed: seed of the run's random stream (dropout and other draws
                inside steps); `None` leaves torch's global generator alone.
            buffers: buffers to use when `model` is a dict.
            precision: a precision string ("bf16-mixed", "16-true", ... see
                `lightfunc.policy`): parameters, floating buffers and the
                optimizer state are stored in its parameter dtype, and
                float16 policies get a dynamic `LossScale`. Build the step
                with the same `precision=`.
            skip_nonfinite: also carry a fixed `LossScale` of 1.0 under a
                policy without loss scaling, to skip and count steps whose
                gradients are not finite (`build(..., skip_nonfinite=True)`).

        Returns:
            A `TrainState` at step 0.

        Example:
            >>> import torch, lightfunc as lf
            >>> state = lf.TrainState.create(torch.nn.Linear(3, 2), lf.optim.sgd(0.1))
            >>> sorted(state.params), int(state.step)
            (['bias', 'weight'], 0)
        """
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"`tx` must be a lightfunc.optim GradientTransformation (e.g. lightfunc.optim.adamw(1e-3)), "
                f"got {type(tx).__name__}. torch.optim optimizers hold mutable state and cannot be used "
                f"in a pure step."
            )
        if isinstance(model, torch.nn.Module):
            params, bufs = params_of(model), buffers_of(model)
        elif isinstance(model, dict):
            params, bufs = dict(model), dict(buffers or {})
        else:
            raise TypeError(
                f"`model` must be an nn.Module or a dict of tensors, got {type(model).__name__}."
            )
        device = next(iter(params.values())).device if params else torch.device("cpu")
        if precision is not None:
            pol = policy(precision)
            params, bufs = pol.cast_to_param(params), pol.cast_to_param(bufs)
        state = cls(
            params=params,
            buffers=bufs,
            opt_state=tx.init(params),
            step=torch.zeros((), dtype=torch.int64, device=device),
            rng=None if seed is None else RngKey(int(seed)),
            tx=tx,
        )
        if precision is None and not skip_nonfinite:
            return state
        return state.with_precision("32-true" if precision is None else precision, skip_nonfinite)

    def with_precision(
        self, precision: str | int | Policy, skip_nonfinite: bool = False
    ) -> TrainState:
        """This state stored for `precision`: what `create(..., precision=...)` gives.

        Floating parameters, buffers and optimizer state are cast to the
        policy's parameter dtype; a float16 policy (or `skip_nonfinite`) adds
        a `LossScale` unless the state already has one. A state already in
        that form is returned as it is.

        Example:
            >>> import torch, lightfunc as lf
            >>> state = lf.TrainState.create(torch.nn.Linear(3, 2), lf.optim.adam(1e-3))
            >>> half = state.with_precision("16-true")
            >>> half.params["weight"].dtype, float(half.loss_scale.scale)
            (torch.float16, 65536.0)
        """
        pol = policy(precision)
        changes: dict[str, Any] = {}
        for field in ("params", "buffers", "opt_state"):
            tree = getattr(self, field)
            if any(
                isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != pol.param_dtype
                for x in tree_leaves(tree)
            ):
                changes[field] = pol.cast_to_param(tree)
        if self.loss_scale is None and (pol.needs_loss_scaling or skip_nonfinite):
            device = self.step.device
            changes["loss_scale"] = (
                LossScale.create(device=device)
                if pol.needs_loss_scaling
                else LossScale.fixed(device=device)
            )
        return dataclasses.replace(self, **changes) if changes else self

    def apply_gradients(self, grads: PyTree, **changes: Any) -> TrainState:
        """One optimizer update: a new state with updated params, optimizer state and step.

        Args:
            grads: gradients with the structure of `params`.
            **changes: other fields to replace at the same time (e.g. `buffers=`).

        Under `build(..., accumulate_grad_batches=n)` the update is deferred:
        on the first n-1 micro-batches this returns the state with only
        `changes` applied, and on the last it applies the mean gradient.
        """
        accumulation = active_accumulation()
        if accumulation is not None:
            grads = accumulation.take(grads)
            if grads is None:
                return dataclasses.replace(self, **changes) if changes else self
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = apply_updates(self.params, updates)
        return dataclasses.replace(
            self, params=params, opt_state=opt_state, step=self.step + 1, **changes
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields replaced (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)


register_dataclass(TrainState, static=("tx",))
