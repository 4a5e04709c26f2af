"""The generator loop, and the eval / predict loops beside it.

    for ts in lightfunc.loop(step, state, train_loader, max_epochs=10,
                             eval_step=eval_step, eval_data=val_loader):
        if ts.step % 100 == 0:
            print(ts.step, float(ts.metrics["loss"]))   # the only sync is yours

`loop` yields one immutable `TrainerState` per train step. It never reads a
tensor back from the device: metrics stay where the step left them until the
caller looks. Breaking out and calling `loop` again with the last
`TrainerState` continues the run where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._build import Step, build, build_eval
from ._compile import CompileOptions
from ._device import resolve_device, to_device
from ._precision import Policy, policy
from ._precision_step import describe
from ._state import TrainState
from ._tree import register_dataclass, replace_fields, tree_leaves

if TYPE_CHECKING:
    from ._manager import CheckpointManager
    from .callbacks import Callback

Metrics = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """A snapshot of a run, yielded after every train step.

    Attributes:
        state: the user's state (a `TrainState` or any pytree), on the run's device.
        step: train steps the loop has run, over all epochs (host int).
        epoch: the current epoch, counted from 0 (host int).
        batch_idx: batches consumed in the current epoch (host int); equals
            the epoch's length right after its last batch.
        metrics: the last train step's metrics, device tensors, not synced.
        eval_metrics: the last evaluation's mean metrics (device tensors), or None.
        eval_at_step: the `step` at which `eval_metrics` were computed, or -1.
        epoch_end: True on the state yielded after the last batch of an epoch.
        callbacks: each stateful callback's `state_dict()`, by `state_key`
            (saved in checkpoints, handed back to the callbacks on resume).
    """

    state: Any
    step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    metrics: Metrics = dataclasses.field(default_factory=dict)
    eval_metrics: Metrics | None = None
    eval_at_step: int = -1
    epoch_end: bool = False
    callbacks: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def evaluated(self) -> bool:
        """True on the state yielded right after an evaluation ran."""
        return self.eval_at_step == self.step

    def replace(self, **changes: Any) -> TrainerState:
        """A copy with the given fields replaced (like `dataclasses.replace`, faster: it runs every step)."""
        unknown = changes.keys() - _TRAINER_FIELDS
        if unknown:
            raise TypeError(
                f"TrainerState has no field(s) {sorted(unknown)}; fields are {sorted(_TRAINER_FIELDS)}."
            )
        return replace_fields(self, **changes)


# Counters are children (int leaves), so a checkpoint of a TrainerState holds them.
register_dataclass(TrainerState)
_TRAINER_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainerState))


@dataclasses.dataclass(frozen=True)
class _Limits:
    max_steps: int | None
    max_epochs: int | None
    train_batches: int | float | None
    eval_batches: int | float | None
    eval_every: int | None


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
    limit_train_batches: int | float | None = None,
    limit_eval_batches: int | float | None = None,
    fast_dev_run: bool | int = False,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    checkpoint: CheckpointManager | None = None,
    callbacks: Sequence[Callback] = (),
    precision: str | int | Policy | None = None,
) -> Iterator[TrainerState]:
    """Run `step` over `train_data`, yielding a `TrainerState` after every step.

    Args:
        step: a train step, built (`lightfunc.build`) or plain (then built
            here with the default, compiled).
        state: the initial state (e.g. `TrainState.create(...)`), or a
            `TrainerState` yielded earlier to continue that run.
        train_data: an iterable of batches, re-iterated every epoch (a
            DataLoader, a list, ...). Batches are moved to the run's device.
        max_steps: stop after this many steps in total.
        max_epochs: stop after this many epochs. With neither limit given, one epoch.
        eval_step: `eval_step(state, batch) -> dict of 0-d tensors`, run over
            `eval_data` at the end of every epoch and every `eval_every` steps.
        eval_data: batches for `eval_step`.
        eval_every: also evaluate every this many steps.
        limit_train_batches: batches per epoch: an int count or a float fraction.
        limit_eval_batches: batches per evaluation: an int count or a float fraction.
        fast_dev_run: True (or n): run 1 (or n) train batches and 1 (or n) eval
            batches, once, to check the code end to end.
        accelerator: "auto", "cpu", "gpu"/"cuda" or "mps".
        devices: "auto", 1 or [index].
        precision: run under a precision policy (Lightning's strings:
            "bf16-mixed", "16-mixed", "bf16-true", ...): a plain `step` (and
            `eval_step`) is built with it, and a `TrainState` is converted
            with `state.with_precision(...)`. A built step carries its own.
            A step built with `strategy="fsdp"` has the state sharded here
            (`lightfunc.distributed.shard_state`), and a plain `eval_step`
            is built with the train step's precision and strategy.
        checkpoint: a `CheckpointManager` that sees every state (and saves on
            its schedule). With one, SIGTERM (preemption) makes the loop save
            the last completed step and stop cleanly; with
            `save_on_exception=True`, a step that raises first gets the last
            completed step saved.
        callbacks: `lightfunc.callbacks.Callback`s that observe every state
            and may stop the run (see `lightfunc.callbacks`). Their hooks run
            in this generator; `on_end` runs when the loop finishes or is
            stopped, not when you break out of it.

    Yields:
        `TrainerState` after each train step, with evaluation results attached
        on the steps where evaluation ran (`ts.evaluated`).

    Raises:
        ValueError / TypeError: on inconsistent arguments, before any step runs.

    Resuming from a `TrainerState` continues its counters and the current
    epoch. With a `lightfunc.Loader` (anything with `iter_from(epoch,
    position)`), the loop asks for epoch `ts.epoch` from batch `ts.batch_idx`:
    the same batches as an uninterrupted run, mid-epoch included, and the
    ones already consumed are never read. Any other iterable is iterated from
    its start and its first `ts.batch_idx` batches are read and dropped: the
    same batches come next only if it yields the same order each time it is
    iterated (no shuffling, or a sampler seeded by `set_epoch`).
    """
    limits = _limits(
        max_steps, max_epochs, limit_train_batches, limit_eval_batches, eval_every, fast_dev_run
    )
    if (eval_step is None) != (eval_data is None):
        raise ValueError("`eval_step` and `eval_data` go together: give both or neither.")
    train = as_train_step(step, precision)
    evaluate_ = None if eval_step is None else _as_eval_step(eval_step, like=train)
    device = resolve_device(accelerator, devices)

    ts = state if isinstance(state, TrainerState) else TrainerState(state=state)
    ts = ts.replace(state=to_device(state_for(train, ts.state), device))
    if checkpoint is not None and not hasattr(checkpoint, "update"):
        raise TypeError(
            f"`checkpoint` must be a lightfunc.CheckpointManager, got {type(checkpoint).__name__}."
        )
    from .callbacks import ModelCheckpoint  # lightfunc.callbacks imports this module
    from .callbacks._base import check_unique_keys

    callbacks = list(callbacks)
    check_unique_keys(callbacks)
    # SIGTERM and save-on-exception go to the explicit manager, else to a ModelCheckpoint's.
    emergency = checkpoint or next(
        (cb.manager for cb in callbacks if isinstance(cb, ModelCheckpoint)), None
    )
    eval_batches = eval_data if eval_data is not None else ()
    return _run(
        train,
        evaluate_,
        ts,
        train_data,
        eval_batches,
        limits,
        device,
        checkpoint,
        emergency,
        callbacks,
    )


def _run(
    train: Step[Any],
    eval_step: Step[Any] | None,
    ts: TrainerState,
    train_data: Iterable[Any],
    eval_data: Iterable[Any],
    limits: _Limits,
    device: torch.device,
    checkpoint: CheckpointManager | None,
    emergency: CheckpointManager | None,
    callbacks: list[Callback],
) -> Iterator[TrainerState]:
    n_train = _num_batches(train_data, limits.train_batches, "limit_train_batches")
    for cb in callbacks:
        if cb.state_key in ts.callbacks:
            cb.load_state_dict(ts.callbacks[cb.state_key])
        cb.on_start(ts)
    last = ts
    with _StopRequest(enabled=emergency is not None) as stop:
        while not _done(ts, limits):
            _set_epoch(train_data, ts.epoch)
            it = _epoch_batches(train_data, ts, n_train)
            upcoming = next(it, _END)
            if upcoming is _END and ts.batch_idx == 0:
                raise ValueError(
                    "`train_data` yielded no batches for an epoch. Check the DataLoader's length "
                    "(batch_size larger than the dataset with drop_last=True?) and `limit_train_batches`."
                )
            while upcoming is not _END:
                batch = to_device(upcoming, device, non_blocking=True)
                try:
                    state, metrics = train(ts.state, batch)
                except Exception:
                    if emergency is not None and emergency.save_on_exception and ts.step > 0:
                        emergency.save(ts, reason="exception")
                    raise
                # Fetch the next batch while the device works, and to know whether
                # this step ends the epoch (evaluation then belongs to this step).
                upcoming = next(it, _END)
                end_of_epoch = upcoming is _END
                ts = ts.replace(
                    state=state,
                    step=ts.step + 1,
                    batch_idx=ts.batch_idx + 1,
                    metrics=metrics,
                    epoch_end=end_of_epoch,
                )
                end_of_run = _done(ts, limits) or (
                    end_of_epoch and _done(ts.replace(epoch=ts.epoch + 1), limits)
                )
                if eval_step is not None and (
                    end_of_epoch
                    or end_of_run
                    or (limits.eval_every and ts.step % limits.eval_every == 0)
                ):
                    ts = ts.replace(
                        eval_metrics=evaluate(
                            eval_step, ts.state, eval_data, limit_batches=limits.eval_batches
                        ),
                        eval_at_step=ts.step,
                    )
                stop_asked = False
                if callbacks:
                    ts, stop_asked = _run_callbacks(callbacks, ts)
                if checkpoint is not None:
                    checkpoint.update(ts)
                yield ts
                last = ts
                if stop.requested and emergency is not None:
                    emergency.save(ts, reason="sigterm")
                if stop.requested or stop_asked or (end_of_run and not end_of_epoch):
                    _end(callbacks, ts)
                    return
            ts = ts.replace(epoch=ts.epoch + 1, batch_idx=0, epoch_end=False)
        _end(callbacks, last)


def _run_callbacks(callbacks: list[Callback], ts: TrainerState) -> tuple[TrainerState, bool]:
    """Extra metrics from all, `on_step` on all (any may ask to stop), states collected, `on_step_end` on all."""
    extra: dict[str, Any] = {}
    for cb in callbacks:
        extra.update(cb.extra_metrics(ts) or {})
    if extra:
        ts = ts.replace(metrics={**ts.metrics, **extra})
    stop = False
    for cb in callbacks:
        stop = bool(cb.on_step(ts)) or stop
    states = {cb.state_key: s for cb in callbacks if (s := cb.state_dict()) is not None}
    if states:
        ts = ts.replace(callbacks=states)
    for cb in callbacks:
        cb.on_step_end(ts)
    return ts, stop


def _end(callbacks: list[Callback], ts: TrainerState) -> None:
    for cb in callbacks:
        cb.on_end(ts)


def _epoch_batches(
    train_data: Iterable[Any], ts: TrainerState, n_train: int | None
) -> Iterator[Any]:
    """The batches of `ts.epoch` from position `ts.batch_idx` on."""
    iter_from = getattr(train_data, "iter_from", None)
    if callable(iter_from):  # a lightfunc.Loader: start at batch_idx, reading no skipped batch
        it: Iterator[Any] = iter_from(ts.epoch, ts.batch_idx)
        return it if n_train is None else itertools.islice(it, max(0, n_train - ts.batch_idx))
    # A plain iterable: resume mid-epoch by reading and dropping batch_idx batches.
    batches = train_data if n_train is None else itertools.islice(train_data, n_train)
    return itertools.islice(batches, ts.batch_idx, None)


class _StopRequest:
    """While active (main thread, with a checkpoint manager), SIGTERM asks the loop to stop.

    The loop then saves the last completed step and returns, so a preempted
    job exits cleanly with a checkpoint instead of dying mid-step.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous)


_END = object()


def evaluate(
    eval_step: Step[Any] | Callable[..., Any],
    state: Any,
    data: Iterable[Any],
    *,
    limit_batches: int | float | None = None,
    device: torch.device | None = None,
) -> Metrics:
    """Run `eval_step` over `data` and average its metrics, weighted by batch size.

    Args:
        eval_step: `eval_step(state, batch) -> dict of 0-d tensors`, built with
            `lightfunc.build_eval` or plain (then built here, compiled).
        state: the state to evaluate (a `TrainState` or a `TrainerState`).
        data: an iterable of batches.
        limit_batches: an int count or a float fraction of `data`'s batches.
        device: where to run; defaults to the device of the state's tensors.

    Returns:
        dict name -> 0-d tensor on the device: each metric's mean over all
        examples (batch means weighted by the batch's leading dimension, so a
        smaller last batch counts for what it holds). Not synced.

    Raises:
        ValueError: if `data` yields no batches.
    """
    step = _as_eval_step(eval_step)
    if isinstance(state, TrainerState):
        state = state.state
    device = device if device is not None else _device_of(state)
    n = _num_batches(data, limit_batches, "limit_batches")
    batches = data if n is None else itertools.islice(data, n)
    totals: Metrics = {}
    count = 0
    for batch in batches:
        batch = to_device(batch, device, non_blocking=True)
        metrics = step(state, batch)
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"`eval_step` must return a dict of 0-d tensors, got {type(metrics).__name__}. "
                f"For arbitrary outputs use lightfunc.predict."
            )
        size = _batch_size(batch)
        for name, value in metrics.items():
            totals[name] = totals[name] + value * size if name in totals else value * size
        count += size
    if count == 0:
        raise ValueError(
            "`data` yielded no batches to evaluate; check its length and `limit_batches`."
        )
    return {name: total / count for name, total in totals.items()}


def predict(
    predict_step: Step[Any] | Callable[..., Any],
    state: Any,
    data: Iterable[Any],
    *,
    device: torch.device | None = None,
) -> list[Any]:
    """Run `predict_step(state, batch) -> outputs` over `data`; return the outputs in order (on device)."""
    step = _as_eval_step(predict_step)
    if isinstance(state, TrainerState):
        state = state.state
    device = device if device is not None else _device_of(state)
    return [step(state, to_device(batch, device, non_blocking=True)) for batch in data]


def as_train_step(
    step: Step[Any] | Callable[..., Any], precision: str | int | Policy | None = None
) -> Step[Any]:
    """`step` as a built train step under `precision` (built here if it is a plain function)."""
    if not isinstance(step, Step):
        return build(step, precision=precision)
    if step.kind != "train":
        raise TypeError(f"`step` must be a train step (built with lightfunc.build), got {step!r}.")
    if precision is not None and policy(precision) != (step.precision or policy("32-true")):
        raise ValueError(
            f"`step` was built with precision={describe(step.precision or policy('32-true'))}, "
            f"but `precision={precision!r}` was given. Pass the plain function to have it built "
            f"with `precision`, or build it with lightfunc.build(fn, precision={precision!r})."
        )
    return step


def state_for(train: Step[Any], state: Any) -> Any:
    """`state` stored as `train` needs it: cast for its precision (a `TrainState`), sharded for "fsdp"."""
    if isinstance(state, TrainerState):
        return state.replace(state=state_for(train, state.state))
    if train.precision is not None and isinstance(state, TrainState):
        state = state.with_precision(train.precision, skip_nonfinite=train.skip_nonfinite)
    if train.strategy == "fsdp":
        from .distributed import shard_state  # lazy: DTensor only when sharding

        state = shard_state(state, train.mesh)  # already-sharded tensors are kept as they are
    return state


def _as_eval_step(fn: Step[Any] | Callable[..., Any], like: Step[Any] | None = None) -> Step[Any]:
    """`fn` as a built eval step; a plain function is built like the train step `like`."""
    if isinstance(fn, Step):
        if fn.kind != "eval":
            raise TypeError(f"`eval_step` must be built with lightfunc.build_eval, got {fn!r}.")
        return fn
    compile_: bool | CompileOptions = True
    if like is not None:
        compile_ = like.compile_options if like.compile_options is not None else False
    if like is None:
        return build_eval(fn, compile=compile_)
    return build_eval(
        fn, compile=compile_, precision=like.precision, strategy=like.strategy, mesh=like.mesh
    )


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
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"`fast_dev_run` must be a bool or a positive int, got {fast_dev_run!r}."
            )
        return _Limits(max_steps=n, max_epochs=1, train_batches=n, eval_batches=n, eval_every=n)
    if max_steps is None and max_epochs is None:
        max_epochs = 1
    return _Limits(max_steps, max_epochs, limit_train_batches, limit_eval_batches, eval_every)


def check_positive_ints(**values: Any) -> None:
    """Raise ValueError naming the first argument that is neither None nor a positive int."""
    for name, value in values.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"`{name}` must be a positive int or None, got {value!r}.")


def _check_limit(name: str, value: int | float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be an int (batches) or a float (fraction), got {value!r}.")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"`{name}` as a count must be >= 1, got {value}.")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(
            f"`{name}` as a fraction must be in (0, 1], got {value}. Give an int for a count."
        )


def _num_batches(data: Iterable[Any], limit: int | float | None, name: str) -> int | None:
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return None
    if isinstance(limit, int):
        return limit
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"`{name}={limit}` is a fraction, but the data has no len(); give an int count instead."
        ) from None
    return max(1, math.floor(total * limit))


def _done(ts: TrainerState, limits: _Limits) -> bool:
    if limits.max_steps is not None and ts.step >= limits.max_steps:
        return True
    return limits.max_epochs is not None and ts.epoch >= limits.max_epochs


def _set_epoch(data: Any, epoch: int) -> None:
    # DistributedSampler (and lightfunc's own loaders) reshuffle by epoch.
    for holder in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        set_epoch = getattr(holder, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


def _batch_size(batch: Any) -> int:
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return int(leaf.shape[0])
    return 1


def _device_of(state: Any) -> torch.device:
    for leaf in tree_leaves(state):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")
