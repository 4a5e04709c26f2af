"""Reading an optimizer's learning rate back out of it (for `fit` and `LearningRateMonitor`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch


def learning_rate_of(tx: Any) -> Callable[..., Any] | float | None:
    """The learning rate inside an optimizer: its schedule, else its constant rate, else None.

    `lightfunc.optim`'s transforms hold their learning rate in a closure
    variable `lr` or `learning_rate`: a number, or a schedule (a function of
    the step). This walks the optimizer (its closures, and the fields of its
    wrapper objects, and the groups of a `multi_transform` in their order)
    and returns the first schedule it finds; without one, the first number;
    None when it finds neither.
    """
    todo: list[Any] = [tx]
    seen: set[int] = set()
    constant: float | None = None
    while todo and len(seen) < 10_000:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type | torch.Tensor | torch.nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, tuple | list):
            todo.extend(obj)
            continue
        if isinstance(obj, Mapping):  # e.g. the label -> transform dict of `multi_transform`
            todo.extend(reversed(list(obj.values())))  # popped in the dict's order
            continue
        if not callable(obj) or not hasattr(obj, "__code__"):  # a wrapper object: its fields
            todo.extend(getattr(obj, "__dict__", {}).values())
        code, cells = getattr(obj, "__code__", None), getattr(obj, "__closure__", None)
        for name, cell in zip(getattr(code, "co_freevars", ()), cells or (), strict=False):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if name in ("lr", "learning_rate"):
                if callable(value):
                    return cast(Callable[..., Any], value)
                if (
                    constant is None
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    constant = float(value)
            todo.append(value)
    return constant
