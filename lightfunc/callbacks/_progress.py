"""`ProgressBar`: steps, epoch, speed, ETA and metrics, as a callback.

On a terminal (and with tqdm installed) it draws a tqdm bar. Anywhere else
(a log file, CI) it prints one plain line every `log_every_n_steps` steps and
after each evaluation, never a carriage return, so logs stay readable.
Metrics are read from the device only on those display steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import torch

from .._callback import Callback
from .._contract import eval_metric_name
from .._strategy import global_rank
from .._validate import is_int

if TYPE_CHECKING:
    from .._contract import LoopState


class ProgressBar(Callback):
    """Show progress: steps (of `total`), epoch, steps/s, ETA and the chosen metrics.

    A step is displayed (its metrics read from the device) when `step` is a
    multiple of `log_every_n_steps`, right after an evaluation, at `total`,
    and at the end of the run if its last step was not shown yet. On a
    terminal the bar's counter moves every step; that reads nothing.

    Only rank 0 of a `torch.distributed` run draws anything (checked in
    `on_start`); the other ranks are silent.

    Args:
        log_every_n_steps: display every this many steps (Lightning's name).
        stream: where to write; default `sys.stderr` (looked up at `on_start`).
        metrics: names to show: train metrics by name, evaluation metrics as
            `"val_<name>"`; default all of them.
        total: the number of steps the run will reach, if known (enables the ETA).

    Raises:
        ValueError: `log_every_n_steps` < 1, `total` < 1; a `metrics` name the
            run does not produce (at its first display).
        TypeError: `metrics` given as a single string.

    Example:
        >>> import io, lightfunc as lf
        >>> bar = lf.callbacks.ProgressBar(log_every_n_steps=10, metrics=["loss"], stream=io.StringIO())
    """

    def __init__(
        self,
        *,
        log_every_n_steps: int = 50,
        stream: TextIO | None = None,
        metrics: Sequence[str] | None = None,
        total: int | None = None,
    ) -> None:
        if not _is_positive_int(log_every_n_steps):
            raise ValueError(
                f"`log_every_n_steps` must be an int >= 1, got {log_every_n_steps!r}. "
                f"Use 1 to display every step."
            )
        if total is not None and not _is_positive_int(total):
            raise ValueError(
                f"`total` must be an int >= 1 (the step the run will reach) or None, got {total!r}."
            )
        if isinstance(metrics, str):
            raise TypeError(
                f"`metrics` must be a sequence of names, got the string {metrics!r}; "
                f"write `metrics=[{metrics!r}]`."
            )
        self.log_every_n_steps = log_every_n_steps
        self.stream = stream
        self.metrics = None if metrics is None else list(metrics)
        self.total = total
        self._active = False
        self._out: TextIO = sys.stderr
        self._bar: Any = None  # a tqdm bar on a terminal, else None (plain lines)
        self._start_time = 0.0
        self._start_step = 0
        self._last_shown = -1
        self._checked_train = self._checked_eval = False

    def on_start(self, ls: LoopState) -> None:
        self._active = _is_rank_zero()
        if not self._active:
            return
        self._out = self.stream if self.stream is not None else sys.stderr
        self._start_time, self._start_step, self._last_shown = time.perf_counter(), ls.step, -1
        self._bar = None
        if _isatty(self._out):
            try:
                from tqdm import tqdm
            except ImportError:  # no tqdm: plain lines on the terminal too
                return
            self._bar = tqdm(
                total=self.total,
                initial=ls.step,  # a resumed run starts where it stopped
                file=self._out,
                unit="step",
                dynamic_ncols=True,
                leave=True,
            )

    def on_step_end(self, ls: LoopState) -> None:
        if not self._active:
            return
        self._check_names(ls)
        if self._bar is not None:
            self._bar.update(ls.step - self._bar.n)
        if ls.step % self.log_every_n_steps == 0 or ls.evaluated or ls.step == self.total:
            self._show(ls)

    def on_end(self, ls: LoopState) -> None:
        if not self._active:
            return
        if ls.step != self._last_shown and ls.step > self._start_step:
            self._show(ls)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._active = False

    def _show(self, ls: LoopState) -> None:
        """Read the chosen metrics from the device and display them (the only sync)."""
        self._last_shown = ls.step
        text = " ".join(f"{name}={value:.4g}" for name, value in self._selected(ls))
        if self._bar is not None:
            self._bar.set_description(f"epoch {ls.epoch}", refresh=False)
            self._bar.set_postfix_str(text, refresh=True)
            return
        elapsed = time.perf_counter() - self._start_time
        done = ls.step - self._start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"epoch {ls.epoch}", f"step {ls.step}" + (f"/{self.total}" if self.total else "")]
        parts.append(f"{rate:.2f} step/s")
        if self.total and rate > 0 and ls.step < self.total:
            parts.append(f"eta {_format_seconds((self.total - ls.step) / rate)}")
        if text:
            parts.append(text)
        print(" ".join(parts), file=self._out, flush=True)

    def _selected(self, ls: LoopState) -> list[tuple[str, float]]:
        """(display name, value) of the metrics to show, in the run's order."""
        available = _available(ls)
        names = list(available) if self.metrics is None else self.metrics
        return [(name, _scalar(available[name])) for name in names if name in available]

    def _check_names(self, ls: LoopState) -> None:
        """Raise if a chosen name is not produced by the run (names only: no device read)."""
        if self.metrics is None or (self._checked_train and self._checked_eval):
            return
        if not self._checked_train:
            _check_present([n for n in self.metrics if not n.startswith("val_")], ls, "train")
            self._checked_train = True
        if ls.eval_metrics is not None and not self._checked_eval:
            _check_present([n for n in self.metrics if n.startswith("val_")], ls, "evaluation")
            self._checked_eval = True


def _available(ls: LoopState) -> dict[str, Any]:
    """Train metrics by name and evaluation metrics as `val_<name>`, in the run's order."""
    available: dict[str, Any] = dict(ls.metrics)
    if ls.eval_metrics is not None:
        available.update({eval_metric_name(n): value for n, value in ls.eval_metrics.items()})
    return available


def _check_present(names: list[str], ls: LoopState, kind: str) -> None:
    available = _available(ls)
    missing = [n for n in names if n not in available]
    if missing:
        have = [n for n in available if n.startswith("val_") == (kind == "evaluation")]
        raise ValueError(
            f"ProgressBar: `metrics` names {missing} are not among the {kind} metrics "
            f"({', '.join(have) or 'none'}). Use 'val_<name>' for evaluation metrics."
        )


def _is_rank_zero() -> bool:
    """True outside `torch.distributed`, or on its rank 0: the rank that prints and writes."""
    return global_rank() == 0


def _is_positive_int(value: Any) -> bool:
    return is_int(value) and value >= 1


def _format_seconds(seconds: float) -> str:
    """`M:SS`, or `H:MM:SS` from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _scalar(x: Any) -> float:
    return float(x.detach().float().cpu()) if isinstance(x, torch.Tensor) else float(x)


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
