"""The batch-size finder (`lightfunc.tune.find_batch_size`): the largest batch whose step fits.

The search is Lightning's `scale_batch_size(mode="binsearch")`: double the
batch size from `init_val` until a step does not fit, then bisect between
the last size that fit and the first that did not, until they are adjacent.

What "fits" means, per device:

- CUDA: the step runs without `torch.OutOfMemoryError`, and, when a
  `max_memory` budget is given, `torch.cuda.max_memory_allocated` over the
  trial's steps (reset before them) stays within it: the peak bytes of live
  tensors on the device, the state included.
- CPU: nothing raises before the machine swaps, so a budget is required and
  the peak is measured. The process's peak resident size cannot be used: it
  is a high-water mark that only grows, and freed memory kept by malloc
  hides later growth. Instead one step runs under
  `torch.profiler.profile(profile_memory=True)`, which records every
  allocation and free of torch's CPU allocator (eager, autograd and
  inductor-compiled kernels alike) with its size and time; the largest
  running sum of those is the step's peak growth, and adding the bytes of
  the state's and batch's tensors (shared memory counted once) gives the peak
  bytes of live tensors during the step: the same quantity as CUDA's
  `max_memory_allocated`, measured the same way on both devices.

Each trial runs one warm-up step (it compiles a compiled step for the new
shape), the measured step(s), then `steps_per_trial` timed steps for the
throughput reported next to each size. Every step starts from the same input
state and its outputs are dropped, so the state is left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._build import Step, build
from ._device import to_device
from ._state import train_states
from ._tree import tree_leaves
from ._validate import check_int


@dataclasses.dataclass(frozen=True)
class BatchSizeTrial:
    """One batch size tried by `find_batch_size`.

    Attributes:
        batch_size: the size tried.
        fits: whether its step ran within the memory budget.
        peak_bytes: the measured peak bytes of live tensors during the step
            (state and batch included); None when the step ran out of memory.
        steps_per_s: the measured train steps per second, from the median
            time of `steps_per_trial` steps after the warm-up; None when it
            did not fit.
        error: the out-of-memory message, when the step raised one.
    """

    batch_size: int
    fits: bool
    peak_bytes: int | None
    steps_per_s: float | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class BatchSizeResult:
    """What `find_batch_size` found.

    Attributes:
        batch_size: the largest batch size that fit.
        trials: every size tried, in the order tried.
        max_memory: the budget in bytes, or None (CUDA: the device's memory).
        device: the device the steps ran on.
    """

    batch_size: int
    trials: tuple[BatchSizeTrial, ...]
    max_memory: int | None
    device: str

    @property
    def chosen(self) -> BatchSizeTrial:
        """The trial of the chosen batch size (its peak bytes and steps/s)."""
        return next(t for t in self.trials if t.batch_size == self.batch_size and t.fits)

    def table(self) -> str:
        """The trials as a Markdown table, in the order tried."""
        rows = ["| batch size | fits | peak MiB | steps/s | samples/s |", "|---|---|---|---|---|"]
        for t in self.trials:
            peak = "OOM" if t.peak_bytes is None else f"{t.peak_bytes / 2**20:.2f}"
            rate = "" if t.steps_per_s is None else f"{t.steps_per_s:.1f}"
            samples = "" if t.steps_per_s is None else f"{t.steps_per_s * t.batch_size:.0f}"
            rows.append(
                f"| {t.batch_size} | {'yes' if t.fits else 'no'} | {peak} | {rate} | {samples} |"
            )
        return "\n".join(rows)


def find_batch_size(
    step: Step[Any] | Callable[..., Any],
    state: Any,
    make_batch: Callable[[int], Any],
    *,
    max_memory: int | None = None,
    init_val: int = 2,
    max_batch_size: int | None = None,
    max_trials: int = 25,
    steps_per_trial: int = 3,
) -> BatchSizeResult:
    """The largest batch size whose train step fits `max_memory` (powers of two, then bisection).

    Args:
        step: a train step, built (`lightfunc.build`) or plain (then built here, compiled).
        state: the state to train (left untouched: every trial starts from it).
        make_batch: `make_batch(batch_size) -> batch`, a batch of that many
            examples (e.g. ``lambda n: (x[:n], y[:n])``); moved to the state's device.
        max_memory: the budget in bytes for the peak of live tensors during a
            step, state included (see `lightfunc._tune_batch`). Required on
            CPU; on CUDA it defaults to what the device holds (an
            out-of-memory error marks a size that does not fit).
        init_val: the first size tried, >= 1.
        max_batch_size: never try more than this (e.g. the dataset's size).
        max_trials: at most this many sizes are tried, >= 1.
        steps_per_trial: timed steps per size, after one warm-up step (steps/s
            comes from their median time), >= 1.

    Returns:
        A `BatchSizeResult`: the size, and each size tried with its peak
        memory and steps/s (`result.table()` prints them).

    Raises:
        TypeError, ValueError: bad arguments; no `max_memory` on CPU; a batch
            size of 1 that does not fit the budget.

    Example:
        >>> import torch, lightfunc as lf
        >>> model = torch.nn.Linear(64, 8)
        >>> def train_step(state, batch):
        ...     def loss_fn(params):
        ...         return lf.apply(model, params, {}, batch, train=True)[0].square().mean()
        ...     loss, grads = lf.value_and_grad(loss_fn)(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> state = lf.TrainState.create(model, lf.optim.sgd(0.1))
        >>> found = lf.tune.find_batch_size(lf.build(train_step, compile=False), state,
        ...     lambda n: torch.randn(n, 64), max_memory=2**20, steps_per_trial=1)
        >>> found.chosen.peak_bytes <= 2**20
        True
    """
    if not callable(make_batch):
        raise TypeError(
            f"`make_batch` must be a function batch_size -> batch, got {type(make_batch).__name__}. "
            f"E.g. `make_batch=lambda n: (x[:n], y[:n])`."
        )
    check_int("init_val", init_val, low=1)
    check_int("max_trials", max_trials, low=1)
    check_int("steps_per_trial", steps_per_trial, low=1)
    if max_batch_size is not None:
        check_int("max_batch_size", max_batch_size, low=1)
    if max_memory is not None:
        check_int("max_memory", max_memory, low=1, hint="It is a number of bytes, e.g. 2**30.")
    # Every trial steps from the caller's state, which must stay intact: never donate it.
    built = (step if isinstance(step, Step) else build(step)).undonated()
    prepared = built.prepare(state)
    device = _device_of(prepared)
    if max_memory is None and device.type != "cuda":
        raise ValueError(
            f"`max_memory` is required on {device.type}: a step there does not fail before the "
            f"machine runs out, so the finder needs a budget in bytes, e.g. `max_memory=8 * 2**30`."
        )

    def trial(n: int) -> BatchSizeTrial:
        with _room_for_shapes(built, max_trials):
            return _trial(built, prepared, make_batch, n, device, max_memory, steps_per_trial)

    trials: list[BatchSizeTrial] = []
    fit, fail = 0, None  # the largest size that fit, the smallest that did not
    size = init_val if max_batch_size is None else min(init_val, max_batch_size)
    while len(trials) < max_trials:
        trials.append(trial(size))
        if trials[-1].fits:
            fit = size
        else:
            fail = size
        if fail is None:  # still doubling
            if size == max_batch_size:
                break
            size = 2 * size if max_batch_size is None else min(2 * size, max_batch_size)
        elif fail - fit <= 1:
            break
        else:
            size = (fit + fail) // 2
    if fit == 0:
        smallest = min(trials, key=lambda t: t.batch_size)
        raise ValueError(
            f"`max_memory`: no batch size fits; batch size {smallest.batch_size} needs "
            f"{_describe_need(smallest)}, over the budget of {_budget(max_memory, device)}. "
            f"Raise `max_memory`, or make the model or its state smaller."
        )
    return BatchSizeResult(
        batch_size=fit, trials=tuple(trials), max_memory=max_memory, device=str(device)
    )


def _trial(
    step: Step[Any],
    state: Any,
    make_batch: Callable[[int], Any],
    n: int,
    device: torch.device,
    max_memory: int | None,
    steps: int,
) -> BatchSizeTrial:
    """Run the step at batch size `n`: warm up, measure the peak, time `steps` steps."""
    cuda = device.type == "cuda"
    rate: float | None
    try:
        batch = to_device(make_batch(n), device)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        out = step(state, batch)  # warm-up: compiles a compiled step for this shape
        del out
        if cuda:  # the peak since the reset: warm-up and timed steps, state included
            rate, peak = _time_steps(step, state, batch, steps, device)
        else:
            peak = resident_bytes((state, batch)) + cpu_peak_growth(lambda: step(state, batch))
            over = max_memory is not None and peak > max_memory
            rate = None if over else _time_steps(step, state, batch, steps, device)[0]
    except torch.OutOfMemoryError as error:
        _free(device)
        return BatchSizeTrial(n, False, None, None, f"{type(error).__name__}: {error}"[:500])
    fits = max_memory is None or peak <= max_memory
    return BatchSizeTrial(n, fits, int(peak), rate if fits else None)


def _time_steps(
    step: Step[Any], state: Any, batch: Any, steps: int, device: torch.device
) -> tuple[float, int]:
    """Steps per second (from the median of `steps` timed steps), and CUDA's peak (0 elsewhere).

    Each step starts from `state`; on CUDA each is synchronised, so its time
    is the device's. The median keeps one slow step (another process on
    the machine) from moving the figure.
    """
    cuda = device.type == "cuda"
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = step(state, batch)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        del out
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return 1.0 / statistics.median(times), peak


def resident_bytes(tree: Any) -> int:
    """Bytes of the tensors in `tree`, memory shared between them counted once.

    Tensors sharing a storage (tied weights, views) count once, as the
    largest of them; a view counts its own bytes, not its base's, so a batch
    sliced from a dataset in memory (`x[:n]`) counts as the `n` rows a
    device would receive, on CPU as on CUDA.
    """
    largest: dict[tuple[str, int], int] = {}
    for x in tree_leaves(tree):
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            key = (str(x.device), x.untyped_storage().data_ptr())
            largest[key] = max(largest.get(key, 0), x.numel() * x.element_size())
    return sum(largest.values())


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null while the profiler starts or stops (no user code).

    torch 2.13's CPU build prints two `USDT: ... profiler_start/stop` lines
    from C++ at every start and stop, so `find_batch_size`'s trials printed
    dozens of them under the README's example. Python's `sys.stderr` alone
    would not catch a C++ write.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2 (an embedded interpreter)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_growth(fn: Callable[[], Any]) -> int:
    """The peak growth, in bytes, of live CPU tensor memory while `fn()` runs.

    `fn` runs under `torch.profiler.profile(profile_memory=True)`; every
    allocation and free of torch's CPU allocator during it is an event with
    its size (negative for a free) and time. The running sum of the sizes,
    in time order, is the memory allocated since the start; its maximum
    (at least 0) is the peak growth. Memory that `fn` allocates and keeps
    (its outputs) is part of it.
    """
    from torch.profiler import ProfilerActivity, profile

    prof: Any = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        out = fn()
        del out
    finally:
        with _quiet_fd2():
            prof.stop()
    # The profiler's raw events: the allocator's "[memory]" records, each with `nbytes`.
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _room_for_shapes(step: Step[Any], trials: int) -> contextlib.AbstractContextManager[Any]:
    """Raise dynamo's recompile limit while trials run, for a compiled step.

    Steps compile one static graph per batch shape (`CompileOptions.dynamic`
    is False), and each size tried is a new shape: past dynamo's
    `recompile_limit` (8) a `fullgraph` step would fail. The graphs compiled
    stay cached after the search, like any other.
    """
    if not step.compiled:
        return contextlib.nullcontext()
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    return torch._dynamo.config.patch(recompile_limit=limit + trials)


def _device_of(state: Any) -> torch.device:
    found = train_states(state)
    if found:
        return found[0].step.device
    tensors = [x for x in tree_leaves(state) if isinstance(x, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


def _free(device: torch.device) -> None:
    """Give memory back after an out-of-memory error, so the next trial starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _describe_need(t: BatchSizeTrial) -> str:
    return (
        "more than the device holds (out of memory)"
        if t.peak_bytes is None
        else f"{t.peak_bytes} bytes"
    )


def _budget(max_memory: int | None, device: torch.device) -> str:
    return f"{device} memory" if max_memory is None else f"{max_memory} bytes"
