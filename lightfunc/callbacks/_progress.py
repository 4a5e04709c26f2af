"""`ProgressBar`: steps, epoch, speed, ETA and metrics, as a callback.

On a terminal (and with tqdm installed) it draws one tqdm bar that fits the
terminal's width, from 80 columns up. Anywhere else (a log file, CI) it
prints one plain line every `log_every_n_steps` steps and one after each
evaluation, never a carriage return, so logs stay readable. Metrics are
read from the device only on those display steps.

While `torch.compile` compiles a step it says so ("compiling train_step ...
14.2 s", "(warm cache)" when inductor's cache served it), and compile time
is kept out of the speed and the ETA.

tqdm, not rich: tqdm is one small pure-Python package with no dependencies
(rich brings markdown-it and pygments), it is what Lightning's default bar
uses, and it handles terminal width, refresh throttling and notebooks; the
layout of the line is ours (`_fit_metrics`).
"""

from __future__ import annotations

import collections
import shutil
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import torch

from .._callback import Callback, InterruptReason
from .._compile import CompileEvent, CompileWatch
from .._contract import eval_metric_name
from .._strategy import global_rank
from .._validate import is_int

if TYPE_CHECKING:
    from .._contract import LoopState

# The bar's own part: "epoch 12 ▕" + bar + "▏ 6600/6600 1:05<0:00 98.1step/s".
_BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} {bar} {elapsed}<{eta} {speed}{metrics}"
_MIN_BAR = 10  # columns kept for the bar itself before metrics are dropped
_RATE_WINDOW = 50  # steps the speed (and ETA) is measured over


class ProgressBar(Callback):
    """Show progress: steps (of `total`), epoch, steps/s, ETA and the chosen metrics.

    A step is displayed (its metrics read from the device) when `step` is a
    multiple of `log_every_n_steps`, right after an evaluation, at `total`,
    and at the end of the run if its last step was not shown yet. On a
    terminal the bar's counter and epoch move every step; that reads nothing.

    Which metrics show, in order: `loss`, then `monitor`, then the other
    evaluation metrics, then the other train metrics (or exactly `metrics`,
    if given); a `ThroughputMonitor`'s rates show as a short field after the
    speed (`1.2k samples/s 41.3% MFU`) and a `HealthMonitor`'s statistics
    only in the logs, unless named in `metrics`. On a terminal the line keeps as many as fit its width, in that
    order; an evaluation metric shown after the step it was computed at
    carries where it came from: `val_acc=0.975 (e2)` (end of epoch 2) or
    `(s500)` (step 500). Plain lines show evaluation metrics only on the
    line of the evaluation, so no value is repeated as if it were new.

    Only rank 0 of a `torch.distributed` run draws anything (checked in
    `on_start`); the other ranks are silent.

    Args:
        log_every_n_steps: display every this many steps (Lightning's name).
        stream: where to write; default `sys.stderr` (looked up at `on_start`).
        metrics: names to show: train metrics by name, evaluation metrics as
            `"val_<name>"`; default all of them, in the order above.
        total: the number of steps the run will reach, if known (enables the ETA).
        monitor: the metric the run is judged by (`fit` passes its
            `EarlyStopping`'s), shown right after `loss`.
        ncols: the terminal width to fit; default the terminal's own.

    Raises:
        ValueError: `log_every_n_steps` < 1, `total` < 1, `ncols` < 40; a
            `metrics` name the run does not produce (at its first display).
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
        monitor: str | None = None,
        ncols: int | None = None,
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
        if ncols is not None and not (is_int(ncols) and ncols >= 40):
            raise ValueError(
                f"`ncols` must be an int >= 40 (terminal columns) or None for the terminal's "
                f"width, got {ncols!r}."
            )
        self.log_every_n_steps = log_every_n_steps
        self.stream = stream
        self.metrics = None if metrics is None else list(metrics)
        self.total = total
        self.monitor = monitor
        self.ncols = ncols
        self._active = False
        self._out: TextIO = sys.stderr
        self._tty = False
        self._bar: Any = None  # a tqdm bar on a terminal, made after the first step; else None
        self._watch: CompileWatch | None = None
        self._compile_seconds = 0.0  # the last run's, once its watch is closed
        self._start_time = 0.0
        self._start_step = 0
        self._last_shown = -1
        self._epoch_shown = -1
        self._eval_label = ""  # where the last evaluation ran: "e2" or "s500"
        # (seconds since the start without compiles, step) of the last steps, for the speed
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        # What the last display read: (name, formatted value, is an evaluation metric)
        self._shown: list[tuple[str, str, bool]] = []
        self._shown_fresh = False
        self._throughput = ""  # the short throughput field: " 1.2k samples/s 41.3% MFU"
        self._checked_train = self._checked_eval = False

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling during this run, as seen by the bar."""
        return self._compile_seconds if self._watch is None else self._watch.seconds

    def on_start(self, ls: LoopState) -> None:
        self.close()  # a bar or a watch left open by an earlier run that raised
        self._active = _is_rank_zero()
        if not self._active:
            return
        self._out = self.stream if self.stream is not None else sys.stderr
        self._start_time, self._start_step, self._last_shown = time.perf_counter(), ls.step, -1
        self._epoch_shown = -1
        self._compile_seconds = 0.0
        self._tty = _isatty(self._out) and _has_tqdm()
        self._watch = CompileWatch(on_start=self._compile_started, on_end=self._compile_ended)
        self._samples = collections.deque([(0.0, ls.step)], maxlen=_RATE_WINDOW)
        self._shown = []
        self._throughput = ""

    def on_step_end(self, ls: LoopState) -> None:
        if not self._active:
            return
        self._check_names(ls)
        self._samples.append((self._clock(), ls.step))
        if ls.evaluated:
            self._eval_label = f"e{ls.epoch}" if ls.epoch_end else f"s{ls.step}"
        if self._tty:
            if self._bar is None:
                self._bar = self._make_bar(ls)
            if ls.epoch != self._epoch_shown:
                self._epoch_shown = ls.epoch
                self._bar.set_description_str(f"epoch {ls.epoch}", refresh=False)
            if self._shown and self._shown_fresh and not ls.evaluated:
                self._shown_fresh = False  # the evaluation shown is now an older one: say so
                self._bar.metrics = self._fit(ls)
            self._bar.update(ls.step - self._bar.n)
        if ls.step % self.log_every_n_steps == 0 or ls.evaluated or ls.step == self.total:
            self._show(ls)

    def on_end(self, ls: LoopState) -> None:
        if not self._active:
            return
        if ls.step != self._last_shown and ls.step > self._start_step:
            self._show(ls)
        self.close()

    def on_interrupt(self, ls: LoopState, reason: InterruptReason) -> None:
        if reason == "exception":  # no `on_end` follows: stop drawing and watching now
            self.close()

    @property
    def handles_interrupts(self) -> bool:
        return False  # closing on an exception must not make the loop catch signals

    def close(self) -> None:
        """Close the bar and stop watching compiles (idempotent; `on_end` does it, and `fit`
        when the run raises before any callback could)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._watch is not None:
            self._watch.close()
            self._compile_seconds = self._watch.seconds
            self._watch = None
        self._active = False

    # Compiles --------------------------------------------------------------------------------

    def _compile_started(self, name: str) -> None:
        if self._bar is not None:
            self._bar.clear()
        # dynamic=False: a step called with new shapes (a smaller last batch) compiles again.
        seen = self._watch is not None and any(e.name == name for e in self._watch.events)
        self._out.write(
            f"recompiling {name} for new inputs ... " if seen else f"compiling {name} ... "
        )
        self._out.flush()

    def _compile_ended(self, event: CompileEvent) -> None:
        cache = " (warm cache)" if event.cached else ""
        self._out.write(f"{event.seconds:.1f} s{cache}\n")
        self._out.flush()
        if self._bar is not None:
            self._bar.refresh()

    # Speed -----------------------------------------------------------------------------------

    def _clock(self) -> float:
        """Seconds since the start, compile time left out."""
        return time.perf_counter() - self._start_time - self.compile_seconds

    def _rate(self) -> float:
        """Steps per second over the last `_RATE_WINDOW` steps, compiles left out (0.0: unknown)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    # Display ---------------------------------------------------------------------------------

    def _make_bar(self, ls: LoopState) -> Any:
        from tqdm import tqdm

        progress = self

        class Bar(tqdm):
            """tqdm with our fields: speed and ETA without compile time, and the metrics."""

            metrics = ""

            @property
            def format_dict(self) -> dict[str, Any]:
                rate = progress._rate()
                left = None if not (self.total and rate) else (self.total - self.n) / rate
                return {
                    **super().format_dict,
                    "metrics": self.metrics,
                    "speed": (f"{rate:.2f}step/s" if rate else "?step/s") + progress._throughput,
                    "eta": "?" if left is None else _format_seconds(left),
                }

        self._epoch_shown = ls.epoch
        bar = Bar(
            total=self.total,
            initial=ls.step,  # a resumed run starts where it stopped
            file=self._out,
            unit="step",
            desc=f"epoch {ls.epoch}",
            bar_format=_BAR_FORMAT,
            ncols=self._width(),
            leave=True,
        )
        bar.start_t -= time.perf_counter() - self._start_time  # elapsed: since the run started
        return bar

    def _width(self) -> int:
        return self.ncols if self.ncols is not None else shutil.get_terminal_size((80, 24)).columns

    def _show(self, ls: LoopState) -> None:
        """Read the chosen metrics from the device and display them (the only sync)."""
        self._last_shown = ls.step
        self._shown = self._read(ls)
        self._shown_fresh = ls.evaluated
        if self._bar is not None:
            if ls.evaluated:  # a line that stays above the bar: the run's evaluations, in order
                evals = " ".join(f"{n}={v}" for n, v, is_eval in self._shown if is_eval)
                self._bar.write(f"epoch {ls.epoch} step {ls.step}: {evals}", file=self._out)
            self._bar.metrics = self._fit(ls)
            self._bar.refresh()
            return
        rate = self._rate()
        parts = [f"epoch {ls.epoch}", f"step {ls.step}" + (f"/{self.total}" if self.total else "")]
        parts.append(f"{rate:.2f} step/s{self._throughput}")
        if self.total and rate > 0 and ls.step < self.total:
            parts.append(f"eta {_format_seconds((self.total - ls.step) / rate)}")
        # Plain lines show an evaluation's values on its own line only, never repeated.
        parts += [f"{n}={v}" for n, v, is_eval in self._shown if ls.evaluated or not is_eval]
        print(" ".join(parts), file=self._out, flush=True)

    def _fit(self, ls: LoopState) -> str:
        """The shown metrics that fit beside the bar, an older evaluation's marked as such."""
        width = self._width()
        self._bar.ncols = width
        room = width - len(_bare_line(self._bar)) - _MIN_BAR
        stale = not ls.evaluated
        labels = [
            f"{n}={v} ({self._eval_label})" if is_eval and stale else f"{n}={v}"
            for n, v, is_eval in self._shown
        ]
        return _fit_metrics(labels, room)

    def _read(self, ls: LoopState) -> list[tuple[str, str, bool]]:
        """(name, formatted value, is an evaluation metric) of the metrics to show, in order."""
        available = _available(ls)
        self._throughput = _throughput_field(available) or self._throughput
        names = self.metrics if self.metrics is not None else _ordered(available, self.monitor)
        if self.metrics is None:  # throughput shows in the short field, health only in the logs
            names = [n for n in names if not n.startswith(("throughput/", "health/"))]
        return [
            (name, _format_value(_scalar(available[name])), _is_eval(name, ls))
            for name in names
            if name in available
        ]

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


def _ordered(available: dict[str, Any], monitor: str | None) -> list[str]:
    """`loss`, `monitor`, the other evaluation metrics, the other train metrics."""
    first = [n for n in ("loss", monitor) if n is not None and n in available]
    evals = [n for n in available if n.startswith("val_") and n not in first]
    rest = [n for n in available if n not in first and n not in evals]
    return list(dict.fromkeys(first + evals + rest))


def _fit_metrics(labels: list[str], room: int) -> str:
    """As many `name=value` labels as fit in `room` columns, in order, each after a space."""
    text = ""
    for label in labels:
        if len(text) + 1 + len(label) > room:
            break
        text += " " + label
    return text


def _bare_line(bar: Any) -> str:
    """The bar's line without its bar and metrics: what the metrics share the width with."""
    meter = dict(bar.format_dict)
    meter.update(ncols=None, metrics="", bar_format=_BAR_FORMAT.replace(" {bar}", ""))
    line: str = bar.format_meter(**meter)
    return line


def _is_eval(name: str, ls: LoopState) -> bool:
    return name.startswith("val_") and (ls.eval_metrics is not None) and name not in ls.metrics


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


def _throughput_field(available: dict[str, Any]) -> str:
    """`ThroughputMonitor`'s samples/s, tokens/s and MFU, short: " 1.2k samples/s 41.3% MFU"."""
    field = ""
    for name, unit in (("samples_per_sec", "samples/s"), ("tokens_per_sec", "tok/s")):
        if f"throughput/{name}" in available:
            field += f" {_si(_scalar(available[f'throughput/{name}']))} {unit}"
    if "throughput/mfu" in available:
        field += f" {100 * _scalar(available['throughput/mfu']):.3g}% MFU"
    return field


def _si(value: float) -> str:
    """`value` with a k / M / G suffix, 3 significant digits: 1234 -> "1.23k"."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _format_value(value: float) -> str:
    return f"{value:.4g}"


def _scalar(x: Any) -> float:
    return float(x.detach().float().cpu()) if isinstance(x, torch.Tensor) else float(x)


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:  # no tqdm: plain lines on the terminal too
        return False
    return True


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
