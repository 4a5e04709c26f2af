"""`LearningRateMonitor`: the scheduled learning rate as a metric, for loggers and the progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._callback import Callback
from .._validate import check_choice
from ..optim._introspect import learning_rate_of

if TYPE_CHECKING:
    from .._contract import LoopState


class LearningRateMonitor(Callback):
    """Add the learning rate at each step to `ls.metrics` under `name`.

    The schedule is a pure function of the step count, so the value is
    computed on the device from `ls.state.step` (no sync); loggers read it at
    their logging steps like any other metric.

    Args:
        schedule: the learning-rate schedule given to the optimizer (a
            `lightfunc.optim` schedule), or a constant float; None (the
            default, as in Lightning) reads it from the state's optimizer
            (`ls.state.tx`): its schedule, else its constant rate.
        name: the metric's name.
        logging_interval: "step" (Lightning's default: the rate at every
            step, for the logger to read at its interval) or "epoch" (only on
            the last step of each epoch, e.g. for a per-epoch schedule); None
            is "step". A logger writes the metric at its `log_every_n_steps`;
            to write it at another rate than the loss, give the logger
            `metric_intervals={"lr": "epoch"}` (or an int n).

    Raises:
        TypeError: if `schedule` is neither callable, a number nor None;
            with `schedule=None`, at the first step, if the state's optimizer
            holds no learning rate to read.
        ValueError: for another `logging_interval`.

    Example:
        >>> import lightfunc as lf
        >>> schedule = lf.optim.cosine_decay_schedule(1e-3, decay_steps=1000)
        >>> monitor = lf.callbacks.LearningRateMonitor(schedule)
        >>> monitor = lf.callbacks.LearningRateMonitor(logging_interval="step")  # reads it
    """

    def __init__(
        self,
        schedule: Callable[[torch.Tensor], torch.Tensor] | float | None = None,
        *,
        name: str = "lr",
        logging_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        check_choice("logging_interval", logging_interval, ("step", "epoch", None))
        self.logging_interval = logging_interval or "step"
        if (
            schedule is not None
            and not callable(schedule)
            and not isinstance(schedule, int | float)
        ):
            raise TypeError(
                f"`schedule` must be a lightfunc.optim schedule (a function of the step), a number "
                f"or None (read it from the optimizer), got {type(schedule).__name__}."
            )
        self.schedule, self.name = schedule, name
        self._found: tuple[Any, Callable[..., Any] | float] | None = None  # (tx, its rate)

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
        schedule = self.schedule if self.schedule is not None else self._read(ls.state)
        if callable(schedule):
            # The optimizer used the rate of the step count before this update.
            return {self.name: schedule(step - 1)}
        return {self.name: torch.tensor(float(schedule), device=step.device)}

    def _read(self, state: Any) -> Callable[..., Any] | float:
        """The learning rate of `state.tx`, found once per optimizer."""
        tx = getattr(state, "tx", None)
        if self._found is None or self._found[0] is not tx:
            rate = learning_rate_of(tx)
            if rate is None:
                raise TypeError(
                    f"LearningRateMonitor found no learning rate in the state's optimizer "
                    f"(`tx` is {type(tx).__name__}): pass it, as "
                    f"`LearningRateMonitor(schedule)` with the schedule or number the "
                    f"optimizer was given."
                )
            self._found = (tx, rate)
        return self._found[1]
