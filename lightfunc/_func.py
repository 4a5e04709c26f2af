"""`nn.Module` as a function: parameters and buffers in, outputs and new buffers out.

    params, buffers = params_of(model), buffers_of(model)
    out, new_buffers = apply(model, params, buffers, x, train=True)
    (loss, aux), grads = value_and_grad(loss_fn, has_aux=True)(params, ...)

`apply` never writes into the tensors it is given: BatchNorm's running
statistics are updated on copies and returned as `new_buffers`. The train /
eval mode is an argument, not module state: `apply` sets it for the call and
restores the module's own flags afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import functional_call

from ._precision import LossScale
from ._tree import PyTree

Params = dict[str, torch.Tensor]
Buffers = dict[str, torch.Tensor]


def params_of(module: torch.nn.Module, *, trainable_only: bool = False) -> Params:
    """A detached copy of `module`'s parameters, keyed as in `named_parameters()`.

    Args:
        module: the module to read; it is not modified.
        trainable_only: keep only parameters with `requires_grad=True`.

    Returns:
        dict name -> tensor (fresh storage, `requires_grad=False`).
    """
    return {
        name: p.detach().clone()
        for name, p in module.named_parameters()
        if p.requires_grad or not trainable_only
    }


def buffers_of(module: torch.nn.Module) -> Buffers:
    """A detached copy of `module`'s buffers (running statistics, counters), keyed by name."""
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def apply(
    module: torch.nn.Module,
    params: Params,
    buffers: Buffers,
    *args: Any,
    train: bool,
    **kwargs: Any,
) -> tuple[Any, Buffers]:
    """Call `module` with the given parameters and buffers, functionally.

    Args:
        module: the module whose `forward` is used; its own tensors are ignored.
        params: parameters by name (may be a subset: missing ones fall back to the module's).
        buffers: buffers by name.
        *args, **kwargs: inputs to `forward`.
        train: run in training mode (dropout on, batch-norm statistics updated)
            or eval mode. The module's own `training` flags are restored afterwards.

    Returns:
        `(output, new_buffers)`; `new_buffers` are fresh tensors, `buffers` are untouched.
    """
    new_buffers = {name: b.clone() for name, b in buffers.items()}
    modules = list(module.modules())
    previous = [m.training for m in modules]
    for m in modules:
        m.training = train
    try:
        out = functional_call(module, (params, new_buffers), args, kwargs, strict=False)
    finally:
        for m, flag in zip(modules, previous, strict=True):
            m.training = flag
    return out, new_buffers


def value_and_grad(
    fn: Callable[..., Any],
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    loss_scale: LossScale | None = None,
) -> Callable[..., tuple[Any, PyTree]]:
    """`fn`'s value and its gradient with respect to argument(s) `argnums`.

    Like `jax.value_and_grad`: the returned function gives `(value, grads)`,
    or `((value, aux), grads)` when `has_aux=True` and `fn` returns
    `(value, aux)`. The value must be a 0-d floating tensor. Built on
    `torch.func.grad_and_value`, so it composes with `vmap` and
    `torch.compile(fullgraph=True)`.

    With `loss_scale` (a float16 step: pass `loss_scale=state.loss_scale`),
    the loss is multiplied by the scale before differentiating, so that
    small gradients do not underflow in float16, and the gradients are
    divided by it afterwards; the value returned is the unscaled loss. The
    state's optimizer (`lightfunc.optim.apply_if_finite`) then skips the
    update if the gradients overflowed and adjusts the scale. `None` (or a
    state without a scale) differentiates the loss as it is.

    Raises:
        TypeError / ValueError: on the first call, if `fn` returns something
            other than a 0-d floating tensor (or a pair, with `has_aux`).

    Example:
        >>> import torch, lightfunc as lf
        >>> value, grad = lf.value_and_grad(lambda w: (w * w).sum())(torch.tensor([1.0, 2.0]))
        >>> value.item(), grad.tolist()
        (5.0, [2.0, 4.0])
    """

    def checked(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out = fn(*args, **kwargs)
        if not has_aux:
            _check_loss(out, has_aux)
            return out
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"`value_and_grad(..., has_aux=True)` expects the function to return "
                f"(loss, aux), got {_describe(out)}. Return a pair, or pass has_aux=False."
            )
        _check_loss(out[0], has_aux)
        return out

    argnums = argnums if isinstance(argnums, int) else tuple(argnums)
    if loss_scale is not None and not isinstance(loss_scale, LossScale):
        raise TypeError(
            f"`loss_scale` must be a lightfunc.LossScale (pass `state.loss_scale`) or None, "
            f"got {type(loss_scale).__name__}."
        )
    if loss_scale is None:
        grad_fn = torch.func.grad_and_value(checked, argnums=argnums, has_aux=has_aux)

        def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, PyTree]:
            grads, value = grad_fn(*args, **kwargs)
            return value, grads

        return wrapped

    scale = loss_scale

    def scaled(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out: Any = checked(*args, **kwargs)
        return scale.scale_loss(out[0] if has_aux else out), out

    scaled_grad_fn = torch.func.grad_and_value(scaled, argnums=argnums, has_aux=True)

    def wrapped_scaled(*args: Any, **kwargs: Any) -> tuple[Any, PyTree]:
        grads, (_, value) = scaled_grad_fn(*args, **kwargs)
        return value, scale.unscale(grads)

    return wrapped_scaled


def _check_loss(value: Any, has_aux: bool) -> None:
    where = "the first element returned (the loss)" if has_aux else "the returned value (the loss)"
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"`value_and_grad`: {where} must be a 0-d floating tensor, got {_describe(value)}."
            + (" If the function returns (loss, aux), pass has_aux=True." if not has_aux else "")
        )
    if value.ndim != 0:
        raise ValueError(
            f"`value_and_grad`: {where} must be a 0-d tensor, got shape {tuple(value.shape)}. "
            f"Reduce it first, e.g. loss.mean() or loss.sum()."
        )
    if not value.is_floating_point():
        raise TypeError(
            f"`value_and_grad`: {where} must be floating point, got dtype {value.dtype}."
        )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, tuple):
        return f"a tuple of length {len(x)}"
    return f"{type(x).__name__}"
