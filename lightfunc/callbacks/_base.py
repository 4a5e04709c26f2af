"""The callback protocol: small objects that observe the stream of trainer states.

    for ts in lf.loop(step, state, data, callbacks=[lf.callbacks.EarlyStopping("val_loss")]):
        ...

For every train step the loop calls, in order:
0. `extra_metrics(ts)` on every callback: device tensors it adds to
   `ts.metrics` (a learning rate, ...), seen by everything after it;
1. `on_step(ts)` on every callback: observe, update your own state, and
   return True to ask the loop to stop after this step;
2. collects every stateful callback's `state_dict()` into `ts.callbacks`
   (so checkpoints carry it);
3. `on_step_end(ts)` on every callback, with that complete state: the place
   to save checkpoints or write logs.
`on_start(ts)` runs once before the first step (after a resume, with the
restored state: a callback gets its saved state back through
`load_state_dict` first); `on_end(ts)` once after the last.

Callback state lives under `state_key`, which must be unique in a run. The
default is the class name plus the arguments that distinguish instances
(`describe()`), so two `EarlyStopping`s on different metrics do not collide.
State is a dict of JSON-able values (ints, floats, strings, bools) or tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._loop import TrainerState


class Callback:
    """Base class: override the hooks you need; all of them default to doing nothing."""

    def describe(self) -> str:
        """The arguments that tell this instance apart from another of its class ("" by default)."""
        return ""

    @property
    def state_key(self) -> str:
        """Where this callback's state lives in `TrainerState.callbacks` and in checkpoints."""
        detail = self.describe()
        return f"{type(self).__qualname__}[{detail}]" if detail else type(self).__qualname__

    def state_dict(self) -> dict[str, Any] | None:
        """This callback's resumable state, or None if it has none (the default)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (called before `on_start` when resuming)."""

    def extra_metrics(self, ts: TrainerState) -> dict[str, Any] | None:
        """Metrics (0-d device tensors, not synced) to add to this step's `ts.metrics`, or None."""
        return None

    def on_start(self, ts: TrainerState) -> None:
        """Once, before the first step of this `loop` call."""

    def on_step(self, ts: TrainerState) -> bool | None:
        """After every train step (and its evaluation, if one ran). Return True to stop."""
        return None

    def on_step_end(self, ts: TrainerState) -> None:
        """After every step's `on_step`s, with all callback states in `ts.callbacks`."""

    def on_end(self, ts: TrainerState) -> None:
        """Once, after the last step (also when stopped early or by SIGTERM)."""


def check_unique_keys(callbacks: list[Callback]) -> None:
    """Raise if two callbacks would share a state key (their checkpoint state would collide)."""
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
