"""`Timer`: stop the run once it has trained for a given wall-clock time."""

from __future__ import annotations

import datetime
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from .._callback import Callback

if TYPE_CHECKING:
    from .._contract import LoopState

# The clock, a module attribute so tests can replace it (monotonic: immune to NTP jumps).
_clock = time.monotonic


class Timer(Callback):
    """Stop the loop once training has taken longer than `max_time`.

    Time counts from `on_start` to each step's `on_step` (evaluation inside
    the run included), summed over `loop` calls: the elapsed time is the
    callback's checkpointed state, so a run resumed from a checkpoint stops
    when the total, not the time since the restart, reaches `max_time`.

    Under `torch.distributed` (world size > 1) every step does one tiny
    all-reduce so that all ranks stop at the same step (each rank has its
    own clock; a rank stopping alone would hang the others).

    Args:
        max_time: seconds (int or float), a `datetime.timedelta`, or
            Lightning's `"DD:HH:MM:SS"` string (e.g. `"00:12:00:00"` for 12 hours).

    Raises:
        ValueError: a negative or NaN duration, or a string not in `"DD:HH:MM:SS"` form.
        TypeError: `max_time` of another type.

    Example:
        >>> import lightfunc as lf
        >>> lf.callbacks.Timer("00:01:30:00").max_time
        5400.0
    """

    def __init__(self, max_time: float | datetime.timedelta | str) -> None:
        self.max_time = parse_duration(max_time, "max_time")
        self._offset = 0.0  # seconds spent before this `loop` call (restored on resume)
        self._started_at: float | None = None  # clock reading at on_start; None when not running

    @property
    def elapsed(self) -> float:
        """Seconds of training so far, over all runs this state was resumed through."""
        if self._started_at is None:
            return self._offset
        return self._offset + (_clock() - self._started_at)

    @property
    def remaining(self) -> float:
        """Seconds left before `max_time` (never below 0)."""
        return max(0.0, self.max_time - self.elapsed)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._offset = float(state["elapsed"])
        self._started_at = None

    def on_start(self, ls: LoopState) -> None:
        self._offset = self.elapsed  # a second `loop` call on the same Timer keeps counting
        self._started_at = _clock()

    def on_step(self, ls: LoopState) -> bool | None:
        return _on_any_rank(self.elapsed >= self.max_time)

    def on_end(self, ls: LoopState) -> None:
        self._offset, self._started_at = self.elapsed, None


def parse_duration(value: float | datetime.timedelta | str, name: str) -> float:
    """Seconds from seconds, a `timedelta` or a `"DD:HH:MM:SS"` string; raises naming `name`."""
    if isinstance(value, str):
        seconds = _parse_dd_hh_mm_ss(value, name)
    elif isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(
            f"`{name}` must be seconds (a number), a datetime.timedelta or a 'DD:HH:MM:SS' "
            f"string, got {type(value).__name__} {value!r}."
        )
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"`{name}` must be a duration >= 0, got {value!r}.")
    return seconds


def _parse_dd_hh_mm_ss(text: str, name: str) -> float:
    fields = text.strip().split(":")
    if len(fields) != 4 or not all(f.isdigit() and f.isascii() for f in fields):
        raise ValueError(
            f"`{name}` as a string must be 'DD:HH:MM:SS' (four non-negative integers, e.g. "
            f"'00:12:00:00' for 12 hours), got {text!r}. Pass seconds or a timedelta otherwise."
        )
    days, hours, minutes, seconds = (int(f) for f in fields)
    return datetime.timedelta(
        days=days, hours=hours, minutes=minutes, seconds=seconds
    ).total_seconds()


def _on_any_rank(flag: bool) -> bool:
    """`flag` OR-ed over all ranks of a `torch.distributed` run (world size > 1); else `flag`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    votes = torch.tensor([float(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())
