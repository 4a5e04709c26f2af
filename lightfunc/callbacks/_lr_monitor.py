"""`LearningRateMonitor`: the scheduled learning rate as a metric, for loggers and the progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._callback import Callback
from .._validate import check_choice

if TYPE_CHECKING:
    from .._contract import LoopState


class LearningRateMonitor(Callback):
    """Add the learning rate at each step to `ls.metrics` under `name`.

    The schedule is a pure function of the step count, so the value is
    computed on the device from `ls.state.step` (no sync); loggers read it at
    their logging steps like any other metric.

    Args:
        schedule: the learning-rate schedule given to the optimizer (a
            `lightfunc.optim` schedule), or a constant float.
        name: the metric's name.
        logging_interval: "step" (Lightning's default: the rate at every
            step, for the logger to read at its interval) or "epoch" (only on
            the last step of each epoch, e.g. for a per-epoch schedule); None
            is "step".

    Raises:
        TypeError: if `schedule` is neither callable nor a number.
        ValueError: for another `logging_interval`.

    Example:
        >>> import lightfunc as lf
        >>> schedule = lf.optim.cosine_decay_schedule(1e-3, decay_steps=1000)
        >>> monitor = lf.callbacks.LearningRateMonitor(schedule)
    """

    def __init__(
        self,
        schedule: Callable[[torch.Tensor], torch.Tensor] | float,
        *,
        name: str = "lr",
        logging_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        check_choice("logging_interval", logging_interval, ("step", "epoch", None))
        self.logging_interval = logging_interval or "step"
        if not callable(schedule) and not isinstance(schedule, int | float):
            raise TypeError(
                f"`schedule` must be a lightfunc.optim schedule (a function of the step) or a number, "
                f"got {type(schedule).__name__}."
            )
        self.schedule, self.name = schedule, name

    def describe(self) -> str:
        return self.name

    def extra_metrics(self, ls: LoopState) -> dict[str, Any]:
        if self.logging_interval == "epoch" and not ls.epoch_end:
            return {}
        step = getattr(ls.state, "step", None)
        if not isinstance(step, torch.Tensor):
            raise TypeError(
                f"LearningRateMonitor needs a state with a `step` tensor (a TrainState), got {type(ls.state).__name__}."
            )
        if callable(self.schedule):
            # The optimizer used the rate of the step count before this update.
            return {self.name: self.schedule(step - 1)}
        return {self.name: torch.tensor(float(self.schedule), device=step.device)}
