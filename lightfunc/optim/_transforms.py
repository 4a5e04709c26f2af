"""Gradient transformations: the building blocks optimizers are chained from.

Each factory returns a `GradientTransformation` whose state is a frozen
dataclass registered as a pytree. Float hyper-parameters are closed over as
Python constants (they never change, so a compiled update never recompiles
because of them); anything that depends on the step is computed from a 0-d
int64 `count` tensor kept in the state.

Where torch.optim has an equivalent, the arithmetic follows its CPU
single-tensor code path operation by operation (same ops, same order, same
fp32 roundings): Adam's step is bit-identical to torch's. SGD's is not quite:
torch applies it with ``param.add_(grad, alpha=-lr)``, a fused multiply-add
in its vectorized kernel, which an additive update ``p + (-lr * grad)``
cannot reproduce (one fp32 rounding apart per step).

Two code paths compute the same numbers. Inside `torch.compile` each update
is written leaf by leaf, and inductor fuses it into one loop per parameter;
the per-step scalars (bias corrections, scheduled learning rates) go through
`once_per_step`, so they are computed once into a tiny buffer instead of once
per vector of every loop. Eagerly, Adam and the decoupled weight decay use
torch's multi-tensor ``torch._foreach_*`` kernels (one call per operation for
the whole tree instead of one per leaf) with the scalars as Python floats on
CPU, exactly as torch.optim computes them. Both paths are pure: every output
is a new tensor, no input is written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._tree import (
    register_dataclass,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_unflatten,
    tree_zeros_like,
)
from ._base import (
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Updates,
    update_params,
)
from ._validate import check_float, check_learning_rate


@register_dataclass
@dataclasses.dataclass(frozen=True)
class EmptyState:
    """The state of a stateless transformation: a pytree with no leaves."""


@register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleByScheduleState:
    """State of `scale_by_learning_rate` and `add_decoupled_weight_decay`."""

    # Number of updates applied so far; 0-d int64 on the params' device.
    count: torch.Tensor


@register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleByAdamState:
    """State of `scale_by_adam` (torch.optim.Adam's `step`, `exp_avg`, `exp_avg_sq`)."""

    # Number of updates applied so far; 0-d int64 on the params' device.
    count: torch.Tensor
    # First moment (EMA of gradients); like params: same shapes and dtypes.
    mu: Updates
    # Second moment (EMA of squared gradients); like params.
    nu: Updates


@register_dataclass
@dataclasses.dataclass(frozen=True)
class TraceState:
    """State of `trace` (torch.optim.SGD's `momentum_buffer`)."""

    # Number of updates applied so far; 0-d int64. At 0 the buffer starts as the gradient.
    count: torch.Tensor
    # Momentum buffer; like params: same shapes and dtypes.
    trace: Updates


@register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleByLionState:
    """State of `scale_by_lion`."""

    # EMA of gradients with rate `b2`; like params: same shapes and dtypes.
    mu: Updates


def zero_count(params: Params) -> torch.Tensor:
    """A 0-d int64 zero on the device of the first parameter (CPU when there is none)."""
    leaves = tree_leaves(params)
    device = leaves[0].device if leaves and isinstance(leaves[0], torch.Tensor) else None
    return torch.zeros((), dtype=torch.int64, device=device)


def once_per_step(*scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 0-d tensors `scalars`, computed once per step inside `torch.compile`.

    Inductor inlines a cheap scalar expression into every loop that reads it:
    Adam's float64 ``b1 ** t`` and square root, or a cosine schedule, would
    run once per vector of every parameter's update loop (~75 us a step on a
    64-256-256-10 MLP). Stacking them makes inductor write them into one small
    float64 buffer first, which the update loops then only load. The values
    are unchanged (float64 holds every float32 exactly); eagerly this returns
    `scalars` as they are.
    """
    if not torch.compiler.is_compiling():
        return scalars
    parts = [s.to(torch.float64) for s in scalars]
    if len(parts) == 1:
        # A one-element stack is only a view, which inductor inlines again.
        parts.append(torch.zeros_like(parts[0]))
    packed = torch.stack(parts)
    return tuple(packed[i].to(s.dtype) for i, s in enumerate(scalars))


def host_scalar(x: torch.Tensor | float) -> torch.Tensor | float:
    """`x` as a Python float when that costs no device sync (eager, on CPU), else `x`.

    torch.optim keeps its step count on the CPU and does its per-step scalar
    math in Python floats; eager lightfunc does the same for CPU states.
    """
    if (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)  # under vmap: stay a tensor
    ):
        return x.item()
    return x


def foreach_leaves(*trees: Updates) -> tuple[list[list[torch.Tensor]], Any] | None:
    """The leaves of `trees` as lists for ``torch._foreach_*`` kernels, and the first tree's spec.

    None (use the leaf-by-leaf path) inside `torch.compile` (inductor fuses
    leaf-by-leaf code into one loop per leaf, which beats its foreach
    lowering), for an empty tree, or when the leaves do not all share one
    dtype and device (the scalar arguments are converted once, for all).
    """
    if torch.compiler.is_compiling():
        return None
    leaves, spec = tree_flatten(trees[0])
    if not leaves or torch._C._functorch.is_functorch_wrapped_tensor(leaves[0]):
        return None  # empty, or under vmap / grad (no batching rules for foreach kernels)
    lists = [leaves] + [tree_leaves(t) for t in trees[1:]]
    first = leaves[0]
    for group in lists:
        if len(group) != len(leaves):
            return None
        for x in group:
            if (
                not isinstance(x, torch.Tensor)
                or x.dtype != first.dtype
                or x.device != first.device
            ):
                return None
    return lists, spec


def as_operand(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A scalar operand for a foreach kernel over tensors like `like` (Python float, or 0-d in its dtype)."""
    return x.to(like.dtype) if isinstance(x, torch.Tensor) else x


def stateless_init(params: Params) -> OptState:
    """The `init` of transformations without state."""
    del params
    return EmptyState()


def scale(factor: float) -> GradientTransformation:
    """Multiply every update by a constant.

    Args:
        factor: the constant (a Python float; use `scale_by_learning_rate`
            for anything that changes with the step).

    Returns:
        A stateless `GradientTransformation`.

    Raises:
        TypeError, ValueError: `factor` is not a finite float.
    """
    factor = check_float("factor", factor)

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        return tree_map(lambda u: u * factor, updates), state

    return GradientTransformation(stateless_init, update)


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (for parameters that must not move; see `freeze`)."""

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        return tree_zeros_like(updates), state

    return GradientTransformation(stateless_init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """Multiply updates by ``-learning_rate``, turning a descent direction into a step.

    Args:
        learning_rate: a float >= 0, or a schedule: a function of the count of
            updates applied so far (0-d int64 tensor, 0 at the first update)
            returning a 0-d tensor.

    Returns:
        A `GradientTransformation` whose state holds the update count.

    Raises:
        TypeError, ValueError: `learning_rate` is not a float >= 0 nor a callable.
    """
    lr = check_learning_rate("learning_rate", learning_rate)

    def init(params: Params) -> OptState:
        return ScaleByScheduleState(count=zero_count(params))

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        new_state = ScaleByScheduleState(count=state.count + 1)
        step: torch.Tensor | float
        if callable(lr):
            (step,) = once_per_step(-lr(state.count))
        else:
            step = -lr
        lists = foreach_leaves(updates)
        if lists is not None:
            (leaves,), spec = lists
            return tree_unflatten(
                spec, torch._foreach_mul(leaves, as_operand(step, leaves[0]))
            ), new_state
        return tree_map(lambda u: u * as_operand(step, u), updates), new_state

    return GradientTransformation(init, update)


def adam_scalars(
    prev_count: torch.Tensor, b1: float, b2: float, lr: ScalarOrSchedule | None
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """This step's ``-lr / bc1`` (``1 / bc1`` without `lr`) and ``sqrt(bc2)``, in float64.

    torch.optim.Adam computes both from a Python float step; eagerly on CPU so
    does this (Python floats), elsewhere they are 0-d float64 tensors computed
    once per step (`once_per_step`). `prev_count` is the count before the step.
    """
    t = host_scalar(prev_count)
    if not isinstance(t, torch.Tensor):
        t = float(t) + 1
        bc2_sqrt = (1 - b2**t) ** 0.5
        if lr is None:
            return 1 / (1 - b1**t), bc2_sqrt
        rate = float(lr(prev_count)) if callable(lr) else lr
        return -rate / (1 - b1**t), bc2_sqrt
    tt = (prev_count + 1).to(torch.float64)
    if lr is None:
        step_size = 1 / (1 - b1**tt)
    elif callable(lr):
        step_size = -lr(prev_count).to(torch.float64) / (1 - b1**tt)
    else:
        step_size = -lr / (1 - b1**tt)
    step_size, bc2_sqrt = once_per_step(step_size, torch.sqrt(1 - b2**tt))
    return step_size, bc2_sqrt


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    learning_rate: ScalarOrSchedule | None = None,
) -> GradientTransformation:
    """Rescale updates by Adam's bias-corrected moment estimates.

    The output is ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``, with the moments
    and bias corrections computed as torch.optim.Adam does on CPU (``lerp``
    for the first moment, ``mul`` then ``addcmul`` for the second, the
    corrections in float64 from the step count, rounded once to the moments'
    dtype). Follow it with `scale_by_learning_rate`, or pass `learning_rate`.

    With `learning_rate`, the output is already the step: the learning rate
    joins the bias correction in torch's single step size ``-lr / bc1``
    before multiplying ``m``, which makes the result bit-identical to
    torch.optim.Adam's step (a separate ``* -lr`` afterwards rounds once more
    and differs in the last bit).

    Args:
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the denominator, >= 0.
        learning_rate: optional float >= 0 or schedule to fold in (see above).

    Returns:
        A `GradientTransformation` with `ScaleByAdamState`.

    Raises:
        TypeError, ValueError: a hyper-parameter outside its range.
    """
    b1 = check_float("b1", b1, low=0.0, high=1.0, high_open=True, hint="A typical value is 0.9.")
    b2 = check_float("b2", b2, low=0.0, high=1.0, high_open=True, hint="A typical value is 0.999.")
    eps = check_float("eps", eps, low=0.0, hint="A typical value is 1e-8.")
    lr = None if learning_rate is None else check_learning_rate("learning_rate", learning_rate)

    def init(params: Params) -> OptState:
        return ScaleByAdamState(
            count=zero_count(params), mu=tree_zeros_like(params), nu=tree_zeros_like(params)
        )

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        count = state.count + 1
        step_size, bc2_sqrt = adam_scalars(state.count, b1, b2, lr)
        lists = foreach_leaves(updates, state.mu, state.nu)
        if lists is not None:
            (grads, mus, nus), spec = lists
            step_size = as_operand(step_size, grads[0])
            bc2_sqrt = as_operand(bc2_sqrt, grads[0])
            # The same operations as the leaf-by-leaf path below, on whole lists;
            # the in-place calls only write tensors created here.
            mu = torch._foreach_lerp(mus, grads, 1 - b1)
            nu = torch._foreach_mul(nus, b2)
            torch._foreach_addcmul_(nu, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(nu)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            out = torch._foreach_mul(mu, step_size)
            torch._foreach_div_(out, denom)
            return tree_unflatten(spec, out), ScaleByAdamState(
                count=count, mu=tree_unflatten(spec, mu), nu=tree_unflatten(spec, nu)
            )

        mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - b1), state.mu, updates)
        nu = tree_map(lambda v, g: torch.addcmul(v * b2, g, g, value=1 - b2), state.nu, updates)

        def direction(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            denom = torch.sqrt(v) / as_operand(bc2_sqrt, v) + eps
            # torch: param.addcdiv_(exp_avg, denom, value=-step_size) = (value * m) / denom.
            return (as_operand(step_size, m) * m) / denom

        return tree_map(direction, mu, nu), ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def trace(
    momentum: float, nesterov: bool = False, dampening: float = 0.0
) -> GradientTransformation:
    """Accumulate a momentum buffer, as torch.optim.SGD does.

    ``buf = grad`` at the first update, then ``buf = momentum * buf + (1 -
    dampening) * grad``; the output is ``buf``, or ``grad + momentum * buf``
    with Nesterov momentum.

    Args:
        momentum: the decay of the buffer, >= 0.
        nesterov: use Nesterov momentum (needs `momentum` > 0 and no dampening).
        dampening: damping of the gradient's contribution, in [0, 1].

    Returns:
        A `GradientTransformation` with `TraceState`.

    Raises:
        TypeError, ValueError: bad hyper-parameters, or Nesterov without
            momentum or with dampening.
    """
    momentum = check_float("momentum", momentum, low=0.0, hint="A typical value is 0.9.")
    dampening = check_float("dampening", dampening, low=0.0, high=1.0, hint="The default is 0.0.")
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError(
            f"`nesterov=True` needs `momentum` > 0 and `dampening` == 0, got momentum={momentum} "
            f"and dampening={dampening}. Set e.g. momentum=0.9, dampening=0.0, or nesterov=False."
        )

    def init(params: Params) -> OptState:
        return TraceState(count=zero_count(params), trace=tree_zeros_like(params))

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        first = state.count == 0
        buf = tree_map(
            lambda b, g: torch.where(first, g, torch.add(b * momentum, g, alpha=1 - dampening)),
            state.trace,
            updates,
        )
        out = (
            tree_map(lambda g, b: torch.add(g, b, alpha=momentum), updates, buf)
            if nesterov
            else buf
        )
        return out, TraceState(count=state.count + 1, trace=buf)

    return GradientTransformation(init, update)


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's update direction: ``sign(b1 * mu + (1 - b1) * grad)``.

    The momentum `mu` is then updated with the other rate: ``mu = b2 * mu +
    (1 - b2) * grad`` (Chen et al., 2023, "Symbolic Discovery of Optimization
    Algorithms"). Follow it with `scale_by_learning_rate`.

    Args:
        b1: interpolation rate of the direction, in [0, 1].
        b2: decay rate of the momentum, in [0, 1].

    Returns:
        A `GradientTransformation` with `ScaleByLionState`.

    Raises:
        TypeError, ValueError: a rate outside [0, 1].
    """
    b1 = check_float("b1", b1, low=0.0, high=1.0, hint="A typical value is 0.9.")
    b2 = check_float("b2", b2, low=0.0, high=1.0, hint="A typical value is 0.99.")

    def init(params: Params) -> OptState:
        return ScaleByLionState(mu=tree_zeros_like(params))

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        del params
        direction = tree_map(lambda m, g: torch.sign(b1 * m + (1 - b1) * g), state.mu, updates)
        mu = tree_map(lambda m, g: b2 * m + (1 - b2) * g, state.mu, updates)
        return direction, ScaleByLionState(mu=mu)

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations one after the other; the state is the tuple of their states.

    Args:
        *transforms: the transformations, in the order updates flow through them.

    Returns:
        A `GradientTransformation`.

    Raises:
        TypeError: an argument is not a `GradientTransformation` (a torch.optim
            optimizer, or a factory that was not called).
    """
    for i, tx in enumerate(transforms):
        if not isinstance(tx, GradientTransformation):
            hint = " Did you forget to call it?" if callable(tx) else ""
            raise TypeError(
                f"`chain` argument {i} must be a GradientTransformation (e.g. "
                f"`lightfunc.optim.scale_by_adam()`), got {type(tx).__name__}.{hint}"
            )

    def init(params: Params) -> OptState:
        return tuple(tx.init(params) for tx in transforms)

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        new_states = []
        for tx, s in zip(transforms, state, strict=True):
            updates, s = tx.update(updates, s, params)
            new_states.append(s)
        return updates, tuple(new_states)

    if transforms and getattr(transforms[-1].update, "to_params", None) is not None:

        def to_params(
            updates: Updates, state: OptState, params: Params, *, in_place: bool
        ) -> tuple[Any, OptState, bool]:
            # The transforms before the last one only read the parameters, before the last
            # computes (or writes) them: e.g. `chain(clip_by_global_norm(1.0), adamw(...))`.
            new_states = []
            for tx, s in zip(transforms[:-1], state[:-1], strict=True):
                updates, s = tx.update(updates, s, params)
                new_states.append(s)
            new_params, last, wrote = update_params(
                transforms[-1], updates, state[-1], params, in_place=in_place
            )
            return new_params, (*new_states, last), wrote

        update.to_params = to_params  # type: ignore[attr-defined]

    return GradientTransformation(init, update)
