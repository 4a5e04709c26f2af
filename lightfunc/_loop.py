"""The generator loop (`evaluate` / `predict` live in `lightfunc._evaluate`).

    for ls in lightfunc.loop(step, state, train_loader, max_epochs=10,
                             eval_step=eval_step, eval_data=val_loader):
        if ls.step % 100 == 0:
            print(ls.step, float(ls.metrics["loss"]))   # the only sync is yours

`loop` yields one immutable `LoopState` per train step. It never reads a
tensor back from the device: metrics stay where the step left them until the
caller looks. Breaking out and calling `loop` again with the last
`LoopState` continues the run where it stopped.

The loop sits below everything that observes it: it knows the `Callback`
protocol (`lightfunc._callback`) and nothing about checkpoints, loggers or
progress bars. It asks the built step to prepare the state (`Step.prepare`:
precision, optimizer wrappers, sharding) and never branches on a strategy.
Build options (`precision`, `strategy`, ...) are set in one place, the build:
`loop` passes them to `lightfunc.build` for a plain function and refuses them
for a step that is already built.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from ._build import Step
from ._callback import Callback, InterruptReason, callback_list, check_callbacks
from ._compile import CompileOptions
from ._contract import LoopState, Strategy
from ._device import resolve_device, to_device
from ._donate import consume
from ._evaluate import (
    _as_eval_step,
    _check_limit,
    _num_batches,
    as_train_step,
    evaluate,
    with_weights,
)
from ._precision import Policy
from ._validate import check_positive_int, check_positive_ints, is_int


@dataclasses.dataclass(frozen=True)
class _Limits:
    max_steps: int | None
    max_epochs: int | None
    train_batches: int | float | None
    eval_batches: int | float | None
    eval_every: int | None
    eval_every_n_epochs: int = 1
    eval_weights: str = "params"  # `evaluate`'s `weights`: the parameters, or an average


def loop(
    step: Step[Any] | Callable[..., Any],
    state: Any,
    train_data: Iterable[Any],
    *,
    max_steps: int | None = None,
    max_epochs: int | None = None,
    eval_step: Step[Any] | Callable[..., Any] | None = None,
    eval_data: Iterable[Any] | None = None,
    eval_every: int | None = None,
    check_val_every_n_epoch: int = 1,
    limit_train_batches: int | float | None = None,
    limit_eval_batches: int | float | None = None,
    eval_weights: str = "params",
    fast_dev_run: bool | int = False,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    checkpoint: Callback | None = None,
    callbacks: Sequence[Callback] = (),
    precision: str | int | Policy | None = None,
    accumulate_grad_batches: int | None = None,
    skip_nonfinite: bool | None = None,
    strategy: str | Strategy | None = None,
    compile: bool | str | CompileOptions | None = None,
    donate: bool | None = None,
) -> Iterator[LoopState]:
    """Run `step` over `train_data`, yielding a `LoopState` after every step.

    Args:
        step: a train step, built (`lightfunc.build`) or plain (then built
            here, compiled unless `compile=False`).
        state: the initial state (e.g. `TrainState.create(...)`), or a
            `LoopState` yielded earlier to continue that run.
        train_data: an iterable of batches, re-iterated every epoch (a
            DataLoader, a list, ...). Batches are moved to the run's device.
        max_steps: stop after this many steps in total.
        max_epochs: stop after this many epochs. With neither limit given, one epoch.
        eval_step: `eval_step(state, batch) -> dict of 0-d tensors`, run over
            `eval_data` at the end of every epoch and every `eval_every` steps.
            A plain function is built like the train step (its compile
            options, precision and strategy).
        eval_data: batches for `eval_step`.
        eval_every: also evaluate every this many steps.
        check_val_every_n_epoch: evaluate at the end of every n-th epoch only
            (Lightning's name; the end of the run always evaluates).
        limit_train_batches: batches per epoch: an int count or a float fraction.
        limit_eval_batches: batches per evaluation: an int count or a float fraction.
        eval_weights: evaluate with the state's parameters ("params") or with
            an average its optimizer keeps ("ema", "swa"; `lightfunc.evaluate`'s
            `weights`), so monitored metrics are the average's.
        fast_dev_run: True (or n): run 1 (or n) train batches and 1 (or n) eval
            batches, once, to check the code end to end.
        accelerator: "auto", "cpu", "gpu"/"cuda" or "mps".
        devices: "auto", 1 or [index].
        checkpoint: a `CheckpointManager`: shorthand for appending it to
            `callbacks`. It saves on its schedule, on SIGTERM, SIGINT or SIGUSR1
            (agreed over the ranks; the loop then stops cleanly after the step)
            and, with `save_on_exception=True`,
            before an exception from the step propagates.
        callbacks: `lightfunc.callbacks.Callback`s that observe every state
            and may stop the run (see `lightfunc.callbacks`). Their hooks run
            in this generator; `on_end` runs when the loop finishes or is
            stopped, not when you break out of it. When any of them handles
            interrupts (`on_interrupt`), SIGTERM, SIGINT or SIGUSR1 asks the
            loop to stop after the current step (a second SIGINT raises
            KeyboardInterrupt at once).
        precision, accumulate_grad_batches, skip_nonfinite, strategy, compile, donate:
            `lightfunc.build`'s options, for a plain `step` only (a built
            step carries its own; giving one raises). The state is prepared
            by the step (`Step.prepare`: cast for its precision, sharded by
            its strategy, ...).

    Yields:
        `LoopState` after each train step, with evaluation results attached
        on the steps where evaluation ran (`ls.evaluated`).

    Raises:
        ValueError / TypeError: on inconsistent arguments, before any step runs.

    Resuming from a `LoopState` continues its counters and the current
    epoch. With a `lightfunc.Loader` (anything with `iter_from(epoch,
    position)`), the loop asks for epoch `ls.epoch` from batch `ls.batch_idx`:
    the same batches as an uninterrupted run, mid-epoch included, and the
    ones already consumed are never read. Any other iterable is iterated from
    its start and its first `ls.batch_idx` batches are read and dropped: the
    same batches come next only if it yields the same order each time it is
    iterated (no shuffling, or a sampler seeded by `set_epoch`).
    """
    limits = _limits(
        max_steps, max_epochs, limit_train_batches, limit_eval_batches, eval_every, fast_dev_run
    )
    check_positive_int("check_val_every_n_epoch", check_val_every_n_epoch, optional=False)
    limits = dataclasses.replace(
        limits, eval_every_n_epochs=check_val_every_n_epoch, eval_weights=eval_weights
    )
    # An empty train_data is reported by the run, which names it too.
    check_data("train_data", train_data, allow_empty=True)
    if (eval_step is None) != (eval_data is None):
        given, missing = (
            ("eval_step", "eval_data") if eval_data is None else ("eval_data", "eval_step")
        )
        raise ValueError(
            f"`eval_step` and `eval_data` go together: `{given}` was given without `{missing}`. "
            f"Give both, or neither."
        )
    if eval_step is None:
        for name, value in (("eval_every", eval_every), ("limit_eval_batches", limit_eval_batches)):
            if value is not None:
                raise ValueError(
                    f"`{name}={value!r}` was given without `eval_step` / `eval_data`, so nothing "
                    f"would be evaluated. Pass `eval_step=...` and `eval_data=...`, or drop `{name}`."
                )
        if check_val_every_n_epoch != 1 or eval_weights != "params":
            given = (
                f"check_val_every_n_epoch={check_val_every_n_epoch}"
                if check_val_every_n_epoch != 1
                else f"eval_weights={eval_weights!r}"
            )
            raise ValueError(
                f"`{given}` was given without `eval_step` / `eval_data`. Pass both, or drop it."
            )
    else:
        check_data("eval_data", eval_data)
    train = as_train_step(
        step,
        precision=precision,
        accumulate_grad_batches=accumulate_grad_batches,
        skip_nonfinite=skip_nonfinite,
        strategy=strategy,
        compile=compile,
        donate=donate,
    )
    evaluate_ = None if eval_step is None else _as_eval_step(eval_step, like=train)
    device = resolve_device(accelerator, devices)
    ls = prepare_loop_state(train, state)
    ls = ls.replace(state=to_device(ls.state, device))
    consume_callers_state(train, state, ls)
    with_weights(ls.state, eval_weights, "eval_weights")  # no such average: say so now
    run_callbacks = check_callbacks([*callback_list(callbacks), *_as_callbacks(checkpoint)])
    eval_batches = eval_data if eval_data is not None else ()
    return _run(train, evaluate_, ls, train_data, eval_batches, limits, device, run_callbacks)


def prepare_loop_state(train: Step[Any], state: Any) -> LoopState:
    """`state` (a user state or a `LoopState`) as a `LoopState` whose state `train` prepared.

    The user state goes through `train.prepare` (cast for the step's
    precision, optimizer wrappers installed, sharded by its strategy), and
    the record carries the step's strategy, so checkpoints of it are saved
    the strategy's way.
    """
    ls = state if isinstance(state, LoopState) else LoopState(state=state)
    if ls.state is None or isinstance(ls.state, torch.nn.Module):
        given = "None" if ls.state is None else f"a {type(ls.state).__name__} (an nn.Module)"
        raise TypeError(
            f"the run's `state` is {given}; the loop trains a state built from the model: "
            f"`state = lf.TrainState.create(model, lf.optim.adamw(1e-3))` (or a dict / dataclass "
            f"of them), the step's first argument."
        )
    return ls.replace(state=train.prepare(ls.state), strategy=train.strategy)


def consume_callers_state(train: Step[Any], given: Any, running: LoopState) -> None:
    """Under a donating step, mark the caller's state consumed: the run writes into its tensors.

    The run's first step writes into the tensors of `running.state`, most of
    them the caller's (preparing and placing the state copy only what they
    change), but into other state objects than the one the caller holds: it
    stayed readable while its values changed under it. Now any use of it
    raises `DonatedStateError`, as the README promises. What `running`
    holds itself is left to the step, which consumes it on its first call.
    """
    if getattr(train, "donate", False):
        caller = given.state if isinstance(given, LoopState) else given
        consume(caller, getattr(train, "__name__", "step"), keep=running.state)


def _as_callbacks(checkpoint: Any) -> list[Callback]:
    """`loop(checkpoint=manager)` is `loop(callbacks=[..., manager])`."""
    if checkpoint is None:
        return []
    if not isinstance(checkpoint, Callback):
        raise TypeError(
            f"`checkpoint` must be a lightfunc.CheckpointManager, got {type(checkpoint).__name__}."
        )
    return [checkpoint]


def _run(
    train: Step[Any],
    eval_step: Step[Any] | None,
    ls: LoopState,
    train_data: Iterable[Any],
    eval_data: Iterable[Any],
    limits: _Limits,
    device: torch.device,
    callbacks: list[Callback],
) -> Iterator[LoopState]:
    n_train = _num_batches(train_data, limits.train_batches, "limit_train_batches")
    for cb in callbacks:
        if cb.state_key in ls.callbacks:
            cb.load_state_dict(ls.callbacks[cb.state_key])
        cb.on_start(ls)
    last = ls
    # The ranks agree once whether any of them listens for signals; then all of them take
    # part in the per-step agreement (a rank without such a callback still stops with the rest).
    listening = train.strategy.agree_to_stop(any(cb.handles_interrupts for cb in callbacks))
    with _StopRequest(listening, train.strategy) as stop:
        while not _done(ls, limits):
            _set_epoch(train_data, ls.epoch)
            it = _epoch_batches(train_data, ls, n_train)
            upcoming = next(it, _END)
            if upcoming is _END and ls.batch_idx == 0:
                raise ValueError(
                    "`train_data` yielded no batches for an epoch. Check the DataLoader's length "
                    "(batch_size larger than the dataset with drop_last=True?) and `limit_train_batches`."
                )
            while upcoming is not _END:
                batch = to_device(upcoming, device, non_blocking=True)
                try:
                    state, metrics = train(ls.state, batch)
                except (Exception, KeyboardInterrupt):
                    # A KeyboardInterrupt that escapes the step (a second Ctrl-C, or no
                    # interrupt-handling callback) is an "exception" interrupt too.
                    if ls.step > 0:  # the last completed step, for callbacks that save it
                        _interrupt(callbacks, ls, "exception")
                    raise
                # Fetch the next batch while the device works, and to know whether
                # this step ends the epoch (evaluation then belongs to this step).
                upcoming = next(it, _END)
                end_of_epoch = upcoming is _END
                ls = ls.replace(
                    state=state,
                    step=ls.step + 1,
                    batch_idx=ls.batch_idx + 1,
                    metrics=metrics,
                    epoch_end=end_of_epoch,
                )
                end_of_run = _done(ls, limits) or (
                    end_of_epoch and _done(ls.replace(epoch=ls.epoch + 1), limits)
                )
                if eval_step is not None and _evaluates(ls, limits, end_of_epoch or end_of_run):
                    ls = ls.replace(
                        eval_metrics=evaluate(
                            eval_step,
                            ls.state,
                            eval_data,
                            limit_batches=limits.eval_batches,
                            weights=limits.eval_weights,
                        ),
                        eval_at_step=ls.step,
                    )
                stop_asked = False
                if callbacks:
                    ls, stop_asked = _run_callbacks(callbacks, ls)
                # `last` is set before the yield: the loop then holds exactly one state
                # while the caller has it (set after, it kept the previous one alive too).
                last = ls
                yield ls
                stopping = stop.agreed()
                if stopping:
                    _interrupt(callbacks, ls, "sigterm")
                if stopping or stop_asked or (end_of_run and not end_of_epoch):
                    _end(callbacks, ls)
                    return
            ls = ls.replace(epoch=ls.epoch + 1, batch_idx=0, epoch_end=False)
        _end(callbacks, last)


def _evaluates(ls: LoopState, limits: _Limits, boundary: bool) -> bool:
    """Whether evaluation runs after this step: at an epoch's or the run's end, or every n steps.

    With `check_val_every_n_epoch=n`, an epoch's end evaluates only on every n-th epoch;
    a run that stops before its epoch ends still evaluates there.
    """
    if limits.eval_every and ls.step % limits.eval_every == 0:
        return True
    if ls.epoch_end and limits.eval_every_n_epochs > 1:
        return (ls.epoch + 1) % limits.eval_every_n_epochs == 0
    return boundary


def check_data(name: str, data: Any, *, allow_empty: bool = False) -> None:
    """Raise unless `data` can be iterated (a DataLoader, a list of batches, a Loader, ...)
    and, unless `allow_empty`, has batches when it has a length."""
    if data is None or isinstance(data, str | bytes) or not isinstance(data, Iterable):
        raise TypeError(
            f"`{name}` must be an iterable of batches (a DataLoader, a list, a lightfunc.Loader), "
            f"got {type(data).__name__}{'' if data is None else f' ({data!r:.60})'}. Pass e.g. "
            f"`torch.utils.data.DataLoader(dataset, batch_size=32)`."
        )
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return
    if n == 0 and not allow_empty:
        raise ValueError(
            f"`{name}` is empty (len 0): there is nothing to "
            f"{'train on' if name == 'train_data' else 'evaluate'}. Check the dataset's length "
            f"and the DataLoader's `batch_size` / `drop_last` (a batch_size larger than the "
            f"dataset with drop_last=True yields no batch)."
        )


def _run_callbacks(callbacks: list[Callback], ls: LoopState) -> tuple[LoopState, bool]:
    """Extra metrics from all, `on_step` on all (any may ask to stop), states collected, `on_step_end` on all.

    When a callback's hook raises, the other callbacks get `on_interrupt(ls, "exception")`
    with this step (its update done; a `CheckpointManager(save_on_exception=True)` saves
    it) and the error is re-raised with a note naming the callback and the hook.
    """
    cb, hook = callbacks[0], "extra_metrics"
    try:
        extra: dict[str, Any] = {}
        for cb in callbacks:
            extra.update(cb.extra_metrics(ls) or {})
        if extra:
            ls = ls.replace(metrics={**ls.metrics, **extra})
        stop, hook = False, "on_step"
        for cb in callbacks:
            stop = bool(cb.on_step(ls)) or stop
        states: dict[str, Any] = {}  # as `callback_states`, knowing whose `state_dict` raised
        hook = "state_dict"
        for cb in callbacks:
            if (state := cb.state_dict()) is not None:
                states[cb.state_key] = state
        if states:
            ls = ls.replace(callbacks=states)
        hook = "on_step_end"
        for cb in callbacks:
            cb.on_step_end(ls)
    except Exception as error:
        error.add_note(
            f"Raised by the callback {type(cb).__name__}, in `{hook}` at step {ls.step}; "
            f"the other callbacks were told (`on_interrupt(ls, 'exception')`)."
        )
        _interrupt([other for other in callbacks if other is not cb], ls, "exception")
        raise
    return ls, stop


def _interrupt(callbacks: list[Callback], ls: LoopState, reason: InterruptReason) -> None:
    for cb in callbacks:
        cb.on_interrupt(ls, reason)


def _end(callbacks: list[Callback], ls: LoopState) -> None:
    for cb in callbacks:
        cb.on_end(ls)


def _epoch_batches(train_data: Iterable[Any], ls: LoopState, n_train: int | None) -> Iterator[Any]:
    """The batches of `ls.epoch` from position `ls.batch_idx` on."""
    iter_from = getattr(train_data, "iter_from", None)
    if callable(iter_from):  # a lightfunc.Loader: start at batch_idx, reading no skipped batch
        it: Iterator[Any] = iter_from(ls.epoch, ls.batch_idx)
        return it if n_train is None else itertools.islice(it, max(0, n_train - ls.batch_idx))
    # A plain iterable: resume mid-epoch by reading and dropping batch_idx batches.
    batches = train_data if n_train is None else itertools.islice(train_data, n_train)
    return itertools.islice(batches, ls.batch_idx, None)


# SIGUSR1: what SLURM sends before a job's time runs out (`--signal=USR1@90`, then requeue).
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class _StopRequest:
    """While a callback handles interrupts, SIGTERM, SIGINT or SIGUSR1 asks the loop to stop.

    The handler only sets a flag. After each step every rank calls
    `agreed()`: one `strategy.agree_to_stop` (a small all-reduce on several
    processes), so a signal that reached one rank stops all of them at the
    same step. The loop then calls `on_interrupt(ls, "sigterm")` on every
    callback with that completed step (a checkpoint manager saves it; a
    sharded save is collective, so every rank must reach it), `on_end`, and
    returns: a preempted job exits cleanly instead of dying mid-step.

    A second SIGINT while a stop is pending raises `KeyboardInterrupt` at
    once (Ctrl-C twice force-quits). Handlers are installed in the main
    thread only (Python delivers signals there); the previous ones are put
    back on exit. `listening` must be the same on every rank (`_run` agrees
    on it first): it decides whether the per-step collective runs at all.
    """

    def __init__(self, listening: bool, strategy: Strategy) -> None:
        self.listening = listening
        self.strategy = strategy
        self.installs = listening and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        """Whether the ranks stop after this step (a collective on every rank while listening)."""
        return self.listening and self.strategy.agree_to_stop(self.requested)

    def __enter__(self) -> _StopRequest:
        if self.installs:
            for name in _STOP_SIGNALS:
                number = getattr(signal, name, None)  # no SIGUSR1 on Windows
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            # None: the previous handler was not set from Python; the default is the nearest.
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


_END = object()


def _limits(
    max_steps: int | None,
    max_epochs: int | None,
    limit_train_batches: int | float | None,
    limit_eval_batches: int | float | None,
    eval_every: int | None,
    fast_dev_run: bool | int,
) -> _Limits:
    check_positive_ints(max_steps=max_steps, max_epochs=max_epochs, eval_every=eval_every)
    _check_limit("limit_train_batches", limit_train_batches)
    _check_limit("limit_eval_batches", limit_eval_batches)
    if fast_dev_run:
        n = 1 if fast_dev_run is True else fast_dev_run
        if not (is_int(n) and n >= 1):
            raise ValueError(
                f"`fast_dev_run` must be a bool or a positive int, got {fast_dev_run!r}."
            )
        return _Limits(max_steps=n, max_epochs=1, train_batches=n, eval_batches=n, eval_every=n)
    if max_steps is None and max_epochs is None:
        max_epochs = 1
    return _Limits(max_steps, max_epochs, limit_train_batches, limit_eval_batches, eval_every)


def _done(ls: LoopState, limits: _Limits) -> bool:
    if limits.max_steps is not None and ls.step >= limits.max_steps:
        return True
    return limits.max_epochs is not None and ls.epoch >= limits.max_epochs


def _set_epoch(data: Any, epoch: int) -> None:
    # DistributedSampler (and lightfunc's own loaders) reshuffle by epoch.
    for holder in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        set_epoch = getattr(holder, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return
