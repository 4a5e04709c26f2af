"""Argument checks shared by every entry point: one rule per kind of argument.

Each check raises a builtin exception whose message names the argument (in
backticks), what was given and what was expected. Validation happens once,
where an object is built or a run starts, never per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def is_int(value: Any) -> bool:
    """Whether `value` is an int and not a bool (`True` is an int to Python, not to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, *, optional: bool = True) -> None:
    """Raise ValueError unless `value` is an int >= 1 (or None, when `optional`)."""
    if value is None and optional:
        return
    if not (is_int(value) and value >= 1):
        allowed = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def check_positive_ints(**values: Any) -> None:
    """`check_positive_int` for each keyword: None or an int >= 1."""
    for name, value in values.items():
        check_positive_int(name, value)


def check_non_negative_int(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is an int >= 0."""
    if not (is_int(value) and value >= 0):
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")


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


def check_optional_str(arg: str, value: Any) -> None:
    """Raise TypeError unless `value` is a string or None."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"`{arg}` must be a string or None, got {type(value).__name__} {value!r}.")


def check_mapping(arg: str, value: Any) -> dict[str, Any]:
    """`value` as a dict (None: empty), after checking it is a mapping with string keys."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(
            f"`{arg}` must be a mapping of argument names (str) to values, or None, got "
            f"{type(value).__name__} {value!r:.80}."
        )
    return dict(value)
