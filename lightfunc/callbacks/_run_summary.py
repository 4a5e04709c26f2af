"""The end-of-run summary: why the run stopped, its best and final metrics, its time, its files.

    Run stopped at step 396 (epoch 17): early stopping: val_acc did not improve for 10 checks ...
      best        val_acc=0.9806 at step 154 (epoch 6)
      train       loss=0.01234 acc=1 grad_norm=0.0531 (step 396)
      validation  val_loss=0.08012 val_acc=0.975 (step 396)
      time        41.2 s: compile 14.2 s, train 24.1 s, eval 1.2 s, checkpoints 1.7 s
      logs        runs/digits/version_3/logs
      checkpoints runs/digits/version_3/checkpoints
      tensorboard tensorboard --logdir runs/digits

`lightfunc.fit` prints it at the end of every run (also after Ctrl-C or an
exception, before it propagates). `RunSummary` is the callback that
collects it; `summarize_run(last_state)` gives what a `loop` user can know
from the last `LoopState` alone (no timings, best value from an
`EarlyStopping`'s state).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import torch

from .._callback import Callback, InterruptReason
from .._compile import CompileWatch
from .._contract import eval_metric_name
from .._strategy import global_rank
from ._early_stopping import EarlyStopping
from ._throughput import ThroughputMonitor

if TYPE_CHECKING:
    from .._contract import LoopState

#: How a run was cut short from outside: a signal (the loop stopped cleanly after
#: the step), Ctrl-C raised as `KeyboardInterrupt`, or an exception from the step.
Interruption = Literal["signal", "keyboard", "exception"]


@dataclasses.dataclass(frozen=True)
class RunReport:
    """What `summarize_run` and `RunSummary` report; `str(report)` is the printed summary.

    Attributes:
        stopped: why the run stopped, one line.
        step, epoch: where it stopped.
        best: (metric, value, step, epoch) of the best monitored value; step and
            epoch are None when only the value is known (from an `EarlyStopping`).
        train: the last train metrics, as floats.
        validation: the last evaluation's metrics (`val_<name>`), as floats.
        eval_at_step: the step of that evaluation, or -1.
        times: seconds by phase ("compile", "train", "eval", "checkpoints")
            and their sum "total"; empty when the run was not timed.
        paths: (label, path) of the run's files: logs, checkpoints, the best checkpoint.
        tensorboard: the command that shows the logs, or None.
        throughput: a `ThroughputMonitor`'s rates over the run (`summary()`), or empty.
    """

    stopped: str
    step: int
    epoch: int
    best: tuple[str, float, int | None, int | None] | None = None
    train: dict[str, float] = dataclasses.field(default_factory=dict)
    validation: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_at_step: int = -1
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    paths: tuple[tuple[str, str], ...] = ()
    tensorboard: str | None = None
    throughput: dict[str, float] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"Run stopped at step {self.step} (epoch {self.epoch}): {self.stopped}"]
        if self.best is not None:
            name, value, step, epoch = self.best
            where = "" if step is None else f" at step {step} (epoch {epoch})"
            lines.append(_row("best", f"{name}={_num(value)}{where}"))
        if self.train:
            lines.append(_row("train", f"{_pairs(self.train)} (step {self.step})"))
        if self.validation:
            lines.append(
                _row("validation", f"{_pairs(self.validation)} (step {self.eval_at_step})")
            )
        if self.times:
            split = ", ".join(
                f"{k} {self.times[k]:.1f} s" for k in _PHASES if self.times.get(k, 0.0) >= 0.05
            )
            total = f"{self.times['total']:.1f} s"
            lines.append(_row("time", f"{total}: {split}" if split else total))
        if self.throughput:
            lines.append(_row("throughput", _throughput_text(self.throughput)))
        lines += [_row(label, path) for label, path in self.paths]
        if self.tensorboard:
            lines.append(_row("tensorboard", self.tensorboard))
        return "\n".join(lines)


_PHASES = ("compile", "train", "eval", "checkpoints")


def summarize_run(
    ls: LoopState,
    *,
    max_steps: int | None = None,
    max_epochs: int | None = None,
    fast_dev_run: bool | int = False,
    callbacks: Sequence[Callback] = (),
    interrupted: Interruption | None = None,
    error: BaseException | None = None,
    best: tuple[str, float, int | None, int | None] | None = None,
    times: dict[str, float] | None = None,
    log_dir: str | Path | None = None,
    tensorboard_dir: str | Path | None = None,
) -> RunReport:
    """The summary of a run that ended at `ls` (the last `LoopState` a `loop` yielded).

    Everything but `ls` is optional context that makes it more precise: the
    limits the loop ran with (to say "max_epochs=30 reached"), its callbacks
    (an `EarlyStopping`'s reason, the checkpoint directories), and what only
    a `RunSummary` callback can measure (`best` with its step, `times`).
    Reads the last metrics from the device (a sync).

    Example:
        >>> for ls in lf.loop(step, state, data, max_epochs=3):  # doctest: +SKIP
        ...     pass
        >>> print(lf.callbacks.summarize_run(ls, max_epochs=3))  # doctest: +SKIP
        Run stopped at step 66 (epoch 2): max_epochs=3 reached
    """
    stopped = _why(ls, max_steps, max_epochs, fast_dev_run, callbacks, interrupted, error)
    if best is None:
        best = _best_from_early_stopping(ls, callbacks)
    paths: list[tuple[str, str]] = []
    if log_dir is not None:
        paths.append(("logs", str(log_dir)))
    for manager in _managers(callbacks):
        paths.append(("checkpoints", str(manager.directory)))
        kept = manager.best() if getattr(manager, "monitor", None) else None
        if kept is not None:
            paths.append(("best ckpt", str(kept)))
    evals = {eval_metric_name(n): _float(v) for n, v in (ls.eval_metrics or {}).items()}
    return RunReport(
        stopped=stopped,
        step=ls.step,
        epoch=ls.epoch,
        best=best,
        # Throughput has its own line; health statistics are for the logs.
        train={
            n: _float(v)
            for n, v in ls.metrics.items()
            if not n.startswith(("throughput/", "health/"))
        },
        validation=evals,
        eval_at_step=ls.eval_at_step,
        times=dict(times or {}),
        paths=tuple(paths),
        tensorboard=None if tensorboard_dir is None else f"tensorboard --logdir {tensorboard_dir}",
        throughput=next(
            (cb.summary() for cb in callbacks if isinstance(cb, ThroughputMonitor)), {}
        ),
    )


class RunSummary(Callback):
    """Print a `RunReport` when the run ends: why, best, last metrics, time split, files.

    It watches the run for what the last state cannot tell: the best value of
    `monitor` and its step, the signal that stopped the run, and the time
    spent compiling (`torch.compile`'s own compile events), evaluating (when
    the eval data is wrapped with `timed_eval_data`), and checkpointing (the
    callbacks wrapped by `timed_callbacks`); the rest of the wall time is
    "train" (steps, data, logging). `lightfunc.fit` sets all of that up.

    Only rank 0 prints.

    Args:
        monitor: the metric whose best value to report (`"val_acc"`); None: none.
        mode: "min" or "max" for `monitor`.
        max_steps, max_epochs, fast_dev_run: the loop's limits, to say which one stopped it.
        callbacks: the run's other callbacks (for an `EarlyStopping`'s reason
            and the checkpoint directories).
        log_dir: where the logs are, to print.
        tensorboard_dir: the folder to point `tensorboard --logdir` at (None: no line).
        stream: where to print; default `sys.stdout`.

    Attributes:
        report: the last `RunReport` (None before the run ends).
    """

    def __init__(
        self,
        *,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        max_steps: int | None = None,
        max_epochs: int | None = None,
        fast_dev_run: bool | int = False,
        callbacks: Sequence[Callback] = (),
        log_dir: str | Path | None = None,
        tensorboard_dir: str | Path | None = None,
        stream: TextIO | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        self.monitor, self.mode = monitor, mode
        self.limits = {"max_steps": max_steps, "max_epochs": max_epochs}
        self.fast_dev_run = fast_dev_run
        self.callbacks = list(callbacks)
        self.log_dir, self.tensorboard_dir = log_dir, tensorboard_dir
        self.stream = stream
        self.report: RunReport | None = None
        self._eval_spans: list[tuple[float, float]] = []  # shared with `timed_eval_data`
        self._reset()

    def _reset(self) -> None:
        self._start = time.perf_counter()
        self._watch: CompileWatch | None = None
        self._eval_spans.clear()
        self._timed: dict[str, float] = {}  # checkpointing time so far, by clock name
        self._clock_started: dict[str, float] = {}
        self._best: tuple[str, float, int | None, int | None] | None = None
        self._interrupted: Interruption | None = None
        self._last: LoopState | None = None
        self._done = False

    # Setting up what is timed ----------------------------------------------------------------

    def timed_eval_data(self, data: Iterable[Any]) -> Iterable[Any]:
        """`data`, iterated as before, each full pass timed as evaluation."""
        return _TimedIterable(data, self._eval_spans)

    def timed_callbacks(self, callbacks: Sequence[Callback]) -> list[Callback]:
        """`callbacks` with each checkpoint manager between two clocks that time its hooks."""
        out: list[Callback] = []
        for i, cb in enumerate(callbacks):
            if not hasattr(cb, "directory") or not hasattr(cb, "best"):
                out.append(cb)
                continue
            name = f"{i}:{cb.state_key}"
            out += [_Clock(self, name, start=True), cb, _Clock(self, name, start=False)]
        return out

    # The callback hooks ----------------------------------------------------------------------

    def on_start(self, ls: LoopState) -> None:
        if self._watch is not None:  # left open by an earlier run that raised
            self._watch.close()
        self._reset()
        self._watch = CompileWatch()
        self._last = ls

    def on_step_end(self, ls: LoopState) -> None:
        self._last = ls
        if self.monitor is None or not _fresh(self.monitor, ls):
            return
        value = ls.metric(self.monitor)
        if value is None:
            return
        number = _float(value)
        if self._best is None or _better(number, self._best[1], self.mode):
            self._best = (self.monitor, number, ls.step, ls.epoch)

    def on_interrupt(self, ls: LoopState, reason: InterruptReason) -> None:
        self._interrupted = "signal" if reason == "sigterm" else "exception"
        self._last = ls

    @property
    def handles_interrupts(self) -> bool:
        # It only records the interruption: it must not make the loop catch signals
        # (nor, on several processes, agree on stopping after every step).
        return False

    def on_end(self, ls: LoopState) -> None:
        self._last = ls
        self.finish(ls)

    def finish(
        self,
        ls: LoopState | None = None,
        *,
        interrupted: Interruption | None = None,
        error: BaseException | None = None,
    ) -> RunReport | None:
        """Build the report for the run that ended at `ls` (default: the last state seen) and
        print it on rank 0; once per run (a second call returns the same report). `fit` calls
        it with `interrupted="keyboard"` or the `error` when the loop raises."""
        if self._done:
            return self.report
        ls = ls if ls is not None else self._last
        if ls is None:  # the run never started
            return None
        self._done = True
        if self._watch is not None:
            self._watch.close()
        self.report = summarize_run(
            ls,
            **self.limits,
            fast_dev_run=self.fast_dev_run,
            callbacks=self.callbacks,
            interrupted=interrupted or self._interrupted,
            error=error,
            best=self._best,
            times=self._times(),
            log_dir=self.log_dir,
            tensorboard_dir=self.tensorboard_dir,
        )
        if global_rank() == 0:
            print(self.report, file=self.stream if self.stream is not None else sys.stdout)
        return self.report

    def _times(self) -> dict[str, float]:
        total = time.perf_counter() - self._start
        events = self._watch.events if self._watch is not None else []
        compile_s = sum(e.seconds for e in events)
        in_eval = sum(
            e.seconds for e in events if any(a <= e.started < b for a, b in self._eval_spans)
        )
        eval_s = sum(b - a for a, b in self._eval_spans) - in_eval
        ckpt_s = sum(self._timed.values())
        train_s = max(0.0, total - compile_s - eval_s - ckpt_s)
        return {
            "compile": compile_s,
            "train": train_s,
            "eval": eval_s,
            "checkpoints": ckpt_s,
            "total": total,
        }

    def _tick(self, name: str, start: bool) -> None:
        now = time.perf_counter()
        if start:
            self._clock_started[name] = now
        elif name in self._clock_started:
            self._timed[name] = self._timed.get(name, 0.0) + now - self._clock_started.pop(name)


class _Clock(Callback):
    """Marks the time before (`start`) or after a timed callback's hooks, for `RunSummary`."""

    def __init__(self, summary: RunSummary, name: str, *, start: bool) -> None:
        self.summary, self.name, self.start = summary, name, start

    def describe(self) -> str:
        return f"{self.name},{'start' if self.start else 'stop'}"

    def on_step_end(self, ls: LoopState) -> None:
        self.summary._tick(self.name, self.start)

    def on_interrupt(self, ls: LoopState, reason: InterruptReason) -> None:
        self.summary._tick(self.name, self.start)

    @property
    def handles_interrupts(self) -> bool:
        return False  # a clock alone does not make the loop catch signals

    def on_end(self, ls: LoopState) -> None:
        self.summary._tick(self.name, self.start)


class _TimedIterable:
    """An iterable that records (start, end) of every complete or abandoned pass over it."""

    def __init__(self, data: Iterable[Any], spans: list[tuple[float, float]]) -> None:
        self.data, self.spans = data, spans

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        start = time.perf_counter()
        try:
            yield from self.data
        finally:
            self.spans.append((start, time.perf_counter()))


def _why(
    ls: LoopState,
    max_steps: int | None,
    max_epochs: int | None,
    fast_dev_run: bool | int,
    callbacks: Sequence[Callback],
    interrupted: Interruption | None,
    error: BaseException | None,
) -> str:
    """One line: why the run that ended at `ls` stopped."""
    saved = " (the last completed step was checkpointed)" if _managers(callbacks) else ""
    if interrupted == "keyboard":
        return "interrupted by Ctrl-C (KeyboardInterrupt)"
    if error is not None or interrupted == "exception":
        what = f"{type(error).__name__}: {error}" if error is not None else "an exception"
        return f"the step raised {what}"
    if interrupted == "signal":
        return f"stopped by a signal (SIGTERM, SIGINT or SIGUSR1){saved}"
    for cb in callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopped_step == ls.step:
            return f"early stopping: {cb.reason}" if cb.reason else "early stopping"
    for key, state in ls.callbacks.items():
        if key.startswith("EarlyStopping[") and state.get("stopped_step") == ls.step:
            return f"early stopping ({key})"
    if fast_dev_run:
        return f"fast_dev_run={fast_dev_run!r} done"
    if max_steps is not None and ls.step >= max_steps:
        return f"max_steps={max_steps} reached"
    if max_epochs is not None and ls.epoch_end and ls.epoch + 1 >= max_epochs:
        return f"max_epochs={max_epochs} reached"
    if max_steps is None and max_epochs is None:
        return "the loop ended (give the summary its limits to say which one)"
    return "a callback asked to stop"


def _best_from_early_stopping(
    ls: LoopState, callbacks: Sequence[Callback]
) -> tuple[str, float, int | None, int | None] | None:
    for cb in callbacks:
        if isinstance(cb, EarlyStopping) and math.isfinite(cb.best):
            return (cb.monitor, float(cb.best), None, None)
    for key, state in ls.callbacks.items():
        if key.startswith("EarlyStopping[monitor=") and math.isfinite(state.get("best", math.inf)):
            return (key.split("=")[1].split(",")[0], float(state["best"]), None, None)
    return None


def _managers(callbacks: Sequence[Callback]) -> list[Any]:
    """The checkpoint managers among `callbacks` (anything with a `directory` and `best()`)."""
    return [cb for cb in callbacks if hasattr(cb, "directory") and hasattr(cb, "best")]


def _fresh(name: str, ls: LoopState) -> bool:
    """Whether `name` was just computed: an evaluation metric after an evaluation, else at an epoch end."""
    return ls.evaluated if name.startswith("val_") else ls.epoch_end


def _better(a: float, b: float, mode: str) -> bool:
    if math.isnan(b):
        return not math.isnan(a)
    return a < b if mode == "min" else a > b


def _float(x: Any) -> float:
    return float(x.detach().float().cpu()) if isinstance(x, torch.Tensor) else float(x)


def _num(x: float) -> str:
    return f"{x:.4g}"


def _pairs(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={_num(v)}" for k, v in metrics.items())


def _throughput_text(rates: dict[str, float]) -> str:
    """`ThroughputMonitor.summary()` in a line: "12.3k samples/s, 2.1G FLOP/step, MFU 41.2%"."""
    units = (
        ("samples_per_sec", "samples/s"),
        ("tokens_per_sec", "tokens/s"),
        ("flops_per_step", "FLOP/step"),
        ("flops_per_sec", "FLOP/s"),
    )
    parts = [f"{_si(rates[k])} {unit}" for k, unit in units if k in rates]
    if "mfu" in rates:
        parts.append(f"MFU {100 * rates['mfu']:.3g}%")
    return ", ".join(parts)


def _si(value: float) -> str:
    """`value` with a k / M / G / T suffix, 3 significant digits: 12345 -> "12.3k"."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _row(label: str, text: str) -> str:
    return f"  {label:<12}{text}"
