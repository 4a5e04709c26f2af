"""Checks of optimizer and schedule hyper-parameters, run once at construction.

Every message names the argument in backticks, says what was given, what was
expected and how to fix it. Nothing here runs inside an update.
"""

from __future__ import annotations

import math
from typing import Any

from ._base import ScalarOrSchedule


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """Return `value` as a float after checking it is a finite real in the given interval.

    Args:
        name: the argument's name, quoted in the message.
        value: what the caller passed.
        low, high: bounds of the accepted interval (`None`: unbounded).
        low_open, high_open: whether the bounds themselves are excluded.
        hint: how to fix it, appended to the message.

    Returns:
        `float(value)`.

    Raises:
        TypeError: `value` is not an int or a float (a tensor, a string, a bool).
        ValueError: `value` is not finite or lies outside the interval.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a Python float, got {type(value).__name__} ({value!r}). "
            f"Pass a plain number{' (a schedule is accepted only for learning rates)' if callable(value) else ''}."
            + (f" {hint}" if hint else "")
        )
    x = float(value)
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if not math.isfinite(x) or too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(
            f"`{name}` must be a finite number in {interval}, got {value!r}."
            + (f" {hint}" if hint else "")
        )
    return x


def check_int(name: str, value: Any, *, low: int, hint: str = "") -> int:
    """Return `value` after checking it is a Python int that is at least `low`.

    Raises:
        TypeError: `value` is not an int (a float such as ``1e3`` included).
        ValueError: `value < low`.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be an int, got {type(value).__name__} ({value!r}). "
            f"Pass a whole number of steps, e.g. `{name}=int({value!r})`."
            + (f" {hint}" if hint else "")
        )
    if value < low:
        raise ValueError(
            f"`{name}` must be an int >= {low}, got {value}." + (f" {hint}" if hint else "")
        )
    return value


def check_learning_rate(name: str, value: Any) -> ScalarOrSchedule:
    """Return a learning rate after checking it is a float >= 0 or a schedule.

    Raises:
        TypeError: `value` is neither a number nor a callable (a tensor, say).
        ValueError: `value` is a negative or non-finite number.
    """
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a float or a schedule (a function of the step count, e.g. "
            f"`lightfunc.optim.cosine_decay_schedule(1e-3, 1000)`), got {type(value).__name__} "
            f"({value!r}). A tensor learning rate would be baked into a compiled step: wrap a "
            f"changing value in a schedule instead."
        )
    return check_float(name, value, low=0.0, hint="Learning rates are >= 0, e.g. 1e-3.")
