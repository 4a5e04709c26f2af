"""Weight averaging as optimizer wrappers: `ema` (exponential moving average) and `swa`.

Each wraps an optimizer and keeps a running average of the parameters in the
optimizer state it returns, updated after every applied update from the new
parameters ``params + updates``. Being optimizer state, the average is saved,
loaded, resumed bit-exactly, cast by `TrainState.with_precision` and sharded
by `FSDP` like Adam's moments, with no code of its own for any of that.

    tx = lf.optim.ema(lf.optim.adamw(1e-3), decay=0.999)
    state = lf.TrainState.create(model, tx)
    ...
    lf.evaluate(eval_step, state, val_data, weights="ema")   # or:
    params = lf.optim.averaged_params(state, "ema")

The arithmetic is `torch.optim.swa_utils.AveragedModel`'s, step for step:
the first average is a copy of the parameters, then ``avg.lerp_(p, w)`` with
``w = 1 - decay`` (`get_ema_multi_avg_fn`) or ``w = 1 / (n + 1)`` after `n`
averages (the default, equal SWA average). Inside `torch.compile` (and on
accelerators) the counts and the lerp weight are 0-d tensors (weight 0 on a
step that is not averaged), so a compiled step never recompiles because of
them; eagerly on the CPU they are Python numbers, read from the 0-d int64
counts as torch.optim reads its step there, and the update is torch's own
``torch._foreach_lerp``: bit-identical to `AveragedModel`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import optree
import torch

from .._tree import NAMESPACE, register_dataclass, tree_map, tree_unflatten
from .._validate import check_positive_int
from ._base import GradientTransformation, OptState, Params, Schedule, Updates, apply_updates
from ._masking import MaskedNode
from ._transforms import foreach_leaves, host_scalar, once_per_step, zero_count
from ._validate import check_float
from ._wrappers import ApplyIfFiniteState, find_state


@dataclasses.dataclass(frozen=True)
class AverageState:
    """State of `ema` and `swa`.

    Attributes:
        inner: the wrapped optimizer's state.
        average: the averaged parameters; like the params the optimizer sees
            (same shapes and dtypes; a frozen parameter is a `MaskedNode`).
        count: how many parameter sets have been averaged so far
            (`AveragedModel.n_averaged`); 0-d int64.
        step: how many updates have been applied so far (skipped non-finite
            updates excluded); 0-d int64. `swa`'s `start` and `every` read it.
        name: what `averaged_params` and `evaluate(..., weights=name)` look
            for (static: part of the tree structure).
    """

    inner: OptState
    average: Params
    count: torch.Tensor
    step: torch.Tensor
    name: str = "ema"


register_dataclass(AverageState, static=("name",))


@dataclasses.dataclass(frozen=True)
class _Weight:
    """The lerp weight of the next average, from the number `n` of averages so far.

    `tensor` takes `n` as a 0-d int64 tensor (compiled code, accelerators);
    `host` as a Python int (eager on CPU, where reading the count costs no
    device sync, as torch.optim reads its step there), or returns None when
    only the tensor form exists (a user's decay schedule).
    """

    tensor: Callable[[torch.Tensor], torch.Tensor]
    host: Callable[[int], float | None]


def ema(
    tx: GradientTransformation,
    decay: float | Schedule = 0.999,
    *,
    warmup: bool = False,
    name: str = "ema",
) -> GradientTransformation:
    """`tx`, keeping an exponential moving average of the parameters in its state.

    After each applied update, with `p` the new parameters and `n` the number
    of averages so far: ``avg = p`` when `n == 0`, else ``avg = decay_n * avg
    + (1 - decay_n) * p`` (as ``avg.lerp(p, 1 - decay_n)``). That is
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``
    updated after every `optimizer.step()`.

    An update that applies nothing is not averaged: a micro-batch that
    defers under `accumulate_grad_batches` (`None` updates, passed through)
    and an update skipped for non-finite gradients (`apply_if_finite`, which
    `TrainState.create(..., precision="16-mixed")` or `skip_nonfinite=True`
    installs around this wrapper, keeps the average and its counts as they
    were; placed inside this wrapper, the skip is read from its state and
    not averaged either). A parameter that gets no gradient in a step is left
    alone, its average included, as its moments are
    (`TrainState.create(..., skip_unused=True)`, the default). Buffers are
    not averaged: evaluating with the average uses the current buffers
    (`AveragedModel`'s `use_buffers=False`).

    Args:
        tx: the optimizer to wrap, e.g. `lightfunc.optim.adamw(1e-3)`.
        decay: the decay rate in [0, 1], or a schedule: a function of the
            number of averages so far (a 0-d int64 tensor) returning a 0-d
            tensor in [0, 1].
        warmup: use ``decay_n = min(decay, (1 + n) / (10 + n))``, the usual
            warm-up (TensorFlow's `ExponentialMovingAverage(num_updates=n)`),
            so that early averages forget the random initialisation faster.
            It caps the decay for a long time: ``decay_n`` reaches 0.99 after
            890 averages, 0.999 after 8,990.
        name: the average's name, for `averaged_params(state, name)` and
            `evaluate(..., weights=name)`; give two averages distinct names.

    Returns:
        A `GradientTransformation` whose state is an `AverageState`.

    Raises:
        TypeError, ValueError: `tx` is not an optimizer, `decay` is not a
            float in [0, 1] or a schedule, `warmup` is not a bool, or `name`
            is not a usable name.

    Example:
        >>> import torch, lightfunc as lf
        >>> tx = lf.optim.ema(lf.optim.sgd(0.5), decay=0.9)
        >>> state = lf.TrainState.create({"w": torch.zeros(2)}, tx)
        >>> for _ in range(2):
        ...     state = state.apply_gradients({"w": -torch.ones(2)})
        >>> state.params["w"].tolist(), lf.optim.averaged_params(state, "ema")["w"].tolist()
        ([1.0, 1.0], [0.550000011920929, 0.550000011920929])
    """
    _check_wrapped(tx, "ema")
    if not isinstance(warmup, bool):
        raise TypeError(f"`warmup` must be a bool, got {type(warmup).__name__} ({warmup!r}).")
    rate = _forget_rate(decay, warmup)

    def weight(count: torch.Tensor) -> torch.Tensor:
        return torch.where(count == 0, 1.0, rate.tensor(count))

    def host_weight(n: int) -> float | None:
        return 1.0 if n == 0 else rate.host(n)

    return _averaging(tx, _check_name(name), _Weight(weight, host_weight), start=1, every=1)


def swa(
    tx: GradientTransformation,
    start: int,
    *,
    every: int = 1,
    name: str = "swa",
) -> GradientTransformation:
    """`tx`, keeping the equal average of the parameters (stochastic weight averaging) in its state.

    The parameters after update `start`, `start + every`, `start + 2 *
    every`, ... (counting applied updates from 1) are averaged with equal
    weights: ``avg = p`` for the first, then ``avg = avg + (p - avg) / (n +
    1)`` (as ``avg.lerp(p, 1 / (n + 1))``) after `n` of them. That is
    ``AveragedModel(model)`` with ``update_parameters(model)`` called after
    those optimizer steps. Pair it with a high constant or cyclic learning
    rate from `start` on (`torch.optim.swa_utils.SWALR`'s role), e.g.
    `lightfunc.optim.join_schedules`.

    Skipped, deferred and gradient-less updates are handled as in `ema`: a
    skipped update does not count towards `start` and `every`. Buffers are
    not averaged (`use_buffers=False`): a model with BatchNorm needs its
    running statistics recomputed for the averaged weights
    (`torch.optim.swa_utils.update_bn`'s job) before its evaluation means much.

    Args:
        tx: the optimizer to wrap.
        start: the first update whose parameters are averaged (>= 1).
        every: average every this many updates from `start` on (>= 1).
        name: the average's name (see `ema`).

    Returns:
        A `GradientTransformation` whose state is an `AverageState`.

    Raises:
        TypeError, ValueError: `tx` is not an optimizer, `start` or `every`
            is not a positive int, or `name` is not a usable name.

    Example:
        >>> import torch, lightfunc as lf
        >>> state = lf.TrainState.create({"w": torch.zeros(1)}, lf.optim.swa(lf.optim.sgd(1.0), start=2))
        >>> for _ in range(4):
        ...     state = state.apply_gradients({"w": -torch.ones(1)})
        >>> state.params["w"].tolist(), lf.optim.averaged_params(state, "swa")["w"].tolist()
        ([4.0], [3.0])
    """
    _check_wrapped(tx, "swa")
    check_positive_int("start", start, optional=False)
    check_positive_int("every", every, optional=False)

    def weight(count: torch.Tensor) -> torch.Tensor:
        return 1.0 / (count + 1)

    def host_weight(n: int) -> float:
        return 1.0 / (n + 1)

    return _averaging(tx, _check_name(name), _Weight(weight, host_weight), start=start, every=every)


def _averaging(
    tx: GradientTransformation, name: str, weight: _Weight, *, start: int, every: int
) -> GradientTransformation:
    """The wrapper both averages share: `weight` gives the lerp weight of the (n+1)-th average."""

    def init(params: Params) -> AverageState:
        return AverageState(
            inner=tx.init(params),
            average=tree_map(torch.clone, params),  # own storage: a checkpoint stores both
            # Two tensors: one object in two places would make torch.compile guard on the alias.
            count=zero_count(params),
            step=zero_count(params),
            name=name,
        )

    def update(
        updates: Updates, state: OptState, params: Params | None = None
    ) -> tuple[Updates, OptState]:
        if params is None:
            raise TypeError(
                f"lightfunc.optim.{name} averages the new parameters, so its `update` needs them: "
                f"call `tx.update(grads, state, params)` (TrainState.apply_gradients does)."
            )
        new_updates, inner = tx.update(updates, state.inner, params)
        if new_updates is None:  # a deferred micro-batch: nothing applied, nothing to average
            return None, dataclasses.replace(state, inner=inner)
        applied = _applied(inner)
        n, k = host_scalar(state.count), host_scalar(state.step)
        w_host = weight.host(n) if applied is None and isinstance(n, int) else None
        if w_host is not None and isinstance(k, int):
            # Eager on CPU: the counts as Python ints, as torch.optim keeps its step there.
            take_now = k + 1 >= start and (k + 1 - start) % every == 0
            average = state.average
            if take_now:
                average = _lerp(average, apply_updates(params, new_updates), w_host)
            return new_updates, AverageState(
                inner=inner,
                average=average,
                count=state.count + int(take_now),
                step=state.step + 1,
                name=name,
            )
        step = state.step + 1 if applied is None else state.step + applied.to(torch.int64)
        take = applied
        if start != 1 or every != 1:
            due = (step >= start) & ((step - start) % every == 0)
            take = due if take is None else take & due
        (w,) = once_per_step(weight.tensor(state.count).to(torch.float32))
        if take is not None:
            w = torch.where(take, w, 0.0)
        count = state.count + 1 if take is None else state.count + take.to(torch.int64)
        average = _lerp(state.average, apply_updates(params, new_updates), w)
        return new_updates, AverageState(
            inner=inner, average=average, count=count, step=step, name=name
        )

    update.wraps = tx  # type: ignore[attr-defined]
    return GradientTransformation(init, update)


def _applied(inner: OptState) -> torch.Tensor | None:
    """Whether an `apply_if_finite` inside this wrapper applied the update (None: there is none)."""
    found = find_state(inner, ApplyIfFiniteState)
    return None if found is None else found.last_finite


def _lerp(average: Params, new: Params, w: torch.Tensor | float) -> Params:
    """``average.lerp(new, w)`` leaf by leaf (w = 1 copies `new`, w = 0 keeps `average`)."""
    lists = foreach_leaves(average, new)
    if lists is not None and isinstance(w, float) and lists[0][0][0].is_floating_point():
        (avgs, news), spec = lists
        # torch.optim.swa_utils' own kernel: one call for all leaves, the weight a Python float.
        return tree_unflatten(spec, torch._foreach_lerp(avgs, news, w))
    return tree_map(lambda a, p: _lerp_leaf(a, p, w), average, new)


def _lerp_leaf(a: torch.Tensor, p: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    if not a.is_floating_point():  # integer "parameters" get no gradient: they stay as they are
        return p
    if isinstance(w, float):  # torch's kernel computes low-precision leaves in float32
        return torch.lerp(a, p, w)
    if a.dtype in (torch.float32, torch.float64):
        return torch.lerp(a, p, w.to(a.dtype))
    # float16 / bfloat16: in float32, as torch's lerp kernel computes them, rounded once.
    return torch.lerp(a.float(), p.float(), w).to(a.dtype)


def _forget_rate(decay: Any, warmup: bool) -> _Weight:
    """``1 - decay_n`` (the lerp weight) as a function of the average count `n`, warm-up applied.

    A constant decay's ``1 - decay`` is taken in Python's float64, as
    `get_ema_multi_avg_fn` takes it (float32's ``1 - 0.999`` is 1.3e-5 off);
    the warm-up's ``1 - (1 + n) / (10 + n)`` is written ``9 / (10 + n)``, one
    rounding.
    """
    if callable(decay):
        schedule: Schedule = decay

        def rate(count: torch.Tensor) -> torch.Tensor:
            return 1.0 - schedule(count).to(torch.float32)

        def host_rate(n: int) -> float | None:
            return None  # a schedule is a function of a tensor

    else:
        value = 1.0 - check_float(
            "decay", decay, low=0.0, high=1.0, hint="A typical value is 0.999 (or 0.9999)."
        )

        def rate(count: torch.Tensor) -> torch.Tensor:
            return torch.full((), value, dtype=torch.float32, device=count.device)

        def host_rate(n: int) -> float | None:
            return value

    if not warmup:
        return _Weight(rate, host_rate)

    def warmed(count: torch.Tensor) -> torch.Tensor:
        return torch.maximum(rate(count), 9.0 / (10 + count.to(torch.float32)))

    def host_warmed(n: int) -> float | None:
        r = host_rate(n)
        return None if r is None else max(r, 9.0 / (10 + n))

    return _Weight(warmed, host_warmed)


def _check_wrapped(tx: Any, fn: str) -> None:
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"`tx` must be a lightfunc.optim GradientTransformation, got {type(tx).__name__}. "
            f"Wrap the optimizer: lightfunc.optim.{fn}(lightfunc.optim.adamw(1e-3))."
        )


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier() or name == "params":
        raise ValueError(
            f"`name` must be an identifier other than 'params' (which names the current "
            f"parameters), got {name!r}. E.g. name='ema_slow'."
        )
    return name


class _HasParams(Protocol):
    params: Any
    opt_state: Any


def find_average(opt_state: OptState, name: str) -> AverageState | None:
    """The `AverageState` called `name` among `opt_state`'s wrapper states (outermost first), or None."""
    node = opt_state
    while node is not None:
        if isinstance(node, AverageState) and node.name == name:
            return node
        node = getattr(node, "inner", None)
    return None


def average_names(opt_state: OptState) -> list[str]:
    """The names of the averages kept in `opt_state`, outermost first."""
    names, node = [], opt_state
    while node is not None:
        if isinstance(node, AverageState):
            names.append(node.name)
        node = getattr(node, "inner", None)
    return names


def averaged_params(state: _HasParams, name: str = "ema") -> Params:
    """The parameters of `state` (a `TrainState`) with the average called `name` in place.

    Parameters the average does not hold (frozen ones) are the state's own.
    The tensors are the average itself, not copies: do not write into them.

    Args:
        state: a `TrainState` whose optimizer is wrapped in `ema` or `swa`.
        name: which average: "ema", "swa", or the `name=` given to the wrapper.

    Returns:
        A dict like `state.params`.

    Raises:
        ValueError: the state's optimizer keeps no average called `name`.

    Example:
        >>> import torch, lightfunc as lf
        >>> state = lf.TrainState.create(torch.nn.Linear(2, 1), lf.optim.ema(lf.optim.sgd(0.1)))
        >>> sorted(lf.optim.averaged_params(state))
        ['bias', 'weight']
    """
    if not (hasattr(state, "opt_state") and hasattr(state, "params")):
        raise TypeError(
            f"`state` must be a TrainState (with `params` and `opt_state`), got "
            f"{type(state).__name__}. For a LoopState pass `ls.state`."
        )
    found = find_average(state.opt_state, name)
    if found is None:
        raise ValueError(missing_average_message("name", name, average_names(state.opt_state)))

    def pick(avg: Any, current: Any) -> Any:
        return current if isinstance(avg, MaskedNode) else avg

    return optree.tree_map(
        pick,
        found.average,
        state.params,
        is_leaf=lambda x: isinstance(x, MaskedNode),
        namespace=NAMESPACE,
    )


def missing_average_message(argument: str, name: str, found: list[str]) -> str:
    """The error for asking (by `argument`) for an average a state does not keep."""
    have = f"it keeps {', '.join(map(repr, found))}" if found else "it keeps none"
    return (
        f"`{argument}={name!r}`: the state's optimizer keeps no average called {name!r} ({have}). "
        f"Wrap the optimizer when creating the state, e.g. "
        f"TrainState.create(model, lightfunc.optim.ema(lightfunc.optim.adamw(1e-3))) for 'ema' "
        f"or lightfunc.optim.swa(tx, start=...) for 'swa'; or evaluate weights='params'."
    )
