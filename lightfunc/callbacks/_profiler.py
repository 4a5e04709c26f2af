"""`ProfilerCallback`: record a window of steps with `torch.profiler` and write the trace."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._callback import Callback
from ._progress import _is_rank_zero

if TYPE_CHECKING:
    from .._contract import LoopState

_EXPORTS = ("chrome", "tensorboard")


class ProfilerCallback(Callback):
    """Profile `active` steps after `wait` + `warmup` steps and write the trace into `dirpath`.

    The window counts from the start of this `loop` call: with the defaults
    the first step is skipped (compilation, first-batch costs), the second
    warms the profiler up and steps 3 to 5 are recorded. The profiler stops
    and writes as soon as the window is over, or at the end of the run if
    that comes first (a short run still gets the steps it had; one that
    ends during `wait` writes nothing).

    Only rank 0 of a `torch.distributed` run profiles and writes; the other
    ranks are silent. Nothing is written outside `dirpath`.

    Args:
        dirpath: folder for the trace (created if missing).
        wait: steps to skip before the profiler starts.
        warmup: steps profiled but discarded (the profiler's own start-up).
        active: steps recorded.
        record_shapes: record operator input shapes.
        with_stack: record Python stacks (larger traces, slower).
        profile_memory: record tensor allocations.
        export: `"chrome"` writes `trace_steps<first>-<last>.json` (open in
            chrome://tracing or ui.perfetto.dev); `"tensorboard"` writes
            `<worker>.<time>.pt.trace.json` through
            `torch.profiler.tensorboard_trace_handler`, for TensorBoard's
            profiler plugin (`tensorboard --logdir dirpath`).

    Attributes:
        trace_path: the file written, or None before the window ends.

    Raises:
        ValueError: negative `wait` or `warmup`, `active` < 1, an unknown `export`.
        TypeError: `dirpath` not a path.

    Example:
        >>> import tempfile, lightfunc as lf
        >>> cb = lf.callbacks.ProfilerCallback(tempfile.mkdtemp(), wait=0, warmup=1, active=2)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        *,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        record_shapes: bool = False,
        with_stack: bool = False,
        profile_memory: bool = False,
        export: Literal["chrome", "tensorboard"] = "chrome",
    ) -> None:
        if not isinstance(dirpath, str | os.PathLike):
            raise TypeError(
                f"`dirpath` must be a str or os.PathLike folder, got {type(dirpath).__name__}."
            )
        for name, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low} (steps), got {value!r}.")
        if export not in _EXPORTS:
            raise ValueError(f"`export` must be one of {_EXPORTS}, got {export!r}.")
        self.dirpath = Path(dirpath)
        self.wait, self.warmup, self.active = wait, warmup, active
        self.record_shapes, self.with_stack, self.profile_memory = (
            record_shapes,
            with_stack,
            profile_memory,
        )
        self.export = export
        self.trace_path: Path | None = None
        self._prof: Any = None  # the running torch.profiler.profile, or None
        self._first_step = 0  # trainer step of the first step this profiler sees
        self._last_step = 0  # trainer step of the last step it saw

    def describe(self) -> str:
        return str(self.dirpath)

    def on_start(self, ls: LoopState) -> None:
        if not _is_rank_zero():
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        self.dirpath.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._first_step = self._last_step = ls.step + 1
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1),
            on_trace_ready=self._write,
            record_shapes=self.record_shapes,
            with_stack=self.with_stack,
            profile_memory=self.profile_memory,
        )
        self._prof.start()

    def on_step_end(self, ls: LoopState) -> None:
        if self._prof is None:
            return
        self._last_step = ls.step
        self._prof.step()
        if ls.step - self._first_step + 1 >= self.wait + self.warmup + self.active:
            self._stop()

    def on_end(self, ls: LoopState) -> None:
        self._stop()

    def _stop(self) -> None:
        """Stop the profiler (writing the trace if the window had started recording)."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()

    def _write(self, prof: Any) -> None:
        """`on_trace_ready`: write the recorded window into `dirpath`."""
        first = min(self._first_step + self.wait + self.warmup, self._last_step)
        name = f"trace_steps{first}-{self._last_step}"
        if self.export == "chrome":
            path = self.dirpath / f"{name}.json"
            prof.export_chrome_trace(str(path))
            self.trace_path = path
            return
        from torch.profiler import tensorboard_trace_handler

        before = set(self.dirpath.iterdir())
        tensorboard_trace_handler(str(self.dirpath), worker_name=name)(prof)
        written = sorted(set(self.dirpath.iterdir()) - before)
        self.trace_path = written[0] if written else None
