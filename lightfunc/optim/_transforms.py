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
"""

from __future__ import annotations

import dataclasses

import torch

from .._tree import register_dataclass, tree_leaves, tree_map, tree_zeros_like
from ._base import (
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    Updates,
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
        if callable(lr):
            step = -lr(state.count)
            updates = tree_map(lambda u: u * step.to(u.dtype), updates)
        else:
            updates = tree_map(lambda u: u * -lr, updates)
        return updates, ScaleByScheduleState(count=state.count + 1)

    return GradientTransformation(init, update)


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
        mu = tree_map(lambda m, g: torch.lerp(m, g, 1 - b1), state.mu, updates)
        nu = tree_map(lambda v, g: torch.addcmul(v * b2, g, g, value=1 - b2), state.nu, updates)
        # torch computes these from a Python float step, i.e. in double precision.
        t = count.to(torch.float64)
        if lr is None:
            step_size = 1 / (1 - b1**t)
        elif callable(lr):
            step_size = -lr(state.count).to(torch.float64) / (1 - b1**t)
        else:
            step_size = -lr / (1 - b1**t)
        bc2_sqrt = torch.sqrt(1 - b2**t)

        def direction(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            denom = torch.sqrt(v) / bc2_sqrt.to(v.dtype) + eps
            # torch: param.addcdiv_(exp_avg, denom, value=-step_size) = (value * m) / denom.
            return (step_size.to(m.dtype) * m) / denom

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

    return GradientTransformation(init, update)
