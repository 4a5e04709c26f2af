"""`HealthMonitor`: `track_health`'s statistics as metrics, for the loggers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._callback import Callback
from .._state import TrainState, train_states
from ..optim._health import HealthState
from ..optim._wrappers import find_state

if TYPE_CHECKING:
    from .._contract import LoopState


class HealthMonitor(Callback):
    """Add the optimizer's health statistics to `ls.metrics`, on the steps they are computed.

    The statistics are computed inside the step by the optimizer wrapper
    `lightfunc.optim.track_health(tx, every=n)` and kept in the optimizer
    state; on every step that is a multiple of `n` this callback adds them,
    as device tensors (no sync), under

    - `health/<group>/grad_norm`, `.../param_norm`, `.../update_ratio`
      (update norm over parameter norm), `.../nonfinite` (non-finite
      gradient elements) for each group of parameters, and
    - `health/grad_norm`, `health/param_norm`, `health/update_ratio`,
      `health/nonfinite` over all parameters,

    where the loggers read them at their `log_every_n_steps` (give them the
    same `n`). With several `TrainState`s in the state (a GAN), the i-th
    one's (in tree order) go under `health/<i>/...`.

    The step a statistic belongs to is the wrapper's update count, which is
    the loop's `ls.step` when the wrapper was there from the first step and
    no wrapper outside it rolled its state back (see `track_health`).

    Args:
        prefix: the metric names' first component.
        per_group: add each group's statistics (True) or only the totals.

    Raises:
        TypeError: at the start of the run, if no `TrainState` in the state
            has an optimizer wrapped in `track_health`.

    Example:
        >>> import lightfunc as lf
        >>> tx = lf.optim.track_health(lf.optim.adamw(1e-3), every=50)
        >>> logger = lf.loggers.CSVLogger("runs", log_every_n_steps=50)  # doctest: +SKIP
        >>> callbacks = [lf.callbacks.HealthMonitor(), logger]  # doctest: +SKIP
    """

    def __init__(self, *, prefix: str = "health", per_group: bool = True) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(
                f"`prefix` must be a non-empty string (the metric names' first part), got {prefix!r}."
            )
        self.prefix, self.per_group = prefix, bool(per_group)

    def describe(self) -> str:
        return self.prefix

    def on_start(self, ls: LoopState) -> None:
        if not _health_states(ls.state):
            raise TypeError(
                f"HealthMonitor found no health statistics in the state "
                f"({type(ls.state).__name__}): wrap the optimizer in "
                f"lightfunc.optim.track_health, e.g. "
                f"`lf.TrainState.create(model, lf.optim.track_health(lf.optim.adamw(1e-3), every=50))`."
            )

    def extra_metrics(self, ls: LoopState) -> dict[str, Any]:
        found = _health_states(ls.state)
        out: dict[str, torch.Tensor] = {}
        for i, health in found:
            if ls.step % health.every:
                continue
            base = self.prefix if len(found) == 1 else f"{self.prefix}/{i}"
            out.update(_totals(health, base))
            if self.per_group:
                stats = health.stats()
                for j, group in enumerate(health.groups):
                    for stat, values in stats.items():
                        out[f"{base}/{group}/{stat}"] = values[j]
        return out


def _health_states(state: Any) -> list[tuple[int, HealthState]]:
    """(position, health state) of each `TrainState` in `state` whose optimizer tracks health."""
    states = [state] if isinstance(state, TrainState) else train_states(state)
    found = [(i, find_state(ts.opt_state, HealthState)) for i, ts in enumerate(states)]
    return [(i, h) for i, h in found if h is not None]


def _totals(health: HealthState, base: str) -> dict[str, torch.Tensor]:
    """The statistics over all groups: norms of the group norms, the summed count."""
    param_norm = torch.linalg.vector_norm(health.param_norm)
    return {
        f"{base}/grad_norm": torch.linalg.vector_norm(health.grad_norm),
        f"{base}/param_norm": param_norm,
        f"{base}/update_ratio": torch.linalg.vector_norm(health.update_norm) / param_norm,
        f"{base}/nonfinite": health.nonfinite.sum(),
    }
