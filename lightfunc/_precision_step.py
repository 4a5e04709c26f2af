"""The precision transform behind `build(..., precision=...)` (policies and scales: `_precision`).

A step built with a policy runs under `apply_policy`: the forward and
backward in the policy's compute dtype (autocast for "-mixed", cast inputs
for "-true"), metrics and outputs in its output dtype. Skipping
non-finite updates and loss scaling are not done here: they are the
state's optimizer wrapper (`lightfunc.optim.apply_if_finite`, installed by
`prepare_for_policy`), and a float16 step scales its loss with
`lightfunc.value_and_grad(..., loss_scale=state.loss_scale)`. This
transform only reports them, as the `loss_scale` and `skipped_steps`
metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._precision import PRECISIONS, LossScale, Policy, cast_tree
from ._state import TrainState, map_train_states, train_states
from ._tree import tree_flatten_with_paths, tree_walk
from .optim._wrappers import ApplyIfFiniteState


def prepare_for_policy(state: Any, pol: Policy, skip_nonfinite: bool) -> Any:
    """Every `TrainState` in `state` stored for `pol` (`TrainState.with_precision`)."""
    return map_train_states(lambda _, ts: ts.with_precision(pol, skip_nonfinite), state)


def check_state(state: Any, pol: Policy, skip_nonfinite: bool, name: str) -> None:
    """Raise a readable error when `state` was not prepared for `pol` (first call only)."""
    spec = describe(pol)
    found = train_states(state)
    params_trees = [ts.params for ts in found]
    if not found:
        params = (
            state.get("params") if isinstance(state, Mapping) else getattr(state, "params", None)
        )
        params_trees = [] if params is None else [params]
    for params in params_trees:
        paths, leaves, _ = tree_flatten_with_paths(params)
        for path, leaf in zip(paths, leaves, strict=True):
            floating = isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
            if floating and leaf.dtype != pol.param_dtype:
                raise ValueError(
                    f"`{name}` is built with precision {spec}, which stores parameters in "
                    f"{pol.param_dtype}, but the state's parameter `params.{path}` is "
                    f"{leaf.dtype}. Create the state with "
                    f"lightfunc.TrainState.create(..., precision={spec}), convert it with "
                    f"step.prepare(state), or let lightfunc.loop / fit do it."
                )
    if not (pol.needs_loss_scaling or skip_nonfinite):
        return
    why = "float16 needs loss scaling" if pol.needs_loss_scaling else "skip_nonfinite=True"
    if not found:
        raise TypeError(
            f"`{name}` is built with precision {spec} ({why}), which skips non-finite updates "
            f"through the optimizer of each lightfunc.TrainState in the state, but the state "
            f"({type(state).__name__}) holds none. Keep each model's params and optimizer in "
            f"a TrainState."
        )
    if any(ts.loss_scale is None for ts in found):
        raise ValueError(
            f"`{name}` is built with precision {spec} ({why}), so every TrainState's optimizer "
            f"must be wrapped in lightfunc.optim.apply_if_finite (which holds the loss scale "
            f"and the skip counter), but the state's is not. Prepare the state with "
            f"step.prepare(state) (lightfunc.loop and fit do it), or create it with "
            f"lightfunc.TrainState.create(..., precision={spec}"
            f"{'' if pol.needs_loss_scaling else ', skip_nonfinite=True'})."
        )


class _ProbeScale(LossScale):
    """A `LossScale` that notes whether a step scaled its loss with it (first call only)."""

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        object.__setattr__(self, "used", True)
        return super().scale_loss(loss)


def check_loss_scaled(
    run_eagerly: Callable[[Any, Any], Any], state: Any, batch: Any, name: str
) -> None:
    """Raise unless a float16 step scales its loss with `state.loss_scale` (first call only).

    Runs the step once, eagerly, on a copy of the state whose scales note
    their use; the result is discarded. Without scaling, float16 gradients
    underflow to zero silently, so this is checked, not assumed.
    """
    probes: list[_ProbeScale] = []

    def probe(_: int, ts: TrainState) -> TrainState:
        wrapper = ts.opt_state
        if not isinstance(wrapper, ApplyIfFiniteState) or not wrapper.loss_scale.dynamic:
            return ts
        scale = wrapper.loss_scale
        fields = {f.name: getattr(scale, f.name) for f in dataclasses.fields(scale)}
        probes.append(_ProbeScale(**fields))
        return ts.replace(opt_state=dataclasses.replace(wrapper, loss_scale=probes[-1]))

    probed = map_train_states(probe, state)
    if not probes:
        return
    run_eagerly(probed, batch)
    if not all(getattr(p, "used", False) for p in probes):
        raise ValueError(
            f"`{name}` runs in float16, whose small gradients underflow to zero unless the loss "
            f"is scaled, but it does not scale its loss with the state's scale. Compute the "
            f"gradients with lightfunc.value_and_grad(loss_fn, ..., loss_scale=state.loss_scale) "
            f"(for each TrainState whose loss you differentiate)."
        )


def describe(pol: Policy) -> str:
    """The precision string `pol` parses from, quoted, or the `Policy` itself."""
    for spec, known in PRECISIONS.items():
        if known == pol:
            return repr(spec)
    return repr(pol)


def apply_policy(
    fn: Callable[[Any, Any], Any], pol: Policy, *, skip_nonfinite: bool, kind: str
) -> Callable[[Any, Any], Any]:
    """`fn` run under `pol`: the transform behind `build(..., precision=...)`.

    - "*-mixed": the call runs under `torch.autocast` in the compute dtype;
      parameters stay in their (float32) storage dtype, so gradients and the
      optimizer update are float32 as well.
    - "*-true": floating inputs in the batch are cast to the compute dtype;
      the state is already stored in it (`TrainState.create(..., precision=...)`).
    - Floating metrics (or an eval step's outputs) come back in the output dtype.
    - With loss scaling (float16) or `skip_nonfinite`, the metrics gain the
      scale (`loss_scale`, dynamic scales only) and the number of updates
      skipped so far (`skipped_steps`), read from the new state's
      `apply_if_finite` optimizer state.
    """
    mixed = pol.compute_dtype != pol.param_dtype
    report = kind == "train" and (pol.needs_loss_scaling or skip_nonfinite)

    def precise(state: Any, batch: Any) -> Any:
        if not mixed:
            batch = cast_tree(batch, pol.compute_dtype)
        with torch.autocast(_device_type(state, batch), dtype=pol.compute_dtype, enabled=mixed):
            out = fn(state, batch)
        if kind != "train":
            return cast_tree(out, pol.output_dtype)
        new_state, metrics = out
        if not isinstance(metrics, dict):
            return new_state, metrics  # the first-call check explains what a step returns
        metrics = cast_tree(metrics, pol.output_dtype)
        if report:
            metrics = {**metrics, **_scale_metrics(new_state)}
        return new_state, metrics

    precise.__name__ = getattr(fn, "__name__", "step")
    precise.__doc__ = getattr(fn, "__doc__", None)
    return precise


def _scale_metrics(state: Any) -> dict[str, torch.Tensor]:
    """`loss_scale` (of the first dynamic scale) and `skipped_steps` (summed) of `state`."""
    # A plain loop: dynamo (torch 2.13) cannot trace an assignment expression in a comprehension.
    scales = []
    for ts in train_states(state):
        if ts.loss_scale is not None:
            scales.append(ts.loss_scale)
    if not scales:
        return {}
    out: dict[str, torch.Tensor] = {}
    dynamic = [s for s in scales if s.dynamic]
    if dynamic:
        out["loss_scale"] = dynamic[0].scale
    # A float: summed over micro-batches it is taken from the last, and over
    # ranks every rank reports the same count (a declared "max" reduction).
    out["skipped_steps"] = torch.stack([s.skipped for s in scales]).sum().to(torch.float32)
    return out


def _device_type(*trees: Any) -> str:
    """The device type of the first tensor found in `trees` ("cpu" if none)."""
    for tree in trees:
        _, leaves = tree_walk(tree)
        if leaves:
            return leaves[0].device.type
    return "cpu"
