"""`fit`: drive the loop to the end in one call, with `Trainer`'s defaults, for users coming from Lightning.

    final = lf.fit(step, state, loader, max_epochs=10, eval_step=eval_step, eval_data=val_loader)

turns on what `Trainer` turns on: a progress bar, a model summary, a logger
(TensorBoard if installed, else CSV) and last-checkpoint saving, all under
`default_root_dir`. `barebones=True` turns all of it off; `fast_dev_run`
writes no files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ._build import Step
from ._callback import Callback, callback_states
from ._contract import LoopState, Strategy
from ._loop import as_train_step, loop, prepare_loop_state
from ._manager import CheckpointManager
from ._strategy import SingleProcess
from .callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from .loggers import default_logger

# `lightfunc.build`'s options that `fit` (like `loop`) takes for a plain step.
_BUILD_OPTIONS = ("precision", "accumulate_grad_batches", "skip_nonfinite", "strategy", "compile")


def fit(
    step: Step[Any] | Callable[..., Any],
    state: Any,
    train_data: Iterable[Any],
    *,
    default_root_dir: str | os.PathLike[str] = "runs/lightfunc",
    callbacks: Sequence[Callback] = (),
    logger: Callback | bool = True,
    enable_progress_bar: bool = True,
    enable_model_summary: bool | torch.nn.Module = True,
    enable_checkpointing: bool = True,
    log_every_n_steps: int = 50,
    barebones: bool = False,
    ckpt_path: Literal["last"] | str | os.PathLike[str] | None = None,
    **loop_kwargs: Any,
) -> LoopState:
    """Train to the end and return the final `LoopState`.

    Takes `lightfunc.loop`'s arguments (`max_epochs`, `max_steps`,
    `eval_step`, `eval_data`, `fast_dev_run`, `accelerator`, and, for a plain
    `step`, build options such as `precision`), plus `Trainer`'s switches, by
    the same names:

    Args:
        default_root_dir: where logs (`logs/`) and checkpoints (`checkpoints/`) go.
        callbacks: more callbacks (`EarlyStopping`, your own, ...), run after the defaults.
        logger: True for the default logger (TensorBoard if installed, else
            CSV), False for none, or a `lightfunc.loggers` logger.
        enable_progress_bar: show a progress bar (tqdm on a terminal, plain lines otherwise).
        enable_model_summary: print parameter counts at the start; pass the
            `nn.Module` to get per-module rows.
        enable_checkpointing: save a checkpoint under `checkpoints/` at the
            end of every epoch and on SIGTERM (`last.safetensors`; a sharded
            strategy's is a directory, pointed at by `index.json`). Add a
            `ModelCheckpoint` callback for anything more.
        log_every_n_steps: how often the logger and the bar read metrics from the device.
        barebones: turn all of the above off (for overhead measurements).
        ckpt_path: "last" to resume from `checkpoints/` under
            `default_root_dir` (a fresh start when there is none), or the path
            of a checkpoint to resume from (read by the step's strategy).

    Returns:
        The last `LoopState`.

    Raises:
        ValueError: if `barebones` is combined with a feature it turns off,
            a build option is given with a built step, or the run has no
            steps to take.
    """
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
        if enable_progress_bar:
            total = _expected_steps(train_data, loop_kwargs)
            active.append(ProgressBar(log_every_n_steps=log_every_n_steps, total=total))
        if not fast_dev_run:  # fast_dev_run writes no files
            active += _writers(root, logger, enable_checkpointing, log_every_n_steps)
    active += callbacks
    # Built here, not in `loop`: the state is prepared by the step (cast for its
    # precision, sharded by its strategy) before a checkpoint is restored into it.
    options = {name: loop_kwargs.pop(name) for name in _BUILD_OPTIONS if name in loop_kwargs}
    train = as_train_step(step, **options)
    start = _resume(prepare_loop_state(train, state), root, ckpt_path, active)
    last: LoopState | None = None
    for ls in loop(train, start, train_data, callbacks=active, **loop_kwargs):
        last = ls
    if last is None:
        raise ValueError(
            "`fit` ran no steps: the state is already past `max_steps` / `max_epochs`."
        )
    return last


def _writers(
    root: Path, logger: Callback | bool, checkpointing: bool, every: int
) -> list[Callback]:
    out: list[Callback] = []
    if logger is True:
        out.append(default_logger(root / "logs", log_every_n_steps=every))
    elif isinstance(logger, Callback):
        out.append(logger)
    elif logger is not False:
        raise TypeError(
            f"`logger` must be a bool or a lightfunc.loggers logger, got {type(logger).__name__}."
        )
    if checkpointing:
        out.append(ModelCheckpoint(root / "checkpoints", every_n_epochs=1, keep_last_n=1))
    return out


def _resume(start: LoopState, root: Path, ckpt_path: Any, callbacks: list[Callback]) -> LoopState:
    """`start`, or the checkpoint `ckpt_path` names loaded into its structure (by its strategy)."""
    if ckpt_path is None:
        return start
    strategy: Strategy = start.strategy if start.strategy is not None else SingleProcess()
    if ckpt_path == "last":
        manager = next((cb for cb in callbacks if isinstance(cb, CheckpointManager)), None)
        manager = manager or CheckpointManager(root / "checkpoints")
        restored = manager.restore(start, callbacks=callbacks, strategy=strategy)
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
