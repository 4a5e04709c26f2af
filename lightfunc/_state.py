"""`TrainState`: everything a single-model run is, as one immutable pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._func import buffers_of, params_of
from ._rng import RngKey
from ._tree import PyTree, register_dataclass
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
    ) -> TrainState:
        """A fresh state from a module (or a dict of parameters) and an optimizer.

        Args:
            model: an `nn.Module` whose parameters and buffers are copied (the
                module itself is left untouched), or a dict of parameter tensors.
            tx: the optimizer, e.g. `lightfunc.optim.adamw(1e-3)`.
            seed: seed of the run's random stream (dropout and other draws
                inside steps); `None` leaves torch's global generator alone.
            buffers: buffers to use when `model` is a dict.

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
        return cls(
            params=params,
            buffers=bufs,
            opt_state=tx.init(params),
            step=torch.zeros((), dtype=torch.int64, device=device),
            rng=None if seed is None else RngKey(int(seed)),
            tx=tx,
        )

    def apply_gradients(self, grads: PyTree, **changes: Any) -> TrainState:
        """One optimizer update: a new state with updated params, optimizer state and step.

        Args:
            grads: gradients with the structure of `params`.
            **changes: other fields to replace at the same time (e.g. `buffers=`).
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = apply_updates(self.params, updates)
        return dataclasses.replace(
            self, params=params, opt_state=opt_state, step=self.step + 1, **changes
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields replaced (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)


register_dataclass(TrainState, static=("tx",))
