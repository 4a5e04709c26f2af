"""`fit`: drive the loop to the end in one call, for users coming from `Trainer.fit`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from ._build import Step
from ._loop import TrainerState, loop
from ._progress import ProgressBar


def fit(
    step: Step[Any] | Callable[..., Any],
    state: Any,
    train_data: Iterable[Any],
    *,
    progress_bar: bool = True,
    log_every_n_steps: int = 50,
    **loop_kwargs: Any,
) -> TrainerState:
    """Train to the end and return the final `TrainerState`.

    Takes the same arguments as `lightfunc.loop` (`max_epochs`, `max_steps`,
    `eval_step`, `eval_data`, `fast_dev_run`, ...), plus:

    Args:
        progress_bar: show a progress bar (tqdm on a terminal, plain lines otherwise).
        log_every_n_steps: how often the bar reads metrics from the device.

    Returns:
        The last `TrainerState`: final state, counters, last metrics and
        evaluation results.

    Raises:
        ValueError: if the run has no steps to take.
    """
    bar = (
        ProgressBar(_expected_steps(train_data, loop_kwargs), log_every_n_steps=log_every_n_steps)
        if progress_bar
        else None
    )
    last: TrainerState | None = None
    try:
        for ts in loop(step, state, train_data, **loop_kwargs):
            if bar is not None:
                bar.update(ts)
            last = ts
    finally:
        if bar is not None:
            bar.close()
    if last is None:
        raise ValueError(
            "`fit` ran no steps: the state is already past `max_steps` / `max_epochs`."
        )
    return last


def _expected_steps(train_data: Iterable[Any], kwargs: dict[str, Any]) -> int | None:
    fast = kwargs.get("fast_dev_run")
    if fast:
        return 1 if fast is True else int(fast)
    limit = kwargs.get("limit_train_batches")
    try:
        per_epoch: int | None = len(train_data)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    if per_epoch is not None and isinstance(limit, int):
        per_epoch = min(per_epoch, limit)
    elif per_epoch is not None and isinstance(limit, float):
        per_epoch = max(1, math.floor(per_epoch * limit))
    max_steps, max_epochs = kwargs.get("max_steps"), kwargs.get("max_epochs")
    if max_steps is None and max_epochs is None:
        max_epochs = 1
    by_epochs = per_epoch * max_epochs if per_epoch is not None and max_epochs is not None else None
    candidates: list[int] = [n for n in (max_steps, by_epochs) if isinstance(n, int)]
    return min(candidates) if candidates else None
