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

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import functional_call
from torch.nn import Parameter

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

    Eagerly, the given tensors are put in the module's parameter and buffer
    slots directly (what `torch.func.functional_call` does, without its
    per-call walk of the whole module) and the module's own are put back
    afterwards, even if `forward` raises. The slots are found on the first
    call and kept in the module's `__dict__` (`_lightfunc_apply_plan`),
    checked on every call against the module's current submodules,
    parameters and buffers. Modules with tied weights, names the module does
    not have, tensor subclasses, `torch.func` transforms and compiled code
    take `torch.func.functional_call`, with its behaviour and errors.
    """
    new_buffers = {name: b.clone() for name, b in buffers.items()}
    plan = _eager_plan(module, params, new_buffers)
    # Only the modules whose flag differs are switched (and switched back): a
    # module already in the asked mode costs no attribute writes.
    modules = module.modules() if plan is None else (module, *plan[0])
    switched = [m for m in modules if m.training != train]
    for m in switched:
        m.training = train
    try:
        if plan is not None:
            out = _call_swapped(module, plan[1], params, new_buffers, args, kwargs)
        elif _has_shards(params):  # FSDP: gathered one unit at a time (`lightfunc._sharded_func`)
            with _paused():
                out = _apply_sharded(module, params, new_buffers, args, kwargs)
        else:
            out = functional_call(module, (params, new_buffers), args, kwargs, strict=False)
    finally:
        for m in switched:
            m.training = not train
    return out, new_buffers


# `apply`'s eager fast path.
#
# `torch.func.functional_call` walks the whole module on every call (all
# parameters and buffers, duplicates included, to find tied weights) and
# swaps each tensor in and out through a name resolver: ~50 us per call on a
# 3-layer MLP whose forward takes ~170 us (bench/results/speed_findings.md).
# Eagerly, for a module without tied tensors, `apply` does the same swap
# itself: `module._parameters[name] = tensor` (exactly functional_call's
# operation) through (dict, key) slots found once per module, then restores
# the module's own tensors in a `finally`. The slots are kept in the module's
# `__dict__` under `_PLAN_KEY`, as a plain tuple (builtins and the module's
# own objects, so a pickled module unpickles without lightfunc), with a
# snapshot of every submodule's `_modules`, `_parameters` and `_buffers`
# (keys and objects, by identity). Each call first checks the snapshot, so a
# submodule, parameter or buffer added, replaced or removed since is seen
# and the slots are rebuilt. Everything else takes functional_call as
# before: compiling (dynamo traces functional_call), under a `torch.func`
# transform, jit tracing, tied tensors, a name the slots do not know (an
# unexpected key: functional_call raises or sets it as it always did), a key
# in both dicts, or a value that is not a plain tensor (DTensor shards, other
# subclasses). The snapshot holds the module's own tensors and submodules,
# so that identities cannot be reused by new objects: a parameter or
# submodule the user replaces stays alive until the next `apply` call on the
# module rebuilds the snapshot.

_PLAN_KEY = "_lightfunc_apply_plan"

# plan = (snapshot, submodules, slots or None when tied)
#   snapshot: per distinct module, (module or None for the root itself, so
#     the plan holds no reference cycle, then for each of its `_modules`,
#     `_parameters`, `_buffers`: the dict, its keys, its values);
#   submodules: `module.modules()` after the root, for the train/eval switch;
#   slots: name -> (the `_parameters` or `_buffers` dict holding it, key).
_Slots = dict[str, tuple[dict[str, Any], str]]
_Plan = tuple[tuple[Any, ...], tuple[torch.nn.Module, ...], _Slots | None]


def _eager_plan(
    module: torch.nn.Module, params: Any, buffers: Buffers
) -> tuple[tuple[torch.nn.Module, ...], _Slots] | None:
    """(submodules, slots) of `module` if this call can swap tensors itself, else None."""
    if (
        torch.compiler.is_compiling()  # first: dynamo sees nothing else of this function
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.jit.is_tracing()
        or type(params) is not dict
    ):
        return None
    plan = module.__dict__.get(_PLAN_KEY)
    if plan is None or not _unchanged(module, plan[0]):
        plan = _build_plan(module)
        if plan is None:
            return None
        module.__dict__[_PLAN_KEY] = plan
    slots = plan[2]
    if slots is None:
        return None
    for tree in (params, buffers):
        for name, t in tree.items():
            if name not in slots or (type(t) is not torch.Tensor and type(t) is not Parameter):
                return None
    if buffers and not params.keys().isdisjoint(buffers):
        return None  # functional_call raises: the name is in both dicts
    return plan[1], slots


def _build_plan(module: torch.nn.Module) -> _Plan | None:
    if isinstance(module, (torch.jit.ScriptModule, torch.nn.DataParallel)):
        return None  # functional_call raises for these
    submodules = tuple(module.modules())
    snapshot = tuple(
        (
            None if m is module else m,
            *((d, tuple(d), tuple(d.values())) for d in (m._modules, m._parameters, m._buffers)),
        )
        for m in submodules
    )
    slots: _Slots = {}
    seen: set[int] = set()
    # Duplicates included, as functional_call's tie check walks them: a
    # submodule reached twice, or one tensor under two names, is tied.
    for prefix, m in module.named_modules(remove_duplicate=False):
        for d in (m._parameters, m._buffers):
            for key, t in d.items():
                if t is None:
                    continue
                if id(t) in seen:
                    return (snapshot, submodules[1:], None)
                seen.add(id(t))
                slots[f"{prefix}.{key}" if prefix else key] = (d, key)
    return (snapshot, submodules[1:], slots)


def _unchanged(module: torch.nn.Module, snapshot: tuple[Any, ...]) -> bool:
    """Whether every module in `snapshot` still has the same submodules, parameters and buffers."""
    is_ = operator.is_
    for m, (md, mk, mv), (pd, pk, pv), (bd, bk, bv) in snapshot:
        if m is None:
            m = module
        if m._modules is not md or m._parameters is not pd or m._buffers is not bd:
            return False
        if len(md) != len(mk) or len(pd) != len(pk) or len(bd) != len(bk):
            return False
        # Most dicts are empty (a leaf module has no submodules, most have no
        # buffers): checked by their length alone, ~40% faster on a transformer.
        if mk and (tuple(md) != mk or not all(map(is_, md.values(), mv))):
            return False
        if pk and (tuple(pd) != pk or not all(map(is_, pd.values(), pv))):
            return False
        if bk and (tuple(bd) != bk or not all(map(is_, bd.values(), bv))):
            return False
    return True


def _call_swapped(
    module: torch.nn.Module,
    slots: _Slots,
    params: Params,
    buffers: Buffers,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """`module(*args, **kwargs)` with `params` and `buffers` in its slots, its own tensors restored after."""
    targets = [(*slots[name], t) for tree in (params, buffers) for name, t in tree.items()]
    saved = [d[key] for d, key, _ in targets]
    try:
        for d, key, t in targets:
            d[key] = t
        return module(*args, **kwargs)
    finally:
        for (d, key, _), t in zip(targets, saved, strict=True):
            d[key] = t


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
    nums = (argnums,) if isinstance(argnums, int) else argnums

    def general(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        # Built per call that needs it: a step that builds its `value_and_grad`
        # every call (the usual way) would otherwise pay for an unused
        # `torch.func.grad_and_value` wrapper on every eager step.
        return _grad_and_value(fn, argnums, has_aux)(*args, **kwargs)

    def call(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if (
            torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or max(nums) >= len(args)
        ):
            return general(*args, **kwargs)
        args_l, inputs, rebuilds = list(args), [], []
        for i in nums:
            copied = _leaf_copies(args[i])
            if copied is None:
                return general(*args, **kwargs)
            args_l[i], leaves, rebuild = copied
            inputs += leaves
            rebuilds.append((len(leaves), rebuild))
        if not inputs:
            return general(*args, **kwargs)
        if torch.is_grad_enabled():  # entering enable_grad costs more than the check
            out = fn(*args_l, **kwargs)
        else:
            with torch.enable_grad():
                out = fn(*args_l, **kwargs)
        loss = out[0] if has_aux else out
        if loss.requires_grad:
            found = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        else:  # a loss that no input reaches: zero gradients, as torch.func gives
            found = tuple(torch.zeros_like(x) for x in inputs)
        grads, start = [], 0
        for n, rebuild in rebuilds:
            grads.append(rebuild(found[start : start + n]))
            start += n
        value = (loss.detach(), tree_detach(out[1])) if has_aux else loss.detach()
        return (grads[0] if isinstance(argnums, int) else tuple(grads)), value

    return call


def _leaf_copies(
    tree: PyTree,
) -> tuple[PyTree, list[torch.Tensor], Callable[[Sequence[torch.Tensor]], PyTree]] | None:
    """(`tree` over detached leaf copies that require grad, those copies, how to rebuild
    `tree`'s structure over their gradients), or None if a leaf is not `_plain_leaf`.

    A plain dict of tensors (the usual `params`) is copied as a dict, without
    flattening it: same copies, same gradients, a few microseconds less.
    """
    if type(tree) is dict and all(_plain_leaf(x) for x in tree.values()):
        copies = {k: x.detach().requires_grad_() for k, x in tree.items()}
        return copies, list(copies.values()), lambda found: dict(zip(copies, found, strict=True))
    flat, spec = tree_flatten(tree)
    if not all(_plain_leaf(x) for x in flat):
        return None
    inputs = [x.detach().requires_grad_() for x in flat]
    return tree_unflatten(spec, inputs), inputs, lambda found: tree_unflatten(spec, list(found))


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
