"""`evaluate` and `predict`: a built eval step over data, and the step-building rules the loop shares.

`evaluate` combines each metric by its reduction (`lightfunc._metrics`);
`weights=` swaps in an average the optimizer keeps (`optim.ema` / `swa`).
`as_train_step` / `_as_eval_step` are the one place a plain function given
to `loop`, `fit` or `evaluate` is built, and a built step is checked.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ._build import Step, build, build_eval
from ._compile import CompileOptions
from ._contract import LoopState, Metrics
from ._device import to_device
from ._metrics import MetricTotals, batch_size
from ._state import map_train_states, train_states
from ._tree import tree_leaves
from ._validate import is_int
from .optim._averaging import (
    average_names,
    averaged_params,
    find_average,
    missing_average_message,
)


def evaluate(
    eval_step: Step[Any] | Callable[..., Any],
    state: Any,
    data: Iterable[Any],
    *,
    limit_batches: int | float | None = None,
    device: torch.device | None = None,
    weights: str = "params",
) -> Metrics:
    """Run `eval_step` over `data` and combine its metrics over the batches.

    Each metric is combined by its reduction (`lightfunc._metrics`): floating
    metrics are means over all examples (batch values weighted by the batch's
    leading dimension, so a smaller last batch counts for what it holds),
    integer metrics are summed, bool metrics OR-ed; a step built with
    `metric_reductions={"worst": "max"}` gets those instead.

    Args:
        eval_step: `eval_step(state, batch) -> dict of 0-d tensors`, built with
            `lightfunc.build_eval` or plain (then built here, compiled).
        state: the state to evaluate (a `TrainState` or a `LoopState`).
        data: an iterable of batches.
        limit_batches: an int count or a float fraction of `data`'s batches.
        device: where to run; defaults to the device of the state's tensors.
        weights: "params" (the state's parameters), or the name of an average
            its optimizer keeps ("ema", "swa": `lightfunc.optim.ema` /
            `swa`), evaluated in place of the parameters (buffers stay the
            state's). In a state of several `TrainState`s, those keeping
            that average use it and the others their parameters.

    Returns:
        dict name -> 0-d tensor on the device, each metric combined over all
        batches. Not synced.

    Raises:
        TypeError: if `eval_step` returns something other than a dict.
        ValueError: if `data` yields no batches, or no `TrainState` in
            `state` keeps the average `weights` names.
    """
    step = _as_eval_step(eval_step)
    if isinstance(state, LoopState):
        state = state.state
    state = with_weights(state, weights)
    device = device if device is not None else _device_of(state)
    n = _num_batches(data, limit_batches, "limit_batches")
    batches = data if n is None else itertools.islice(data, n)
    totals = MetricTotals(step.metric_reductions)
    seen = 0
    for batch in batches:
        batch = to_device(batch, device, non_blocking=True)
        metrics = step(state, batch)
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"`eval_step` must return a dict of 0-d tensors, got {type(metrics).__name__}. "
                f"For arbitrary outputs use lightfunc.predict."
            )
        totals.add(metrics, batch_size(batch))
        seen += 1
    if seen == 0:
        raise ValueError(
            "`data` yielded no batches to evaluate; check its length and `limit_batches`."
        )
    return totals.result()


def predict(
    predict_step: Step[Any] | Callable[..., Any],
    state: Any,
    data: Iterable[Any],
    *,
    device: torch.device | None = None,
    weights: str = "params",
) -> list[Any]:
    """Run `predict_step(state, batch) -> outputs` over `data`; return the outputs in order (on device).

    `weights` is `evaluate`'s: "params", or an average kept by the optimizer ("ema", "swa").
    """
    step = _as_eval_step(predict_step)
    if isinstance(state, LoopState):
        state = state.state
    state = with_weights(state, weights)
    device = device if device is not None else _device_of(state)
    return [step(state, to_device(batch, device, non_blocking=True)) for batch in data]


def with_weights(state: Any, weights: str, argument: str = "weights") -> Any:
    """`state` with each `TrainState`'s parameters replaced by its average `weights` ("params": as is).

    Raises:
        ValueError: `weights` (passed as `argument`) is not a string, or no
            `TrainState` keeps that average.
    """
    if weights == "params":
        return state
    if not isinstance(weights, str):
        raise ValueError(
            f"`{argument}` must be 'params' or the name of an average such as 'ema' or 'swa', "
            f"got {weights!r}."
        )
    names = [name for ts in train_states(state) for name in average_names(ts.opt_state)]
    if weights not in names:
        raise ValueError(missing_average_message(argument, weights, names))

    def swap(_: int, ts: Any) -> Any:
        if find_average(ts.opt_state, weights) is None:
            return ts
        return ts.replace(params=averaged_params(ts, weights))

    return map_train_states(swap, state)


def as_train_step(step: Step[Any] | Callable[..., Any], **build_options: Any) -> Step[Any]:
    """`step` as a built train step; a plain function is built with `build_options`.

    Args:
        step: a `Step` built with `lightfunc.build`, or a plain train function.
        **build_options: `lightfunc.build` keywords (`precision`, `strategy`,
            `compile`, ...); None means "not given".

    Returns:
        The built step.

    Raises:
        TypeError: `step` is a built eval step.
        ValueError: a build option is given with a step that is already
            built (the option would be ignored or contradict the build).
    """
    given = {name: value for name, value in build_options.items() if value is not None}
    if not isinstance(step, Step):
        return build(step, **given)
    if step.kind != "train":
        raise TypeError(f"`step` must be a train step (built with lightfunc.build), got {step!r}.")
    if given:
        options = ", ".join(f"{name}={value!r}" for name, value in given.items())
        raise ValueError(
            f"`step` is already built ({step!r}), so `{options}` cannot apply to it: build "
            f"options are set in one place, the build. Pass {options} to lightfunc.build, or "
            f"pass the plain function to have it built with them."
        )
    return step


def _as_eval_step(fn: Step[Any] | Callable[..., Any], like: Step[Any] | None = None) -> Step[Any]:
    """`fn` as a built eval step; a plain function is built like the train step `like`."""
    if isinstance(fn, Step):
        if fn.kind != "eval":
            raise TypeError(f"`eval_step` must be built with lightfunc.build_eval, got {fn!r}.")
        return fn
    if like is None:
        return build_eval(fn, compile=True)
    compile_: bool | CompileOptions = (
        like.compile_options if like.compile_options is not None else False
    )
    return build_eval(fn, compile=compile_, precision=like.precision, strategy=like.strategy)


def _check_limit(name: str, value: int | float | None) -> None:
    if value is None:
        return
    if not (is_int(value) or isinstance(value, float)):
        raise TypeError(f"`{name}` must be an int (batches) or a float (fraction), got {value!r}.")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"`{name}` as a count must be >= 1, got {value}.")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(
            f"`{name}` as a fraction must be in (0, 1], got {value}. Give an int for a count."
        )


def _num_batches(data: Iterable[Any], limit: int | float | None, name: str) -> int | None:
    _check_limit(name, limit)
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return None
    if isinstance(limit, int):
        return limit
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"`{name}={limit}` is a fraction, but the data has no len(); give an int count instead."
        ) from None
    return max(1, math.floor(total * limit))


def _device_of(state: Any) -> torch.device:
    for leaf in tree_leaves(state):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")
