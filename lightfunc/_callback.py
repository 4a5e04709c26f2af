"""The callback protocol: small objects that observe the stream of loop states.

    for ls in lf.loop(step, state, data, callbacks=[lf.callbacks.EarlyStopping("val_loss")]):
        ...

For every train step the loop calls, in order:
0. `extra_metrics(ls)` on every callback: device tensors it adds to
   `ls.metrics` (a learning rate, ...), seen by everything after it;
1. `on_step(ls)` on every callback: observe, update your own state, and
   return True to ask the loop to stop after this step;
2. collects every stateful callback's `state_dict()` into `ls.callbacks`
   (so checkpoints carry it);
3. `on_step_end(ls)` on every callback, with that complete state: the place
   to save checkpoints or write logs.
`on_start(ls)` runs once before the first step (after a resume, with the
restored state: a callback gets its saved state back through
`load_state_dict` first); `on_end(ls)` once after the last.

`on_interrupt(ls, reason)` runs when the run is cut short from outside the
step: `reason` is "sigterm" (a preemption signal; the loop then stops
cleanly after the step) or "exception" (the step raised; `ls` is the last
completed step, and the exception propagates afterwards). The checkpoint
manager saves there; the loop itself knows nothing about checkpoints.

Callback state lives under `state_key`, which must be unique in a run. The
default is the class name plus the arguments that distinguish instances
(`describe()`), so two `EarlyStopping`s on different metrics do not collide.
State is a dict of JSON-able values (ints, floats, strings, bools) or tensors.

This module sits below the loop (it imports only the contract), so the loop,
the callbacks package, the loggers and the manager all import it, never
each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from ._contract import LoopState

InterruptReason = Literal["sigterm", "exception"]


class Callback:
    """Base class: override the hooks you need; all of them default to doing nothing."""

    def describe(self) -> str:
        """The arguments that tell this instance apart from another of its class ("" by default)."""
        return ""

    @property
    def state_key(self) -> str:
        """Where this callback's state lives in `LoopState.callbacks` and in checkpoints."""
        detail = self.describe()
        return f"{type(self).__qualname__}[{detail}]" if detail else type(self).__qualname__

    def state_dict(self) -> dict[str, Any] | None:
        """This callback's resumable state, or None if it has none (the default)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (called before `on_start` when resuming)."""

    def extra_metrics(self, ls: LoopState) -> dict[str, Any] | None:
        """Metrics (0-d device tensors, not synced) to add to this step's `ls.metrics`, or None."""
        return None

    def on_start(self, ls: LoopState) -> None:
        """Once, before the first step of this `loop` call."""

    def on_step(self, ls: LoopState) -> bool | None:
        """After every train step (and its evaluation, if one ran). Return True to stop."""
        return None

    def on_step_end(self, ls: LoopState) -> None:
        """After every step's `on_step`s, with all callback states in `ls.callbacks`."""

    def on_interrupt(self, ls: LoopState, reason: InterruptReason) -> None:
        """The run is cut short ("sigterm" or "exception"); `ls` is the last completed step."""

    def on_end(self, ls: LoopState) -> None:
        """Once, after the last step (also when stopped early or by SIGTERM)."""

    @property
    def handles_interrupts(self) -> bool:
        """Whether this callback overrides `on_interrupt` (the loop then catches SIGTERM)."""
        return type(self).on_interrupt is not Callback.on_interrupt


def callback_list(callbacks: Any) -> list[Any]:
    """`callbacks` as a list: one `Callback` alone (as Lightning's Trainer takes it) or None too."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    if isinstance(callbacks, str | bytes) or not hasattr(callbacks, "__iter__"):
        raise TypeError(
            f"`callbacks` must be a list of lightfunc.callbacks.Callback instances (or one), "
            f"got {type(callbacks).__name__}."
        )
    return list(callbacks)


def check_callbacks(callbacks: Sequence[Any]) -> list[Callback]:
    """`callbacks` as a list, after checking each is a `Callback` and their state keys are unique."""
    seen: dict[str, Callback] = {}
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks must be lightfunc.callbacks.Callback instances, got {type(cb).__name__}."
            )
        key = cb.state_key
        if key in seen:
            raise ValueError(
                f"two callbacks share the state key {key!r} ({seen[key]!r} and {cb!r}); their "
                f"checkpointed state would collide. Give one of them different arguments, or "
                f"override `state_key`."
            )
        seen[key] = cb
    return list(callbacks)


def callback_states(callbacks: Sequence[Callback]) -> dict[str, Any]:
    """Every stateful callback's `state_dict()`, by `state_key` (what `LoopState.callbacks` holds)."""
    return {cb.state_key: s for cb in callbacks if (s := cb.state_dict()) is not None}
