"""The `Logger` contract: a callback that writes metrics and hyper-parameters to files.

What a logger writes, and when (the same for every backend):

- every `log_every_n_steps` steps: the train metrics, under their own names
  (`loss`), and the epoch; a metric named in `metric_intervals` at its own
  rate instead (e.g. `{"lr": "epoch"}`: the learning rate once per epoch, on
  the epoch's last step, however often the loss is written);
- a run resumed from a checkpoint at step k re-logs the steps after k that
  the interrupted run had logged: the CSV and JSONL files drop those old
  records first, and TensorBoard purges them (`SummaryWriter(purge_step=k+1)`),
  so each step appears once; MLflow and W&B keep the interrupted run's
  records of those steps beside the new ones (nothing is deleted there);
- after every evaluation (`ls.evaluated`): the evaluation metrics as
  `val_<name>` (`val_loss`, the names `EarlyStopping` and `ProgressBar` use;
  a metric the eval step already calls `val_loss` keeps that name) and the
  epoch, at the step the evaluation ran. A step that is both gives one
  record with both.

Metrics are read back from the device on those steps only; on every other
step a logger reads nothing and costs one modulo (and one check per
`metric_intervals` entry). Only rank 0 of a `torch.distributed` run writes
anything; on the other ranks a logger is a no-op (it neither reads metrics
nor creates a file). Directories are created on the first write, so a run
that logs nothing leaves nothing behind.

A backend subclasses `Logger` and implements `write_metrics`,
`write_hparams` and `close`; they are called on rank 0 only, with plain
Python values.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._atomic import atomic_write
from .._callback import Callback
from .._contract import eval_metric_name
from .._strategy import global_rank
from .._validate import is_int

if TYPE_CHECKING:
    from .._contract import LoopState

# Names a metric may not take: every record already carries them.
RESERVED_NAMES = frozenset({"step", "epoch"})


class Logger(Callback):
    """Base class of the loggers: when to log, what, and on which rank (see the module doc).

    Args:
        save_dir: the root directory of the logs.
        name: the run's sub-directory: files go to `save_dir/name/` (`log_dir`).
        log_every_n_steps: write the train metrics every this many steps
            (Lightning's name). Evaluation metrics are written whenever an
            evaluation ran.
        rank: this process's rank; only rank 0 writes. None: the
            `torch.distributed` rank when a process group is initialised, else 0
            (looked up at each write, so the group may be created after the logger).
        hparams: hyper-parameters (a JSON-able mapping) written once, at the
            first `on_start`; see `log_hyperparams`.
        metric_intervals: train metrics logged at their own rate rather than
            every `log_every_n_steps`: name -> an int n (every n steps) or
            "epoch" (on the last step of every epoch). E.g.
            `log_every_n_steps=50, metric_intervals={"lr": "epoch"}` writes the
            loss every 50 steps and the `LearningRateMonitor`'s `lr` once per
            epoch (Lightning's `LearningRateMonitor(logging_interval="epoch")`
            next to the Trainer's `log_every_n_steps`). A named metric absent
            from a step's metrics is skipped.

    Raises:
        TypeError: `save_dir` not a path, `name` not a string, `rank` not an int,
            `hparams` not a mapping of JSON values, `metric_intervals` not a
            mapping of names.
        ValueError: `log_every_n_steps` < 1, an empty `name`, `rank` < 0, an
            interval in `metric_intervals` neither an int >= 1 nor "epoch".
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        *,
        name: str = "run",
        log_every_n_steps: int = 50,
        rank: int | None = None,
        hparams: Mapping[str, Any] | None = None,
        metric_intervals: Mapping[str, int | Literal["epoch"]] | None = None,
    ) -> None:
        if not isinstance(save_dir, str | os.PathLike):
            raise TypeError(
                f"`save_dir` must be a directory path (str or os.PathLike), got "
                f"{type(save_dir).__name__} {save_dir!r}."
            )
        if not isinstance(name, str):
            raise TypeError(f"`name` must be a string (a sub-directory), got {name!r}.")
        if not name:
            raise ValueError("`name` must be a non-empty string, e.g. name='run'.")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(
                f"`name` is a sub-directory of `save_dir`, got {name!r}, which leads outside it. "
                f"Give a plain name (e.g. name='csv'), or another `save_dir`."
            )
        if not is_int(log_every_n_steps) or log_every_n_steps < 1:
            raise ValueError(
                f"`log_every_n_steps` must be an int >= 1, got {log_every_n_steps!r}. "
                f"Use 1 to log every step."
            )
        if rank is not None and not is_int(rank):
            raise TypeError(f"`rank` must be an int or None, got {type(rank).__name__} {rank!r}.")
        if rank is not None and rank < 0:
            raise ValueError(f"`rank` must be >= 0 (or None to ask torch.distributed), got {rank}.")
        self.save_dir = Path(save_dir)
        self.name = name
        self.log_every_n_steps = log_every_n_steps
        self._rank = rank
        # Validated now, written at the first on_start (never twice).
        self._init_hparams = None if hparams is None else check_hparams(hparams, "hparams")
        self._hparams: dict[str, Any] = {}  # everything logged so far, merged
        self.metric_intervals = _check_intervals(metric_intervals)
        # The step a resumed run started from (`on_start`): records past it, written by the
        # run that crashed after its last checkpoint, are dropped where the backend can.
        self._resumed_at: int | None = None
        self._init_backend()

    def _init_backend(self) -> None:
        """Set up a subclass's own fields (called at the end of `__init__`)."""

    @property
    def log_dir(self) -> Path:
        """Where this logger's files go: `save_dir / name`."""
        return self.save_dir / self.name

    @property
    def rank(self) -> int:
        """The rank given, else the `torch.distributed` rank (0 without a process group)."""
        return self._rank if self._rank is not None else global_rank()

    @property
    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters logged so far (merged over `log_hyperparams` calls)."""
        return dict(self._hparams)

    def describe(self) -> str:
        return str(self.log_dir)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.log_dir)!r})"

    # The public API ------------------------------------------------------------------------

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Write hyper-parameters: `params` merged into those logged before (rank 0 only).

        Args:
            params: a mapping of string keys to JSON values (numbers, strings,
                bools, None, lists and nested mappings of them).

        Raises:
            TypeError: `params` is not a mapping, or a key / value is not JSON
                (the message names its path, e.g. `params['optim']['lr']`).
        """
        params = check_hparams(params, "params")
        if self.rank != 0:
            return
        self._hparams.update(params)
        self.write_hparams(dict(self._hparams))

    def log_metrics(
        self,
        metrics: Mapping[str, Any],
        *,
        step: int,
        epoch: int | None = None,
        prefix: str | None = None,
    ) -> None:
        """Write one record of scalars at `step` (rank 0 only); reads tensors from the device.

        The callback hooks call this; call it yourself to log extra values, e.g.
        test metrics into the run's logs after `fit` (Lightning's `trainer.test`)::

            final = lf.fit(step, state, train_data, logger=logger, ...)
            metrics = lf.evaluate(eval_step, final, test_data)
            logger.log_metrics(metrics, step=final.step, epoch=final.epoch, prefix="test")

        writes `test_loss`, ... at the run's last step (a closed logger reopens its files).

        Args:
            metrics: name -> number or one-element tensor. An empty mapping writes nothing.
            step: the step to record them at.
            epoch: the epoch to record with them, or None.
            prefix: written as `<prefix>_<name>` (a name already starting with
                `<prefix>_` keeps it), as the loop writes evaluation metrics as `val_<name>`.

        Raises:
            TypeError: `step` not an int, a name or `prefix` not a string, a value
                not a number/tensor.
            ValueError: a name `step` or `epoch`, a tensor with more than one
                element, an empty `prefix`.
        """
        if not is_int(step):
            raise TypeError(f"`step` must be an int, got {type(step).__name__} {step!r}.")
        if prefix is not None:
            if not isinstance(prefix, str):
                raise TypeError(
                    f"`prefix` must be a string or None, got {type(prefix).__name__} {prefix!r}. "
                    f"E.g. prefix='test' writes `test_loss`."
                )
            if not prefix:
                raise ValueError("`prefix` must be non-empty, e.g. prefix='test' (`test_loss`).")
            metrics = {_prefixed(prefix, name): value for name, value in metrics.items()}
        if self.rank != 0 or not metrics:
            return
        values = {_check_name(name): to_float(name, value) for name, value in metrics.items()}
        self.write_metrics(step, epoch, values)

    # The callback hooks --------------------------------------------------------------------

    def on_start(self, ls: LoopState) -> None:
        if ls.step > 0 and self._resumed_at is None:
            self._resumed_at = ls.step
        if self._init_hparams is not None:
            params, self._init_hparams = self._init_hparams, None
            self.log_hyperparams(params)

    def on_step_end(self, ls: LoopState) -> None:
        log_train = ls.step % self.log_every_n_steps == 0
        due = [
            name
            for name, every in self.metric_intervals.items()
            if (ls.epoch_end if every == "epoch" else ls.step % every == 0)
        ]
        if not (log_train or due or ls.evaluated) or self.rank != 0:
            return  # the common case: nothing read, nothing written
        metrics: dict[str, Any] = {
            name: value
            for name, value in ls.metrics.items()
            if (name in due if name in self.metric_intervals else log_train)
        }
        if ls.evaluated and ls.eval_metrics is not None:
            for name, value in ls.eval_metrics.items():
                key = eval_metric_name(name)
                if key in metrics:
                    raise ValueError(
                        f"{self!r}: the train metric {key!r} and the evaluation metric {name!r} "
                        f"would both be logged as {key!r}. Rename the train metric."
                    )
                metrics[key] = value
        self.log_metrics(metrics, step=ls.step, epoch=ls.epoch)

    def on_end(self, ls: LoopState) -> None:
        if self.rank == 0:
            self.close()

    # What a backend implements (called on rank 0 only) -------------------------------------

    def write_metrics(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        """Write one record: `metrics` (name -> float, non-empty) at `step`, and `epoch`."""
        raise NotImplementedError(f"{type(self).__name__} must implement `write_metrics`.")

    def write_hparams(self, params: dict[str, Any]) -> None:
        """Write all hyper-parameters logged so far (replacing what was written before)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `write_hparams`.")

    def close(self) -> None:
        """Flush and release open files (a later write reopens them)."""


def _check_intervals(intervals: Any) -> dict[str, int | Literal["epoch"]]:
    """`metric_intervals` as a dict, after checking its names and intervals."""
    if intervals is None:
        return {}
    if not isinstance(intervals, Mapping):
        raise TypeError(
            f"`metric_intervals` must be a mapping of metric name -> interval, got "
            f"{type(intervals).__name__}. E.g. metric_intervals={{'lr': 'epoch'}}."
        )
    for name, every in intervals.items():
        _check_name(name)
        if every != "epoch" and (not is_int(every) or every < 1):
            raise ValueError(
                f"`metric_intervals[{name!r}]` must be an int >= 1 (every n steps) or "
                f"'epoch' (once per epoch), got {every!r}."
            )
    return dict(intervals)


def write_json(path: Path, obj: Any) -> None:
    """Replace `path` atomically with `obj` as indented JSON (creating its directory)."""
    text = json.dumps(obj, indent=2) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def check_hparams(params: Any, arg: str) -> dict[str, Any]:
    """`params` as a dict, after checking that it is a mapping of JSON values (else TypeError)."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"`{arg}` must be a mapping of hyper-parameters, got {type(params).__name__}. "
            f"For a dataclass pass `dataclasses.asdict(config)`, for argparse `vars(args)`."
        )
    _check_json(params, arg)
    return dict(params)


def _check_json(value: Any, path: str) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        return  # NaN / inf included: Python's json writes and reads them
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"hyper-parameter keys must be strings; `{path}` has the key {key!r} "
                    f"({type(key).__name__}). Use str keys."
                )
            _check_json(item, f"{path}[{key!r}]")
        return
    hint = " (a tensor: pass `.item()` or a list)" if isinstance(value, torch.Tensor) else ""
    raise TypeError(
        f"hyper-parameters must be JSON values (numbers, strings, bools, None, lists, dicts); "
        f"`{path}` is a {type(value).__name__}{hint}. Convert it, e.g. with str()."
    )


def to_float(name: str, value: Any) -> float:
    """A metric as a Python float; a tensor is read from its device (a sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {name!r} is a tensor of shape {tuple(value.shape)}; loggers write one "
                f"number per metric. Reduce it first (e.g. `.mean()`)."
            )
        return float(value.detach().float().cpu().reshape(()))
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(
        f"metric {name!r} must be a number or a one-element tensor, got {type(value).__name__}."
    )


def _prefixed(prefix: str, name: Any) -> str:
    """`<prefix>_<name>`, or `name` when it already starts with `<prefix>_`."""
    name = _check_name(name)
    return name if name.startswith(f"{prefix}_") else f"{prefix}_{name}"


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"metric names must be strings, got {name!r} ({type(name).__name__}).")
    if name in RESERVED_NAMES:
        raise ValueError(
            f"a metric may not be called {name!r}: every record already has `step` and "
            f"`epoch`. Rename the metric (e.g. {name + '_metric'!r})."
        )
    return name


def final_values(ls: LoopState) -> dict[str, float]:
    """The run's final values at `ls` (a sync): train metrics, the last evaluation's (as
    `val_<name>`), `step` and `epoch`."""
    values = {name: to_float(name, value) for name, value in ls.metrics.items()}
    for name, value in (ls.eval_metrics or {}).items():
        key = eval_metric_name(name)
        values[key] = to_float(key, value)
    return {**values, "step": ls.step, "epoch": ls.epoch}
