"""The precision transform behind `build(..., precision=...)` (policies and scales: `_precision`).

A step built with a policy runs under `apply_policy`: autocast or cast
inputs, outputs in the output dtype, and, with loss scaling or
`skip_nonfinite`, a `_Scaling` context that `lightfunc.value_and_grad`
consults to scale the loss, unscale the gradients and record their
finiteness, after which a non-finite step returns the old state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._precision import PRECISIONS, LossScale, Policy, all_finite, cast_tree
from ._tree import PyTree, tree_flatten_with_paths, tree_rebuild, tree_walk


class _Scaling:
    """What `lightfunc.value_and_grad` does inside a precision-transformed step.

    With a `scale`, the loss is multiplied by it before differentiating and
    the gradients divided by it after; with or without, the finiteness of
    every gradient computed is recorded, for the transform to skip the update.
    """

    def __init__(self, scale: LossScale | None) -> None:
        self.scale = scale
        self.finite: list[torch.Tensor] = []

    def value_and_grad(
        self,
        fn: Callable[..., Any],
        argnums: int | tuple[int, ...],
        has_aux: bool,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, PyTree]:
        scale = self.scale
        if scale is None:
            grads, value = torch.func.grad_and_value(fn, argnums=argnums, has_aux=has_aux)(
                *args, **kwargs
            )
        else:

            def scaled(*a: Any, **k: Any) -> tuple[torch.Tensor, Any]:
                out = fn(*a, **k)
                loss = out[0] if has_aux else out
                return scale.scale_loss(loss), out

            grads, (_, value) = torch.func.grad_and_value(scaled, argnums=argnums, has_aux=True)(
                *args, **kwargs
            )
            grads = scale.unscale(grads)
        self.finite.append(all_finite(grads))
        return value, grads


_ACTIVE: list[_Scaling] = []


def active_scaling() -> _Scaling | None:
    """The innermost precision transform's scaling, if a step is running under one."""
    return _ACTIVE[-1] if _ACTIVE else None


def get_loss_scale(state: Any) -> LossScale | None:
    """`state.loss_scale` (or `state["loss_scale"]` for a dict state), if present."""
    found = (
        state.get("loss_scale")
        if isinstance(state, Mapping)
        else getattr(state, "loss_scale", None)
    )
    return found if isinstance(found, LossScale) else None


def _set_loss_scale(state: Any, scale: LossScale) -> Any:
    if isinstance(state, Mapping):
        return {**state, "loss_scale": scale}
    return dataclasses.replace(state, loss_scale=scale)


def check_state(state: Any, pol: Policy, skip_nonfinite: bool, name: str) -> None:
    """Raise a readable error when `state` was not created for `pol` (first call only)."""
    spec = describe(pol)
    params = state.get("params") if isinstance(state, Mapping) else getattr(state, "params", None)
    if params is not None:
        paths, leaves, _ = tree_flatten_with_paths(params)
        for path, leaf in zip(paths, leaves, strict=True):
            floating = isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
            if floating and leaf.dtype != pol.param_dtype:
                raise ValueError(
                    f"`{name}` is built with precision {spec}, which stores parameters in "
                    f"{pol.param_dtype}, but the state's parameter `params.{path}` is "
                    f"{leaf.dtype}. Create the state with "
                    f"lightfunc.TrainState.create(..., precision={spec}) or convert it with "
                    f"state.with_precision({spec})."
                )
    if (pol.needs_loss_scaling or skip_nonfinite) and get_loss_scale(state) is None:
        why = "float16 needs loss scaling" if pol.needs_loss_scaling else "skip_nonfinite=True"
        fix = (
            f"lightfunc.TrainState.create(..., precision={spec})"
            if pol.needs_loss_scaling
            else f"lightfunc.TrainState.create(..., precision={spec}, skip_nonfinite=True)"
        )
        raise ValueError(
            f"`{name}` is built with precision {spec} ({why}), so its state must carry a "
            f"lightfunc.LossScale as `loss_scale`, but {type(state).__name__} has none. "
            f"Create the state with {fix}."
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
    - With loss scaling (float16) or `skip_nonfinite`, every
      `lightfunc.value_and_grad` inside the step scales the loss, unscales the
      gradients and records whether they are finite; a step with non-finite
      gradients returns the old state (parameters, optimizer state, buffers
      and step count unchanged) with the scale backed off. No host sync: the
      choice is a `torch.where` per leaf.
    """
    mixed = pol.compute_dtype != pol.param_dtype
    scaled = kind == "train" and (pol.needs_loss_scaling or skip_nonfinite)

    def precise(state: Any, batch: Any) -> Any:
        if not mixed:
            batch = cast_tree(batch, pol.compute_dtype)
        scale = get_loss_scale(state) if scaled else None
        scaling = _Scaling(scale if pol.needs_loss_scaling else None)
        _ACTIVE.append(scaling)
        try:
            with torch.autocast(_device_type(state, batch), dtype=pol.compute_dtype, enabled=mixed):
                out = fn(state, batch)
        finally:
            _ACTIVE.pop()
        if kind != "train":
            return cast_tree(out, pol.output_dtype)
        new_state, metrics = out
        metrics = cast_tree(metrics, pol.output_dtype) if isinstance(metrics, dict) else metrics
        if scale is None:
            return new_state, metrics
        if not scaling.finite:
            raise TypeError(
                f"precision={describe(pol)} with loss scaling or skip_nonfinite needs the step "
                f"to compute its gradients with lightfunc.value_and_grad, which scales the "
                f"loss and checks the gradients; `{getattr(fn, '__name__', 'step')}` never "
                f"called it."
            )
        # The new state's finiteness too: under data parallelism the update used
        # gradients averaged over the ranks, which are non-finite on every rank
        # if they are on any one, so every rank makes the same choice.
        finite = torch.stack([*scaling.finite, _tensors_finite(new_state)]).all()
        new_scale = scale.update(finite)
        new_state = _set_loss_scale(_select(finite, new_state, state), new_scale)
        metrics = dict(metrics)
        if scale.dynamic:
            metrics["loss_scale"] = scale.scale
        # A float, so that reducing metrics over ranks (floats are averaged,
        # ints summed) keeps the count, which every rank shares.
        metrics["skipped_steps"] = new_scale.skipped.to(torch.float32)
        return new_state, metrics

    precise.__name__ = getattr(fn, "__name__", "step")
    precise.__doc__ = getattr(fn, "__doc__", None)
    # torch.compile caches graphs per code object: a fresh copy per transformed
    # step keeps two built steps (train and eval, say) from sharing one cache
    # and recompiling each other out of it.
    precise.__code__ = precise.__code__.replace()
    return precise


def _select(finite: torch.Tensor, new: Any, old: Any) -> Any:
    """`apply_if_finite` for whole states, walked by hand (it runs inside compiled steps)."""
    _, new_leaves = tree_walk(new)
    _, old_leaves = tree_walk(old)
    picked = [torch.where(finite, a, b) for a, b in zip(new_leaves, old_leaves, strict=True)]
    return tree_rebuild(new, iter(picked))


def _tensors_finite(tree: Any) -> torch.Tensor:
    """Whether every floating tensor in `tree` is finite (a 0-d bool tensor)."""
    return all_finite([x for x in tree_walk(tree)[1] if x.is_floating_point()])


def _device_type(*trees: Any) -> str:
    """The device type of the first tensor found in `trees` ("cpu" if none)."""
    for tree in trees:
        _, leaves = tree_walk(tree)
        if leaves:
            return leaves[0].device.type
    return "cpu"
