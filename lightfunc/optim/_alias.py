"""Ready-made optimizers, each a `chain` of transformations.

Each matches its torch.optim namesake on CPU, with the same defaults (the
betas are spelled `b1`, `b2`): Adam bit for bit, AdamW bit for bit where
no step is larger than its parameter (else one rounding of the move apart;
see `_weight_decay`), SGD within one fp32 rounding per step (see
`_transforms`). The direct forms an eager step runs (``update.to_params``
of `sgd`, `adam`, `adamw`: the new parameters computed, not an update
added; in place in a donating step) are torch's own arithmetic, bit for
bit. The order inside each chain is the order in which torch applies the
same operations.
"""

from __future__ import annotations

from typing import Any

import torch

from .._tree import tree_leaves, tree_unflatten
from ._base import (
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Updates,
    apply_updates,
    direct_form_applies,
)
from ._fused import Tensors, check_fused, foreach_adam, fused_adam, slices
from ._masking import MaskOrFn
from ._transforms import (
    ScaleByScheduleState,
    TraceState,
    chain,
    foreach_leaves,
    host_scalar,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    trace,
)
from ._validate import check_float, check_learning_rate
from ._weight_decay import add_decayed_weights, add_decoupled_weight_decay


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent with optional momentum, as torch.optim.SGD.

    The gradient gets the L2 term ``weight_decay * param``, then feeds the
    momentum buffer (see `trace`), then is scaled by ``-lr``.

    Args:
        lr: learning rate, a float >= 0 or a schedule of the step count.
        momentum: momentum factor, >= 0 (0: no momentum buffer is kept).
        nesterov: use Nesterov momentum (needs `momentum` > 0, no `dampening`).
        dampening: dampening of the momentum's gradient term, in [0, 1].
        weight_decay: L2 penalty coefficient, >= 0.

    Returns:
        A `GradientTransformation`.

    Raises:
        TypeError, ValueError: a hyper-parameter out of range.

    Example:
        >>> import torch, lightfunc.optim as lo
        >>> params = {"w": torch.ones(3)}
        >>> tx = lo.sgd(0.1, momentum=0.9)
        >>> updates, state = tx.update({"w": torch.ones(3)}, tx.init(params), params)
        >>> lo.apply_updates(params, updates)["w"]
        tensor([0.9000, 0.9000, 0.9000])
    """
    lr = check_learning_rate("lr", lr)
    momentum = check_float(
        "momentum", momentum, low=0.0, hint="A typical value is 0.9; 0 disables it."
    )
    if nesterov and momentum == 0:
        raise ValueError(
            "`nesterov=True` needs `momentum` > 0, got momentum=0.0. Pass e.g. `momentum=0.9`, "
            "or drop `nesterov=True`."
        )
    dampening = check_float("dampening", dampening, low=0.0, high=1.0, hint="The default is 0.0.")
    parts = []
    # torch's order: the L2 term joins the gradient before it enters the momentum buffer.
    if check_float("weight_decay", weight_decay, low=0.0, hint="Use 0.0 for no decay.") != 0:
        parts.append(add_decayed_weights(weight_decay))
    if momentum != 0:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(lr))
    return _with_in_place_sgd(chain(*parts), lr, momentum, nesterov, dampening, weight_decay)


def _with_in_place_sgd(
    tx: GradientTransformation,
    lr: ScalarOrSchedule,
    momentum: float,
    nesterov: bool,
    dampening: float,
    weight_decay: float,
) -> GradientTransformation:
    """`tx` (the `sgd` chain) with ``update.to_params``: torch.optim.SGD's single-tensor step.

    Eagerly on CPU for leaves of one dtype, operation for operation as torch
    does it (``grad + wd * p``; ``buf = grad`` at the first step, else ``buf
    * momentum + (1 - dampening) * grad``; Nesterov's ``grad + momentum *
    buf``; then ``p.add_(step, alpha=-lr)``), so bit for bit torch's
    parameters, where the pure chain's additive ``p + (-lr * step)`` is one
    rounding apart. With `in_place` written into the parameters and the
    momentum buffers; without, into new tensors. Elsewhere it runs the pure
    update (see `update_params`).
    """
    traced = momentum != 0
    at_trace = 1 if weight_decay != 0 else 0  # the chain's states: [decay,] [trace,] schedule

    def to_params(
        updates: Updates, state: OptState, params: Params, *, in_place: bool
    ) -> tuple[Any, OptState, bool]:
        trees = (updates, params, state[at_trace].trace) if traced else (updates, params)
        lists = foreach_leaves(*trees)
        count = host_scalar(state[-1].count)
        updated = host_scalar(state[at_trace].count) if traced else 0  # momentum steps so far
        if (
            lists is None
            or not isinstance(count, int)
            or not direct_form_applies(lists[0], lists[1], params, in_place=in_place)
        ):
            new_updates, new_state = tx.update(updates, state, params)
            return apply_updates(params, new_updates), new_state, False
        (grads, ps, *rest), spec = lists
        rate = float(lr(state[-1].count)) if callable(lr) else lr
        new_ps: list[torch.Tensor] = []
        new_bufs: list[torch.Tensor] = []
        for at in slices(ps):
            step: Tensors = grads[at]
            if weight_decay != 0:
                step = torch._foreach_add(step, ps[at], alpha=weight_decay)
            if traced:
                bufs: Tensors = rest[0][at]
                if updated == 0:  # torch's `buf = clone(grad)`
                    if in_place:
                        torch._foreach_copy_(bufs, step)
                    else:
                        bufs = [x.clone() for x in step]
                elif in_place:
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, step, alpha=1 - dampening)
                else:
                    bufs = torch._foreach_mul(bufs, momentum)
                    torch._foreach_add_(bufs, step, alpha=1 - dampening)
                new_bufs += bufs
                step = torch._foreach_add(step, bufs, alpha=momentum) if nesterov else bufs
            if in_place:
                torch._foreach_add_(ps[at], step, alpha=-rate)
            else:
                new_ps += torch._foreach_add(ps[at], step, alpha=-rate)
        if in_place:  # new containers around the same tensors (the old ones are marked consumed)
            new_ps = tree_leaves(params)
            new_bufs = tree_leaves(state[at_trace].trace) if traced else []
        new_state = list(state)
        if traced:
            trace = state[at_trace]
            new_state[at_trace] = TraceState(
                count=trace.count + 1, trace=tree_unflatten(spec, new_bufs)
            )
        new_state[-1] = ScaleByScheduleState(count=state[-1].count + 1)
        return tree_unflatten(spec, new_ps), tuple(new_state), in_place

    tx.update.to_params = to_params  # type: ignore[attr-defined]
    return tx


def adam(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    fused: bool = False,
) -> GradientTransformation:
    """Adam, as torch.optim.Adam (weight decay is an L2 term added to the gradient).

    Args:
        lr: learning rate, a float >= 0 or a schedule of the step count.
        b1: decay of the first moment (torch's ``betas[0]``), in [0, 1).
        b2: decay of the second moment (torch's ``betas[1]``), in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: L2 penalty coefficient, >= 0; for decoupled decay use `adamw`.
        fused: compute the whole step in one kernel (see `adamw`).

    Returns:
        A `GradientTransformation`.

    Raises:
        TypeError, ValueError: a hyper-parameter out of range.
    """
    lr = check_learning_rate("lr", lr)
    parts = []
    if check_float("weight_decay", weight_decay, low=0.0) != 0:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_adam(b1, b2, eps, learning_rate=lr))
    if check_fused(fused):
        return fused_adam(chain(*parts), lr, b1, b2, eps, weight_decay, None, decoupled=False)
    return foreach_adam(chain(*parts), lr, b1, b2, eps, weight_decay, None, decoupled=False)


def adamw(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    mask: MaskOrFn | None = None,
    fused: bool = False,
) -> GradientTransformation:
    """AdamW, as torch.optim.AdamW: Adam with decoupled weight decay.

    torch shrinks the parameter first, ``p *= 1 - lr * weight_decay``, then
    takes the Adam step from the gradient alone; this chain returns the sum of
    both moves, ``-lr * adam_direction + (p * (1 - lr * weight_decay) - p)``
    with `p` the parameter before the step (see `add_decoupled_weight_decay`
    for why the shrink is written that way). The decay uses the *scheduled*
    learning rate.

    Args:
        lr: learning rate, a float >= 0 or a schedule of the step count.
        b1: decay of the first moment, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: decoupled decay coefficient, >= 0.
        mask: which parameters to decay: a pytree of bools like the params (or
            a prefix of them), or a function params -> such a tree; default all.
            E.g. ``lambda p: {k: v.ndim > 1 for k, v in p.items()}`` skips
            biases and norm scales.
        fused: compute the whole step with `lightfunc.kernels.adamw_update`:
            one Triton kernel launch per dtype for the whole parameter tree on
            a GPU, the unfused arithmetic elsewhere (bit-identical on CPU).
            Same state as unfused, so checkpoints load either way; on a GPU
            the step agrees with the unfused one to a few units in the last
            place (the kernel rounds once, in fp32).

    Returns:
        A `GradientTransformation`.

    Raises:
        TypeError, ValueError: a hyper-parameter out of range; (at `init`) a
            mask that does not match the params.
    """
    lr = check_learning_rate("lr", lr)
    parts = [scale_by_adam(b1, b2, eps, learning_rate=lr)]
    if check_float("weight_decay", weight_decay, low=0.0) != 0:
        parts.append(add_decoupled_weight_decay(lr, weight_decay, mask))
    if check_fused(fused):
        return fused_adam(chain(*parts), lr, b1, b2, eps, weight_decay, mask, decoupled=True)
    return foreach_adam(chain(*parts), lr, b1, b2, eps, weight_decay, mask, decoupled=True)


def lion(
    lr: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Lion (Chen et al., 2023): signed momentum updates with decoupled weight decay.

    ``p -= lr * (sign(b1 * m + (1 - b1) * g) + weight_decay * p)``, then
    ``m = b2 * m + (1 - b2) * g``. Use a learning rate 3-10x smaller than
    AdamW's and a weight decay 3-10x larger.

    Args:
        lr: learning rate, a float >= 0 or a schedule of the step count.
        b1: interpolation rate of the update direction, in [0, 1].
        b2: decay rate of the momentum, in [0, 1].
        weight_decay: decoupled decay coefficient, >= 0.

    Returns:
        A `GradientTransformation`.

    Raises:
        TypeError, ValueError: a hyper-parameter out of range.
    """
    lr = check_learning_rate("lr", lr)
    parts = [scale_by_lion(b1, b2), scale_by_learning_rate(lr)]
    if check_float("weight_decay", weight_decay, low=0.0) != 0:
        parts.append(add_decoupled_weight_decay(lr, weight_decay))
    return chain(*parts)
