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
from ._sharded_func import _apply_sharded, _grad_gathered, _grad_sharded, _has_shards, _paused
from ._tree import PyTree, tree_detach, tree_flatten, tree_unflatten

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
    # Only the modules whose flag differs are switched (and switched back): a
    # module already in the asked mode costs no attribute writes.
    switched = [m for m in module.modules() if m.training != train]
    for m in switched:
        m.training = train
    try:
        if _has_shards(params):  # FSDP: gathered one unit at a time (`lightfunc._sharded_func`)
            with _paused():
                out = _apply_sharded(module, params, new_buffers, args, kwargs)
        else:
            out = functional_call(module, (params, new_buffers), args, kwargs, strict=False)
    finally:
        for m in switched:
            m.training = not train
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
        grad_fn = _fast_grad_and_value(checked, argnums, has_aux)

        def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, PyTree]:
            grads, value = grad_fn(*args, **kwargs)
            return value, grads

        return wrapped

    scale = loss_scale

    def scaled(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out: Any = checked(*args, **kwargs)
        return scale.scale_loss(out[0] if has_aux else out), out

    scaled_grad_fn = _fast_grad_and_value(scaled, argnums, True)

    def wrapped_scaled(*args: Any, **kwargs: Any) -> tuple[Any, PyTree]:
        grads, (_, value) = scaled_grad_fn(*args, **kwargs)
        return value, scale.unscale(grads)

    return wrapped_scaled


def _fast_grad_and_value(
    fn: Callable[..., Any], argnums: int | tuple[int, ...], has_aux: bool
) -> Callable[..., tuple[Any, Any]]:
    """`_grad_and_value(fn)`, with plain eager calls differentiated by `torch.autograd.grad`.

    `torch.func.grad` wraps every tensor of the call in a gradient-tracking
    wrapper, and every operation pays for going through it (and, eagerly, it
    kept a second copy of a transformer's activations: 1.67x raw eager's peak
    memory, bench/results). Where nothing needs the wrappers, that is, eagerly
    (not compiling, under no `torch.func` transform) with every
    differentiated leaf a plain floating tensor that does not require
    grad, the gradients come from `torch.autograd.grad` over detached leaf
    copies of the inputs (same storage), exactly as `loss.backward()` computes
    them. Gradients of inputs the loss does not reach are zeros, as
    `torch.func` gives; the value and `aux` come back detached. Everything
    else (vmap, grad of grad, `torch.compile`, sharded inputs) takes
    `torch.func.grad_and_value` as before.
    """
    general = _grad_and_value(fn, argnums, has_aux)
    nums = (argnums,) if isinstance(argnums, int) else argnums

    def call(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if (
            torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or max(nums) >= len(args)
        ):
            return general(*args, **kwargs)
        flats = [tree_flatten(args[i]) for i in nums]
        leaves = [x for flat, _ in flats for x in flat]
        if not leaves or not all(_plain_leaf(x) for x in leaves):
            return general(*args, **kwargs)
        args_l = list(args)
        inputs = [x.detach().requires_grad_() for x in leaves]
        start = 0
        for i, (flat, spec) in zip(nums, flats, strict=True):
            args_l[i] = tree_unflatten(spec, inputs[start : start + len(flat)])
            start += len(flat)
        with torch.enable_grad():
            out = fn(*args_l, **kwargs)
        loss = out[0] if has_aux else out
        if loss.requires_grad:
            found = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        else:  # a loss that no input reaches: zero gradients, as torch.func gives
            found = tuple(torch.zeros_like(x) for x in inputs)
        grads, start = [], 0
        for flat, spec in flats:
            grads.append(tree_unflatten(spec, list(found[start : start + len(flat)])))
            start += len(flat)
        value = (loss.detach(), tree_detach(out[1])) if has_aux else loss.detach()
        return (grads[0] if isinstance(argnums, int) else tuple(grads)), value

    return call


def _plain_leaf(x: Any) -> bool:
    """A tensor `torch.autograd.grad` can stand in for `torch.func.grad` on (see above)."""
    return (
        type(x) is torch.Tensor
        and x.is_floating_point()
        and not x.requires_grad
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


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


def _grad_and_value(
    fn: Callable[..., Any], argnums: int | tuple[int, ...], has_aux: bool
) -> Callable[..., tuple[Any, Any]]:
    """`torch.func.grad_and_value(fn)`, or over DTensor shards, gathered per unit (see above)."""
    func_grad = torch.func.grad_and_value(fn, argnums=argnums, has_aux=has_aux)

    def call(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        nums = (argnums,) if isinstance(argnums, int) else argnums
        if not _has_shards([args[i] for i in nums]):
            return func_grad(*args, **kwargs)
        if torch.compiler.is_compiling():
            return _grad_gathered(func_grad, argnums, args, kwargs)
        return _grad_sharded(fn, argnums, has_aux, args, kwargs)

    return call
