"""`fit`: drive the loop to the end in one call, with `Trainer`'s defaults, for users coming from Lightning.

    final = lf.fit(step, state, loader, max_epochs=10, eval_step=eval_step, eval_data=val_loader)

turns on what `Trainer` turns on: a progress bar, a model summary, a logger
(TensorBoard if installed, else CSV) and last-checkpoint saving, all under
`default_root_dir`, and prints a summary at the end (why the run stopped,
its best and last metrics, where its time and its files went).
`barebones=True` turns all of it off; `fast_dev_run` writes no files.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ._build import Step
from ._callback import Callback, callback_list, callback_states, check_callbacks
from ._contract import LoopState, Strategy
from ._evaluate import _as_eval_step, as_train_step, evaluate
from ._loop import check_data, consume_callers_state, loop, prepare_loop_state
from ._manager import CheckpointManager
from ._run_dir import new_version, resume_version
from ._state import train_states
from ._strategy import SingleProcess
from ._validate import is_int
from .callbacks import (
    EarlyStopping,
    HealthMonitor,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    NonFiniteCheck,
    ProgressBar,
    RunSummary,
    SaveHyperparameters,
)
from .loggers import Logger, TensorBoardLogger, default_logger
from .optim._health import HealthState
from .optim._introspect import learning_rate_of
from .optim._wrappers import find_state

#: `fit`'s `logger=`: on/off, a logger, a function of the run's directory
#: returning one, or a list of loggers and such functions.
LoggerArg = (
    bool | Callback | Callable[[Path], Callback] | Sequence[Callback | Callable[[Path], Callback]]
)

# `lightfunc.build`'s options that `fit` (like `loop`) takes for a plain step.
_BUILD_OPTIONS = (
    "precision",
    "accumulate_grad_batches",
    "skip_nonfinite",
    "strategy",
    "compile",
    "donate",
    "validate",
    "mesh",
    "metric_reductions",
)
# Trainer arguments a Lightning user types, with what to write in lightfunc instead.
_LIGHTNING_ONLY = {
    "limit_val_batches": "`limit_eval_batches=`",
    "val_dataloaders": "`eval_data=`",
    "train_dataloaders": "the third argument, `train_data`",
    "gradient_clip_val": (
        "`lf.optim.chain(lf.optim.clip_by_global_norm(v), lf.optim.adamw(...))` as the optimizer"
    ),
    "num_nodes": "`lightfunc run --nnodes N` and `strategy=`",
    "min_epochs": "`max_epochs=` and an `EarlyStopping` with `patience`",
    "enable_model_checkpointing": "`enable_checkpointing=`",
}


def fit(
    step: Step[Any] | Callable[..., Any],
    state: Any,
    train_data: Iterable[Any],
    *,
    default_root_dir: str | os.PathLike[str] = "runs/lightfunc",
    callbacks: Sequence[Callback] = (),
    logger: LoggerArg = True,
    enable_progress_bar: bool = True,
    enable_model_summary: bool | torch.nn.Module = True,
    enable_checkpointing: bool = True,
    log_every_n_steps: int = 50,
    barebones: bool = False,
    ckpt_path: Literal["last", "best"] | str | os.PathLike[str] | None = None,
    val_check_interval: int | float | None = None,
    num_sanity_val_steps: int = 0,
    overfit_batches: int | float = 0,
    detect_anomaly: bool = False,
    deterministic: bool = False,
    hparams: Mapping[str, Any] | None = None,
    **loop_kwargs: Any,
) -> LoopState:
    """Train to the end and return the final `LoopState`.

    Takes `lightfunc.loop`'s arguments (`max_epochs`, `max_steps`,
    `eval_step`, `eval_data`, `fast_dev_run`, `accelerator`, and, for a plain
    `step`, build options such as `precision`), plus `Trainer`'s switches, by
    the same names:

    Args:
        default_root_dir: where runs go: each run writes its logs (`logs/`) and
            checkpoints (`checkpoints/`) under its own `version_N` (the next free
            number), so a run never overwrites an earlier one's files.
        callbacks: more callbacks (`EarlyStopping`, your own, ...), run after the defaults.
        logger: True for the default logger (TensorBoard if installed, else
            CSV), False for none, a `lightfunc.loggers` logger, a function
            of this run's `version_N` directory returning one (so a logger
            you configure writes inside the run, e.g. `lambda run:
            lf.loggers.MLflowLogger(run, name="mlflow")`), or a list of those.
        enable_progress_bar: show a progress bar (tqdm on a terminal, plain lines otherwise).
        enable_model_summary: print parameter counts at the start; pass the
            `nn.Module` to get per-module rows.
        enable_checkpointing: save a checkpoint under `checkpoints/` at the
            end of every epoch, at the end of the run, and on SIGTERM / Ctrl-C
            (`last.safetensors`; a sharded strategy's is a directory, pointed
            at by `index.json`). Add a `ModelCheckpoint` callback for anything more.
        log_every_n_steps: how often the logger and the bar read metrics from
            the device; the train metrics read there are also checked for
            NaN / inf (`lightfunc.callbacks.NonFiniteCheck`: a
            `FloatingPointError` naming the step, unless the run skips
            non-finite updates with `skip_nonfinite=True`).
        barebones: turn all of the above off, and the end-of-run summary (for
            overhead measurements).
        hparams: hyper-parameters (a JSON-able mapping, e.g. `vars(args)`) for
            the logger (TensorBoard's HParams tab, `hparams.json`), with
            `max_epochs` / `max_steps` added. With a logger, the learning rate
            is logged too (as `lr`) when the state's optimizer has a schedule.
            They are also carried in every checkpoint
            (`lightfunc.callbacks.SaveHyperparameters`).
        ckpt_path: "last" to resume from the newest `version_N` under
            `default_root_dir` that holds a checkpoint, and keep writing there
            (a fresh start in a new version when there is none; an error when
            there are checkpoints but none can be loaded), or the path of a
            checkpoint to resume from (read by the step's strategy; the run
            writes into a new version), or "best": the best checkpoint of the
            `ModelCheckpoint(monitor=...)` passed in `callbacks`.
        val_check_interval: Lightning's name: an int evaluates every that
            many steps (`eval_every`), a float in (0, 1] every that fraction
            of an epoch (every `floor(f * len(train_data))` steps).
        num_sanity_val_steps: evaluate this many `eval_data` batches before
            the first train step (results discarded), so a broken eval step
            fails before hours of training. -1: all of them.
        overfit_batches: train (and evaluate) on the same first n batches
            (an int) or fraction of them (a float) every epoch, to check the
            model can drive the loss to zero.
        detect_anomaly: check the train metrics for NaN / inf after every
            step (a device sync per step) and run under
            `torch.autograd.detect_anomaly`, which, for an eager step
            (`compile=False`), names the backward operation that produced a NaN.
        deterministic: run with `torch.use_deterministic_algorithms(True)`
            (and `CUBLAS_WORKSPACE_CONFIG=:4096:8` if unset), restored afterwards.

    A `train_data` with `train_dataloader()` (a `LightningDataModule`, or any
    object with its methods) is read as Lightning reads it: `prepare_data()`
    and `setup("fit")` if it has them, `train_dataloader()` for training and,
    with an `eval_step` and no `eval_data`, `val_dataloader()`. A
    `ModelCheckpoint` (any `CheckpointManager`) in `callbacks` replaces the
    default checkpointing, and a `ProgressBar` the default bar, as in Lightning.

    Returns:
        The last `LoopState`.

    Raises:
        ValueError: if `barebones` is combined with a feature it turns off,
            a build option is given with a built step, or the run has no
            steps to take.
    """
    _check_fit_options(loop_kwargs)
    for flag, value in (
        ("enable_progress_bar", enable_progress_bar),
        ("enable_checkpointing", enable_checkpointing),
        ("barebones", barebones),
    ):
        if not isinstance(value, bool):
            raise TypeError(
                f"`{flag}` must be True or False, got {type(value).__name__} {value!r}."
            )
    if not isinstance(enable_model_summary, bool | torch.nn.Module):
        raise TypeError(
            f"`enable_model_summary` must be True, False or the model to summarise, got "
            f"{type(enable_model_summary).__name__} {enable_model_summary!r}."
        )
    callbacks = check_callbacks(callback_list(callbacks))
    train_data, loop_kwargs = _lightning_data(
        train_data, loop_kwargs, val_check_interval, overfit_batches
    )
    check_data("train_data", train_data)
    ckpt_path = _best_path(ckpt_path, callbacks)
    fast_dev_run = bool(loop_kwargs.get("fast_dev_run"))
    root = Path(default_root_dir)
    if barebones and (logger not in (True, False) or callbacks):
        raise ValueError(
            "`barebones=True` turns off logging, checkpointing, the progress bar and the summary; "
            "it cannot be combined with a `logger` or `callbacks`. Drop `barebones`, or those."
        )
    active: list[Callback] = []
    if not barebones:
        if enable_model_summary:
            module = (
                enable_model_summary if isinstance(enable_model_summary, torch.nn.Module) else None
            )
            active.append(ModelSummary(module))
        if enable_progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            total = _expected_steps(train_data, loop_kwargs)
            monitor = _monitored(callbacks)
            active.append(
                ProgressBar(
                    log_every_n_steps=log_every_n_steps,
                    total=total,
                    monitor=None if monitor is None else monitor[0],
                )
            )
        if not fast_dev_run:  # fast_dev_run writes no files
            # A CheckpointManager among the user's callbacks replaces the default one.
            own_checkpoints = any(isinstance(cb, CheckpointManager) for cb in callbacks)
            checkpointing = enable_checkpointing and not own_checkpoints
            active += _writers(root, ckpt_path, logger, checkpointing, log_every_n_steps)
        active.append(NonFiniteCheck(1 if detect_anomaly else log_every_n_steps))
    elif detect_anomaly:
        active.append(NonFiniteCheck(1))
    if hparams is not None:  # carried in every checkpoint, readable with plain safetensors
        active.append(SaveHyperparameters(hparams))
    active += callbacks
    if not barebones:
        active += _log_defaults(active, state, hparams, loop_kwargs)
    summary = None if barebones else _summary(root, active, loop_kwargs)
    if summary is not None:  # last, so that it reports after every save; checkpoints timed
        active = [*summary.timed_callbacks(active), summary]
    # Built here, not in `loop`: the state is prepared by the step (cast for its
    # precision, sharded by its strategy) before a checkpoint is restored into it.
    options = {name: loop_kwargs.pop(name) for name in _BUILD_OPTIONS if name in loop_kwargs}
    train = as_train_step(step, **options)
    prepared = prepare_loop_state(train, state)
    consume_callers_state(train, state, prepared)  # a donating run writes into its tensors
    start = _resume(prepared, root, ckpt_path, active, compiled=train.compiled)
    _sanity_check(train, start, loop_kwargs, num_sanity_val_steps)
    last: LoopState | None = None
    try:
        run = loop(train, start, train_data, callbacks=active, **loop_kwargs)
        for ls in _in_modes(run, detect_anomaly=detect_anomaly, deterministic=deterministic):
            last = ls
    except KeyboardInterrupt:
        _close_bars(active)
        if summary is not None:
            summary.finish(last, interrupted="keyboard")
        raise
    except Exception as error:
        _close_bars(active)
        if summary is not None:
            summary.finish(last, error=error)
        raise
    if last is None:
        raise ValueError(
            "`fit` ran no steps: the state is already past `max_steps` / `max_epochs`."
        )
    return last


def _writers(
    root: Path, ckpt_path: Any, logger: LoggerArg, checkpointing: bool, every: int
) -> list[Callback]:
    """The logger and checkpoint callbacks, writing into this run's version directory."""
    given = _check_logger(logger)
    if logger is not True and not checkpointing and all(isinstance(x, Callback) for x in given):
        return [x for x in given if isinstance(x, Callback)]
    run = _run_directory(root, ckpt_path)
    out: list[Callback] = []
    if logger is True:
        out.append(default_logger(run, name="logs", log_every_n_steps=every))
    for item in given:
        made = item if isinstance(item, Callback) else item(run)
        if not isinstance(made, Callback):
            raise TypeError(
                f"`logger`'s function returned {type(made).__name__}, not a logger: it is "
                f"called with the run's directory and must return e.g. "
                f"`lf.loggers.CSVLogger(run)`."
            )
        out.append(made)
    if checkpointing:
        out.append(ModelCheckpoint(run / "checkpoints", every_n_epochs=1, keep_last_n=1))
    return out


def _check_logger(logger: Any) -> list[Callback | Callable[[Path], Any]]:
    """`fit`'s `logger=` as a list of loggers and logger factories (empty for True / False)."""
    if isinstance(logger, bool):
        return []
    items = list(logger) if isinstance(logger, list | tuple) else [logger]
    for item in items:
        if isinstance(item, bool) or not (isinstance(item, Callback) or callable(item)):
            raise TypeError(
                f"`logger` must be a bool, a lightfunc.loggers logger, a function of the run's "
                f"directory returning one, or a list of those; got {type(item).__name__}."
            )
    return items


def _run_directory(root: Path, ckpt_path: Any) -> Path:
    """The newest version holding a checkpoint when resuming "last", else a new version."""
    if ckpt_path == "last":
        resumed = resume_version(root, _has_checkpoint)
        if resumed is not None:
            return resumed
    return new_version(root)


def _has_checkpoint(run: Path) -> bool:
    # Damaged checkpoints count: resuming such a run raises (`restore`) instead of
    # silently starting a new version from step 0.
    return (run / "checkpoints").is_dir() and CheckpointManager(
        run / "checkpoints"
    ).has_checkpoints()


def _resume(
    start: LoopState, root: Path, ckpt_path: Any, callbacks: list[Callback], *, compiled: bool
) -> LoopState:
    """`start`, or the checkpoint `ckpt_path` names loaded into its structure (by its strategy).

    Resuming "last", a compiled step also gets the run's compile cache
    (`CheckpointManager.load_compile_cache`) before its first step: the run's
    own directory, which this user wrote.
    """
    if ckpt_path is None:
        return start
    strategy: Strategy = start.strategy if start.strategy is not None else SingleProcess()
    if ckpt_path == "last":
        manager = next((cb for cb in callbacks if isinstance(cb, CheckpointManager)), None)
        if manager is None:
            run = resume_version(root, _has_checkpoint)
            if run is None:
                return start
            manager = CheckpointManager(run / "checkpoints")
        restored = manager.restore(start, callbacks=callbacks, strategy=strategy)
        if restored is not None and compiled and manager.compile_cache:
            manager.load_compile_cache()
        return start if restored is None else restored
    template = start.replace(
        metrics={}, eval_metrics=None, eval_at_step=-1, callbacks=callback_states(callbacks)
    )
    loaded: LoopState = strategy.load(Path(ckpt_path), like=template)
    return loaded


def _expected_steps(train_data: Iterable[Any], kwargs: dict[str, Any]) -> int | None:
    fast = kwargs.get("fast_dev_run")
    if fast:
        return 1 if fast is True else int(fast)
    limit = kwargs.get("limit_train_batches")
    try:
        per_epoch: int | None = len(train_data)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    if per_epoch is not None and isinstance(limit, int):
        per_epoch = min(per_epoch, limit)
    elif per_epoch is not None and isinstance(limit, float):
        per_epoch = max(1, math.floor(per_epoch * limit))
    max_steps, max_epochs = kwargs.get("max_steps"), kwargs.get("max_epochs")
    if max_steps is None and max_epochs is None:
        max_epochs = 1
    by_epochs = per_epoch * max_epochs if per_epoch is not None and max_epochs is not None else None
    candidates: list[int] = [n for n in (max_steps, by_epochs) if isinstance(n, int)]
    return min(candidates) if candidates else None


def _monitored(callbacks: Sequence[Callback]) -> tuple[str, Literal["min", "max"]] | None:
    """(metric, mode) the run is judged by: its `EarlyStopping`'s, else a checkpoint's `monitor`."""
    for cb in callbacks:
        if isinstance(cb, EarlyStopping):
            return cb.monitor, cb.mode
    for cb in callbacks:
        if isinstance(cb, CheckpointManager) and cb.monitor is not None:
            return cb.monitor, cb.mode
    return None


def _summary(root: Path, active: list[Callback], loop_kwargs: dict[str, Any]) -> RunSummary:
    """The end-of-run summary, told the run's limits, callbacks and files; eval data timed."""
    monitor = _monitored(active)
    logger = next((cb for cb in active if hasattr(cb, "log_dir")), None)
    max_steps, max_epochs = loop_kwargs.get("max_steps"), loop_kwargs.get("max_epochs")
    if max_steps is None and max_epochs is None:
        max_epochs = 1  # the loop's default
    summary = RunSummary(
        monitor=None if monitor is None else monitor[0],
        mode="min" if monitor is None else monitor[1],
        max_steps=max_steps,
        max_epochs=max_epochs,
        fast_dev_run=loop_kwargs.get("fast_dev_run", False),
        callbacks=active,
        log_dir=getattr(logger, "log_dir", None),
        tensorboard_dir=root if isinstance(logger, TensorBoardLogger) else None,
    )
    if loop_kwargs.get("eval_data") is not None:
        loop_kwargs["eval_data"] = summary.timed_eval_data(loop_kwargs["eval_data"])
    return summary


# -- Lightning's vocabulary, mapped onto the loop ----------------------------------------------


def _check_fit_options(kwargs: dict[str, Any]) -> None:
    """Raise for a keyword `fit` does not take, naming what to write instead."""
    # `lightfunc.loop`'s keyword options, which `fit` passes on.
    loop_options = set(inspect.signature(loop).parameters) - {"step", "state", "train_data"}
    loop_options.discard("callbacks")  # fit's own argument
    for name, value in kwargs.items():
        if name in _BUILD_OPTIONS or name in loop_options:
            continue
        if name in _LIGHTNING_ONLY:
            raise TypeError(
                f"`fit` has no argument `{name}` (Lightning's Trainer has): write "
                f"{_LIGHTNING_ONLY[name]} instead."
            )
        known = sorted({*_BUILD_OPTIONS, *loop_options})
        raise TypeError(
            f"`fit` got an unexpected argument `{name}={value!r}`. It takes its own switches "
            f"(see help(lightfunc.fit)), `lightfunc.loop`'s options and `lightfunc.build`'s, by "
            f"name: {', '.join(known)}. A built step carries its build options: pass them to "
            f"`lf.build` instead."
        )
    fast = kwargs.get("fast_dev_run")
    if fast is not None and not (isinstance(fast, bool) or (is_int(fast) and fast >= 1)):
        raise ValueError(
            f"`fast_dev_run` must be a bool or a positive int (the number of batches), got "
            f"{fast!r}. Write `fast_dev_run=True` (one batch) or e.g. `fast_dev_run=5`."
        )


def _lightning_data(
    train_data: Any,
    kwargs: dict[str, Any],
    val_check_interval: int | float | None,
    overfit_batches: int | float,
) -> tuple[Any, dict[str, Any]]:
    """`train_data` and the loop options with Lightning's data arguments mapped onto them."""
    kwargs = dict(kwargs)
    loader = getattr(train_data, "train_dataloader", None)
    if callable(loader):  # a LightningDataModule, or anything shaped like one
        for hook, args in (("prepare_data", ()), ("setup", ("fit",))):
            method = getattr(train_data, hook, None)
            if callable(method):
                method(*args)
        module, train_data = train_data, loader()
        val = getattr(module, "val_dataloader", None)
        wants_eval = kwargs.get("eval_step") is not None and kwargs.get("eval_data") is None
        if wants_eval and callable(val):
            kwargs["eval_data"] = val()
    if overfit_batches:
        train_data = _first_batches(train_data, overfit_batches)
        if kwargs.get("eval_step") is not None:
            kwargs["eval_data"] = train_data
    if val_check_interval is not None:
        if kwargs.get("eval_every") is not None:
            raise ValueError(
                "`val_check_interval` and `eval_every` say the same thing; give one of them."
            )
        kwargs["eval_every"] = _interval_steps(train_data, val_check_interval)
    return train_data, kwargs


def _first_batches(train_data: Iterable[Any], n: int | float) -> list[Any]:
    """The first `n` batches (an int) or fraction `n` of them (a float), read once."""
    if isinstance(n, float) and 0.0 < n <= 1.0:
        try:
            count = max(1, math.floor(len(train_data) * n))  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"`overfit_batches={n}` is a fraction, but `train_data` has no len(); "
                f"give an int count."
            ) from None
    elif is_int(n) and n >= 1:
        count = int(n)
    else:
        raise ValueError(
            f"`overfit_batches` must be an int >= 1 (batches) or a float in (0, 1] (a fraction), "
            f"got {n!r}. 0 (the default) turns it off."
        )
    return list(itertools.islice(train_data, count))


def _interval_steps(train_data: Iterable[Any], interval: int | float) -> int:
    if is_int(interval) and interval >= 1:
        return int(interval)
    if isinstance(interval, float) and 0.0 < interval <= 1.0:
        try:
            per_epoch = len(train_data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"`val_check_interval={interval}` is a fraction of an epoch, but `train_data` has "
                f"no len(); give an int number of steps."
            ) from None
        return max(1, math.floor(per_epoch * interval))
    raise ValueError(
        f"`val_check_interval` must be an int >= 1 (steps) or a float in (0, 1] (a fraction of an "
        f"epoch), got {interval!r}."
    )


def _best_path(ckpt_path: Any, callbacks: Sequence[Callback]) -> Any:
    """`ckpt_path`, "best" replaced by the best checkpoint of the `ModelCheckpoint` in `callbacks`."""
    if ckpt_path != "best":
        return ckpt_path
    managers = [cb for cb in callbacks if isinstance(cb, CheckpointManager) and cb.monitor]
    if not managers:
        raise ValueError(
            '`ckpt_path="best"` needs a `ModelCheckpoint(dirpath, monitor=...)` in `callbacks` to '
            "say which checkpoint is best; none with a `monitor` was given. Pass one, or a path."
        )
    best = managers[0].best()
    if best is None:
        raise ValueError(
            f'`ckpt_path="best"`: {managers[0]!r} has no checkpoint yet (monitor '
            f"{managers[0].monitor!r}). Train first, or pass `ckpt_path=None`."
        )
    return best


def _sanity_check(train: Step[Any], start: LoopState, kwargs: dict[str, Any], n: int) -> None:
    """Lightning's `num_sanity_val_steps`: run `n` eval batches (-1: all) before training."""
    if not (is_int(n) and n >= -1):
        raise ValueError(
            f"`num_sanity_val_steps` must be an int >= -1 (-1: every batch; 0: none), got {n!r}."
        )
    eval_step, eval_data = kwargs.get("eval_step"), kwargs.get("eval_data")
    if n == 0 or eval_step is None or eval_data is None or kwargs.get("fast_dev_run"):
        return
    step = _as_eval_step(eval_step, like=train)
    kwargs["eval_step"] = step  # the loop reuses the built (and compiled) eval step
    evaluate(step, start.state, eval_data, limit_batches=None if n == -1 else n)


def _in_modes(
    run: Iterator[LoopState], *, detect_anomaly: bool, deterministic: bool
) -> Iterator[LoopState]:
    """`run`'s states, produced under torch's anomaly detection / deterministic algorithms.

    Both are process-wide torch settings: set when the first step runs and
    put back as they were when the run ends or raises.
    """
    done = 0  # steps completed, to name the one that failed
    with contextlib.ExitStack() as stack:
        if detect_anomaly:
            # set_detect_anomaly, not detect_anomaly: the user asked, so no warning that they did.
            stack.enter_context(torch.autograd.set_detect_anomaly(True, check_nan=True))
        if deterministic:
            was = torch.are_deterministic_algorithms_enabled()
            warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            stack.callback(torch.use_deterministic_algorithms, was, warn_only=warn_only)
        try:
            for ls in run:
                done = ls.step
                yield ls
        except RuntimeError as error:
            if detect_anomaly and "nan" in str(error).lower():
                raise FloatingPointError(
                    f"detect_anomaly: a backward operation produced NaN at step {done + 1}: "
                    f"{error} Fixes: `skip_nonfinite=True` skips and counts such updates; check "
                    f"that step's batch, lower the learning rate or clip gradients."
                ) from error
            raise


def _log_defaults(
    active: list[Callback], state: Any, hparams: Mapping[str, Any] | None, kwargs: dict[str, Any]
) -> list[Callback]:
    """Log the hyper-parameters now; a `LearningRateMonitor` when the optimizer has a schedule,
    and a `HealthMonitor` when it tracks health (`optim.track_health`)."""
    loggers = [cb for cb in active if isinstance(cb, Logger)]
    if not loggers:
        return []
    limits = {k: kwargs[k] for k in ("max_epochs", "max_steps") if kwargs.get(k) is not None}
    if hparams is not None or limits:
        for logger in loggers:
            logger.log_hyperparams({**(hparams or {}), **limits})
    out: list[Callback] = []
    tracked = any(find_state(ts.opt_state, HealthState) for ts in train_states(state))
    if tracked and not any(isinstance(cb, HealthMonitor) for cb in active):
        out.append(HealthMonitor())
    schedule = learning_rate_of(getattr(state, "tx", None))
    if callable(schedule) and not any(isinstance(cb, LearningRateMonitor) for cb in active):
        out.append(LearningRateMonitor(schedule))
    return out


def _close_bars(active: list[Callback]) -> None:
    """Close the progress bars of a run that raised (no `on_end` will)."""
    for cb in active:
        if isinstance(cb, ProgressBar):
            cb.close()
