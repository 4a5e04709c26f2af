"""Checks of optimizer and schedule hyper-parameters, run once at construction.

The number checks live in `lightfunc._validate` (one rule per kind of
argument for the whole package); this module adds the learning-rate rule.
Nothing here runs inside an update.
"""

from __future__ import annotations

from typing import Any

from .._validate import check_float as check_float
from .._validate import check_int as check_int
from ._base import ScalarOrSchedule


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
