"""`ThroughputMonitor`: samples/s, tokens/s, model FLOP/s and MFU, without syncs.

    monitor = lf.callbacks.ThroughputMonitor(batch=first_batch, step=train_step, peak_flops=1e12)
    lf.fit(train_step, state, data, callbacks=[monitor])  # the bar shows samples/s and MFU

Rates are measured on the host clock over each logging window (the steps
between two logging steps), compile time left out as the progress bar
leaves it out (`torch.compile`'s own compile events), and the run's first
step (its compile, the first-call checks) left out entirely. No device is
synchronised for it: on a GPU the host runs ahead of the device by at most
its launch queue, so over a window of tens of steps the host's time is the
device's; the window's metrics are read at the logging steps, as the
loggers read the loss. FLOPs are counted once, at the start, by running the
step eagerly on the initial state and the example batch under
`torch.utils.flop_counter.FlopCounterMode` (the step is pure: the state is
unchanged, and torch's random generators are restored after it): one
eager step more than the run makes, plus the counter's per-operation cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .._build import Step
from .._callback import Callback
from .._compile import CompileWatch
from .._device import to_device
from .._metrics import batch_size as count_rows
from .._tree import tree_leaves
from .._validate import check_float, check_positive_int, is_int

if TYPE_CHECKING:
    from .._contract import LoopState


class ThroughputMonitor(Callback):
    """Add throughput metrics every `log_every_n_steps` steps; summarise them at the end.

    Every `log_every_n_steps` steps it adds, over the steps since the last
    time (compile time excluded), as 0-d CPU tensors (no device read):

    - `throughput/samples_per_sec`: examples per second (the example
      batch's leading dimension, `batch_size`, per step);
    - `throughput/tokens_per_sec`: with `tokens_per_sample`;
    - `throughput/flops_per_sec`: model FLOPs per second (with `step` or
      `flops_per_step`);
    - `throughput/mfu`: FLOP/s over `peak_flops` (model FLOPs utilisation,
      a fraction), when a peak is given or measured.

    The progress bar shows them as a short field (`1.2k samples/s 41.3% MFU`),
    loggers write them like any metric, and the end-of-run summary
    (`RunSummary`, `lf.fit`) prints their averages over the whole run
    (`summary()`). Per process: under a data-parallel strategy each rank
    reports its own share.

    Args:
        batch: an example batch, as the loop gives it to the step: its
            leading dimension is the number of examples per step, and it is
            what FLOPs are counted on. Every step is assumed this size (a
            smaller last batch is counted as a full one).
        batch_size: examples per step, instead of reading them off `batch`.
        tokens_per_sample: tokens in one example (a sequence length), or a
            function of a batch returning the tokens in it (e.g.
            `lambda b: int(b["mask"].sum())`, called once, on `batch`).
        step: the train step function to count FLOPs with, once, on the
            initial state and `batch` (`count_step_flops`: a built
            `lightfunc.Step` runs eagerly under its precision and strategy,
            a plain function as it is): forward, backward and update, as
            `FlopCounterMode` counts them (matrix products and
            convolutions; element-wise operations count zero).
        flops_per_step: the model FLOPs of one step, if you know them (instead of `step`).
        peak_flops: the device's peak FLOP/s for MFU: a number (from its
            datasheet, for the dtype the step computes in), or "measure" for
            `measure_peak_flops` on the run's device (a matmul benchmark:
            what a plain matmul reaches, which is below the datasheet, so
            MFU against it reads higher). None: no MFU.
        log_every_n_steps: add the metrics every this many steps (give the
            loggers and the progress bar the same).
        clock: the clock to read (seconds, a float); default `time.perf_counter`.

    Raises:
        ValueError: neither `batch` nor `batch_size` given; `tokens_per_sample`
            a function without `batch`; `step` without `batch`; both `step` and
            `flops_per_step`; a number out of range; `peak_flops` a string other
            than "measure".
        TypeError: `step` or `clock` not callable, `tokens_per_sample` neither
            an int nor callable, or a count that is not an int.
        RuntimeError: at the start, when running `step` to count its FLOPs raised.

    Example:
        >>> import torch, lightfunc as lf
        >>> batch = (torch.randn(32, 8), torch.zeros(32, dtype=torch.long))
        >>> monitor = lf.callbacks.ThroughputMonitor(batch=batch, flops_per_step=1e6, peak_flops=1e9)
        >>> monitor.samples_per_step
        32
    """

    def __init__(
        self,
        *,
        batch: Any = None,
        batch_size: int | None = None,
        tokens_per_sample: int | Callable[[Any], int] | None = None,
        step: Callable[..., Any] | None = None,
        flops_per_step: float | None = None,
        peak_flops: float | str | None = None,
        log_every_n_steps: int = 50,
        clock: Callable[[], float] | None = None,
    ) -> None:
        check_positive_int("log_every_n_steps", log_every_n_steps, optional=False)
        check_positive_int("batch_size", batch_size)
        if batch is None and batch_size is None:
            raise ValueError(
                "ThroughputMonitor needs the number of examples per step: pass `batch=` (an "
                "example batch, e.g. `next(iter(loader))`) or `batch_size=`."
            )
        if step is not None and not callable(step):
            raise TypeError(f"`step` must be the train step function, got {type(step).__name__}.")
        if step is not None and batch is None:
            raise ValueError(
                "`step=` counts FLOPs by running the step once on an example batch: pass `batch=` too."
            )
        if step is not None and flops_per_step is not None:
            raise ValueError(
                "give `step=` (FLOPs counted) or `flops_per_step=` (FLOPs known), not both."
            )
        if flops_per_step is not None:
            flops_per_step = check_float("flops_per_step", flops_per_step, low=0.0, low_open=True)
        if clock is not None and not callable(clock):
            raise TypeError(f"`clock` must be a function returning seconds, got {clock!r}.")
        self.samples_per_step = batch_size if batch_size is not None else count_rows(batch)
        self.tokens_per_step = _tokens(tokens_per_sample, batch, self.samples_per_step)
        self.peak_flops = _peak(peak_flops)
        self.flops_per_step = flops_per_step
        self.log_every_n_steps = log_every_n_steps
        self._batch, self._step = batch, step
        self._clock_fn = clock if clock is not None else time.perf_counter
        self._watch: CompileWatch | None = None
        self._first: tuple[float, int] | None = None  # (clock, step) after the run's first step
        self._mark: tuple[float, int] | None = None  # (clock, step) at the last logging step
        self._last: tuple[float, int] | None = None  # (clock, step) at the end
        self._seen = 0  # the last step seen

    # The callback hooks ----------------------------------------------------------------------

    def on_start(self, ls: LoopState) -> None:
        self._close_watch()
        self._watch = CompileWatch()
        self._first = self._mark = self._last = None
        if self._step is not None and self.flops_per_step is None:
            self.flops_per_step = count_step_flops(self._step, ls.state, self._batch)
        if self.peak_flops == "measure":
            self.peak_flops = measure_peak_flops(_device_of(ls.state))

    def extra_metrics(self, ls: LoopState) -> dict[str, Any]:
        self._seen = ls.step
        if self._first is None:  # the run's first step: compiles and checks, not timed
            self._first = self._mark = (self._clock(), ls.step)
            return {}
        if ls.step % self.log_every_n_steps:
            return {}
        now = self._clock()
        t0, s0 = self._mark  # type: ignore[misc]
        self._mark = (now, ls.step)
        rates = self._rates(ls.step - s0, now - t0)
        return {f"throughput/{name}": torch.tensor(value) for name, value in rates.items()}

    def on_end(self, ls: LoopState) -> None:
        if self._first is not None:
            self._last = (self._clock(), ls.step)
        self._close_watch()

    def summary(self) -> dict[str, float]:
        """The rates over the run so far (its first step left out), by name; {} before a rate."""
        if self._first is None:
            return {}
        t0, s0 = self._first
        t1, s1 = self._last if self._last is not None else (self._clock(), self._seen)
        rates = self._rates(s1 - s0, t1 - t0)
        if self.flops_per_step is not None:
            rates["flops_per_step"] = float(self.flops_per_step)
        return rates

    # Rates -----------------------------------------------------------------------------------

    def _clock(self) -> float:
        """The clock, minus the compile time seen so far."""
        compiling = self._watch.seconds if self._watch is not None else 0.0
        return self._clock_fn() - compiling

    def _rates(self, steps: int, seconds: float) -> dict[str, float]:
        if steps <= 0 or seconds <= 0:
            return {}
        per_step = seconds / steps
        rates = {"samples_per_sec": self.samples_per_step / per_step}
        if self.tokens_per_step is not None:
            rates["tokens_per_sec"] = self.tokens_per_step / per_step
        if self.flops_per_step is not None:
            rates["flops_per_sec"] = self.flops_per_step / per_step
            if isinstance(self.peak_flops, float):
                rates["mfu"] = rates["flops_per_sec"] / self.peak_flops
        return rates

    def _close_watch(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None


def count_step_flops(step: Callable[..., Any], state: Any, batch: Any) -> int:
    """The FLOPs `FlopCounterMode` counts in one eager call of `step(state, batch)`.

    `step` may be a built `lightfunc.Step` (run eagerly, under its
    transforms but not compiled: its precision's casts, its strategy) or a
    plain function (run as it is: give the built step when the state is
    stored for a precision such as "bf16-true"). The batch is moved to the
    state's device; torch's random generators are restored afterwards, so
    the run draws what it would have drawn. Costs one eager step.

    Raises:
        RuntimeError: the step raised; the message says what to pass instead.
    """
    from torch.utils.flop_counter import FlopCounterMode

    fn = step._eager if isinstance(step, Step) else step
    device = _device_of(state)
    batch = to_device(batch, device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    counter = FlopCounterMode(display=False)
    try:
        with torch.random.fork_rng(devices=cuda), counter:
            fn(state, batch)
    except Exception as error:
        name = getattr(step, "__name__", type(step).__name__)
        raise RuntimeError(
            f"ThroughputMonitor could not count FLOPs: `{name}(state, batch)`, run eagerly on "
            f"the initial state and the example `batch`, raised {type(error).__name__}: {error}. "
            f"Pass the built step (`lf.build(train_step, precision=...)`) when the run has a "
            f"precision or strategy, or give `flops_per_step=` instead of `step=`."
        ) from error
    return int(counter.get_total_flops())


def measure_peak_flops(
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    repeats: int = 5,
) -> float:
    """The FLOP/s a square matmul reaches on `device`: the best of `repeats` timed runs.

    A measured stand-in for the datasheet peak (MFU's denominator): `2 * size**3`
    FLOPs per `size x size` product, after one warm-up, synchronising the
    device around each timed run. `size` defaults to 1024 on the CPU and
    8192 on a GPU. Below the datasheet peak, so MFU against it reads higher.
    """
    device = torch.device(device if device is not None else "cpu")
    n = size if size is not None else (1024 if device.type == "cpu" else 8192)
    check_positive_int("size", n, optional=False)
    check_positive_int("repeats", repeats, optional=False)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _device_of(state: Any) -> torch.device:
    for leaf in tree_leaves(state):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def _tokens(tokens: Any, batch: Any, samples: int) -> int | None:
    """Tokens per step from `tokens_per_sample` (an int, or a function of the batch)."""
    if tokens is None:
        return None
    if is_int(tokens):
        check_positive_int("tokens_per_sample", tokens, optional=False)
        return int(tokens) * samples
    if not callable(tokens):
        raise TypeError(
            f"`tokens_per_sample` must be an int (tokens in one example) or a function of a "
            f"batch returning its token count, got {type(tokens).__name__} {tokens!r}."
        )
    if batch is None:
        raise ValueError(
            "`tokens_per_sample` as a function counts the tokens of `batch=`: pass it."
        )
    counted = tokens(batch)
    if not is_int(counted) or counted < 1:
        raise TypeError(
            f"`tokens_per_sample` returned {counted!r} for the example batch; it must return "
            f"the number of tokens in the batch, an int >= 1 (e.g. `int(mask.sum())`)."
        )
    return int(counted)


def _peak(peak: Any) -> float | str | None:
    if peak is None or peak == "measure":
        return peak
    if isinstance(peak, str):
        raise ValueError(
            f"`peak_flops` must be a number of FLOP/s, 'measure' or None, got {peak!r}."
        )
    return check_float(
        "peak_flops", peak, low=0.0, low_open=True, hint="E.g. 989e12 for an H100's bf16."
    )
