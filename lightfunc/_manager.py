"""`CheckpointManager`: which checkpoints to write, which to keep, and which one to resume from.

    manager = lf.CheckpointManager("runs/digits", every_n_steps=100, monitor="val_acc", mode="max")
    start = manager.restore(state) or state          # a LoopState to continue from, or None
    for ls in lf.loop(step, start, loader, max_epochs=10, checkpoint=manager):
        ...

Like Lightning's ModelCheckpoint: save every n steps and/or at the end of
every n epochs (and after each evaluation when the monitored metric is an
evaluation metric); keep the `save_top_k` best by `monitor` (or the
`keep_last_n` newest without one); `save_last` keeps a `last` pointer at the
newest state. `index.json` (written atomically) lists what is where;
`latest()` returns the newest checkpoint that verifies and falls back, with
a warning, past a corrupt one.

The manager is a `Callback`, and `loop(checkpoint=manager)` is shorthand for
`loop(callbacks=[..., manager])`: `on_step_end` saves at the save points,
`on_interrupt(ls, "sigterm")` saves the last completed step when the job is
preempted, and `on_interrupt(ls, "exception")` saves it before a failing
step's exception propagates, with `save_on_exception=True`.

Saving goes through the run's strategy (`ls.strategy`; `SingleProcess()`
when None), so one manager serves one process, DDP and FSDP alike:
- a checkpoint's name ends in `strategy.checkpoint_suffix`: ".safetensors"
  for a single file, "" for a sharded checkpoint, which is a directory;
- `strategy.save` is called on every rank (a sharded save is collective;
  DDP's writes on rank 0 and waits for it);
- only the writer (`strategy.is_writer`, global rank 0) writes `index.json`
  and the `last` pointer, and prunes (removing a pruned directory whole);
- `latest()` and `restore()` check a checkpoint with `strategy.verify`.

The `last` pointer is recorded in `index.json` (`"last"`), and `latest()`
resolves it first. How it points depends on what a checkpoint is:
- a single file: `last.safetensors`, a hard link to the newest file (a copy
  where the filesystem has no links). It keeps the data after the file it
  links to is pruned, and tools that open `last.safetensors` find it;
- a directory: directories cannot be hard-linked, and copying a sharded
  checkpoint costs its size, so `last` names the newest directory itself,
  and pruning keeps that directory until a newer save takes its place.

A checkpoint holds the resumable part of a `LoopState`: the user state, the
step / epoch / batch counters, the RNG key and the callbacks' states. The
last metrics are not saved (the next step recomputes them), so
`LoopState(state=template)` is a valid template to load into.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ._atomic import atomic_write
from ._callback import Callback, InterruptReason, callback_states
from ._contract import LoopState, Strategy
from ._strategy import SingleProcess
from ._tensorfile import CheckpointError
from ._validate import check_positive_ints, is_int

LAST = "last"
_FILE_SUFFIX = ".safetensors"


class CheckpointManager(Callback):
    """Writes, prunes and finds checkpoints of a run in one directory.

    Args:
        directory: where checkpoints and `index.json` live (created if missing).
        every_n_steps: save every this many steps.
        every_n_epochs: save at the end of every this many epochs. If neither
            this nor `every_n_steps` is given, every epoch.
        monitor: a metric to rank checkpoints by: `"val_<name>"` for an
            evaluation metric, else a train metric (`LoopState.metric`). Read
            from the device only at save points.
        mode: "min" or "max": which end of `monitor` is best.
        save_top_k: with `monitor`, how many best checkpoints to keep (-1: all).
        save_last: keep a `last` pointer at the newest saved state, always
            (see the module doc).
        keep_last_n: without `monitor`, how many of the newest step
            checkpoints to keep (None: all).
        filename: a `str.format` template over `step`, `epoch`, `batch_idx`
            and the monitored metric's name, e.g. "{epoch:02d}-{val_loss:.3f}".
        save_on_exception: when the step raises inside `lf.loop`, save the
            last completed state before the exception propagates.

    Raises:
        ValueError: for inconsistent arguments.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        keep_last_n: int | None = None,
        filename: str = "step={step}",
        save_on_exception: bool = False,
    ) -> None:
        check_positive_ints(
            every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, keep_last_n=keep_last_n
        )
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        if not (is_int(save_top_k) and save_top_k >= -1):
            raise ValueError(
                f"`save_top_k` must be -1 (keep all), 0 or positive, got {save_top_k}."
            )
        if keep_last_n is not None and monitor is not None:
            raise ValueError(
                "`keep_last_n` is for runs without `monitor`; with `monitor`, use `save_top_k`."
            )
        self._check_template(filename, monitor)
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs if every_n_epochs or every_n_steps else 1
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.save_last, self.keep_last_n = save_last, keep_last_n
        self.filename, self.save_on_exception = filename, save_on_exception
        # The strategy of the states saved or restored last (how to verify a checkpoint).
        self._strategy: Strategy = SingleProcess()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_orphans()
        self.entries: list[dict[str, Any]] = []  # kept checkpoints, oldest step first
        self.last: dict[str, Any] | None = None  # the `last` pointer's entry, or None
        self._read_index()

    def describe(self) -> str:
        return str(self.directory)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r})"

    # -- the callback hooks ---------------------------------------------------

    def on_step_end(self, ls: LoopState) -> None:
        self.update(ls)

    def on_interrupt(self, ls: LoopState, reason: InterruptReason) -> None:
        """Save `ls`, the last completed step: always on SIGTERM, on an exception with `save_on_exception`."""
        if reason == "sigterm" or self.save_on_exception:
            self.save(ls, reason=reason)

    # -- deciding -------------------------------------------------------------

    def update(self, ls: LoopState) -> Path | None:
        """Observe one loop state; save it if this is a save point. Returns the path written, if any."""
        if not self._is_save_point(ls):
            return None
        return self.save(ls)

    def _is_save_point(self, ls: LoopState) -> bool:
        if self.every_n_steps and ls.step % self.every_n_steps == 0:
            return True
        if self.every_n_epochs and ls.epoch_end and (ls.epoch + 1) % self.every_n_epochs == 0:
            return True
        # A monitored evaluation metric is fresh after every evaluation.
        return bool(self.monitor and self.monitor.startswith("val_") and ls.evaluated)

    # -- writing --------------------------------------------------------------

    def save(self, ls: LoopState, *, reason: str = "scheduled") -> Path:
        """Save `ls` now (whatever the schedule), prune, update the index; returns the path.

        Every rank of a multi-process run calls this (the strategy's save may
        be collective); only the writer rank updates the index, the `last`
        pointer and prunes. Every rank gets the same path back.
        """
        strategy = ls.strategy if ls.strategy is not None else SingleProcess()
        self._strategy = strategy
        score = self._score(ls)
        fields: dict[str, Any] = {"step": ls.step, "epoch": ls.epoch, "batch_idx": ls.batch_idx}
        if self.monitor is not None:
            fields[self.monitor] = float("nan") if score is None else score
        path = self.directory / (self.filename.format(**fields) + strategy.checkpoint_suffix)
        resumable = ls.replace(metrics={}, eval_metrics=None, eval_at_step=-1)
        meta = {
            "step": ls.step,
            "epoch": ls.epoch,
            "reason": reason,
            "monitor": self.monitor,
            "score": score,
        }
        strategy.save(resumable, path, metadata=meta)
        entry = {
            "path": path.name,
            "step": ls.step,
            "epoch": ls.epoch,
            "score": score,
            "time": time.time(),
            "reason": reason,
        }
        self._record(entry, writer=strategy.is_writer)
        return path

    def _record(self, entry: dict[str, Any], *, writer: bool) -> None:
        """Add `entry`, move `last`, prune; the files are touched on the writer rank only."""
        previous_last = self.last
        self.entries = [e for e in self.entries if e["path"] != entry["path"]] + [entry]
        is_file = entry["path"].endswith(_FILE_SUFFIX)
        if self.save_last:
            self.last = {**entry, "path": LAST + _FILE_SUFFIX} if is_file else dict(entry)
        dropped = self._prune()
        if not writer:
            return
        if self.save_last and is_file:
            self._link_last(self.directory / entry["path"])
        protected = {e["path"] for e in self.entries}
        if self.last is not None:
            protected.add(self.last["path"])
        for old in [*dropped, *([previous_last] if previous_last else [])]:
            if old["path"] not in protected:
                _remove(self.directory / old["path"])
        self._write_index()

    def _score(self, ls: LoopState) -> float | None:
        if self.monitor is None:
            return None
        value = ls.metric(self.monitor)
        if value is None:
            return None  # not available at this save point: ranked last
        return (
            float(value.detach().float().cpu()) if isinstance(value, torch.Tensor) else float(value)
        )

    def _prune(self) -> list[dict[str, Any]]:
        """Drop the entries past `save_top_k` / `keep_last_n` from `entries`; returns them."""
        if self.monitor is not None and self.save_top_k >= 0:
            ranked = sorted(self.entries, key=self._rank_key)
            keep, drop = ranked[: self.save_top_k], ranked[self.save_top_k :]
        elif self.monitor is None and self.keep_last_n is not None:
            newest = sorted(self.entries, key=lambda e: e["step"], reverse=True)
            keep, drop = newest[: self.keep_last_n], newest[self.keep_last_n :]
        else:
            keep, drop = self.entries, []
        self.entries = sorted(keep, key=lambda e: e["step"])
        return drop

    def _rank_key(self, entry: dict[str, Any]) -> tuple[int, float, int]:
        # Ties keep the earlier checkpoint: a later one must be strictly better
        # to replace it (as in Lightning). Missing scores rank last, newest first.
        score = entry["score"]
        if score is None or math.isnan(score):
            return (1, 0.0, -entry["step"])
        return (0, score if self.mode == "min" else -score, entry["step"])

    # -- reading --------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Kept checkpoints (not counting `last`), oldest step first."""
        return [self.directory / e["path"] for e in sorted(self.entries, key=lambda e: e["step"])]

    def best(self) -> Path | None:
        """The best kept checkpoint by `monitor` (None without `monitor` or checkpoints)."""
        if self.monitor is None or not self.entries:
            return None
        return self.directory / min(self.entries, key=self._rank_key)["path"]

    def latest(self, *, strategy: Strategy | None = None) -> Path | None:
        """The newest checkpoint that verifies, falling back past corrupt ones with a warning.

        Args:
            strategy: the strategy to verify with (default: that of the last
                state this manager saved or restored, else `SingleProcess()`).

        Raises:
            ValueError: a checkpoint is a sharded directory but the strategy
                writes single files, or the other way round.
        """
        strategy = strategy if strategy is not None else self._strategy
        newest_first = sorted(self.entries, key=lambda e: e["step"], reverse=True)
        last = self.directory / (self.last["path"] if self.last else LAST + _FILE_SUFFIX)
        paths = [last, *(self.directory / e["path"] for e in newest_first)]
        for path in dict.fromkeys(paths):  # `last` may name a kept directory too
            if not path.exists():
                continue
            _check_kind(path, strategy)
            try:
                strategy.verify(path)
            except CheckpointError as error:
                warnings.warn(
                    f"skipping corrupt checkpoint {path}: {error}", RuntimeWarning, stacklevel=2
                )
                continue
            return path
        return None

    def restore(
        self,
        like: Any,
        *,
        callbacks: Sequence[Callback] = (),
        strategy: Strategy | None = None,
    ) -> LoopState | None:
        """Load the newest good checkpoint into `like`'s structure, or None when there is none.

        Args:
            like: the run's initial state as its step prepares it
                (`step.prepare(state)`: a `TrainState` or any state), or a
                `LoopState` (whose `strategy` is then used).
            callbacks: the run's callbacks, when the checkpoint holds their
                state (their fresh `state_dict()`s give its structure).
            strategy: the step's strategy (`step.strategy`), to read a
                checkpoint it wrote; default `like.strategy` for a
                `LoopState`, else `SingleProcess()`.

        Returns:
            A `LoopState` carrying `strategy`, or None.
        """
        template = like if isinstance(like, LoopState) else LoopState(state=like)
        if strategy is None:
            strategy = template.strategy if template.strategy is not None else SingleProcess()
        self._strategy = strategy
        path = self.latest(strategy=strategy)
        if path is None:
            return None
        template = template.replace(
            metrics={},
            eval_metrics=None,
            eval_at_step=-1,
            callbacks=callback_states(callbacks),
            strategy=strategy,
        )
        restored: LoopState = strategy.load(path, like=template)
        return restored

    # -- bookkeeping ----------------------------------------------------------

    def _index_path(self) -> Path:
        return self.directory / "index.json"

    def _read_index(self) -> None:
        path = self._index_path()
        if not path.exists():
            return
        try:
            document = json.loads(path.read_text())
            entries = [e for e in document["checkpoints"] if (self.directory / e["path"]).exists()]
            last = document.get("last")  # absent in indexes written before the pointer existed
            if last is not None and not (self.directory / last["path"]).exists():
                last = None
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            warnings.warn(
                f"ignoring unreadable checkpoint index {path}: {error}",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.entries, self.last = entries, last

    def _write_index(self) -> None:
        document = {
            "monitor": self.monitor,
            "mode": self.mode,
            "last": self.last,
            "checkpoints": self.entries,
        }
        text = json.dumps(document, indent=1)

        def write(tmp: Path) -> None:
            tmp.write_text(text)

        atomic_write(self._index_path(), write)

    def _link_last(self, path: Path) -> None:
        # A hard link, not a second write: `last` keeps the data even after
        # `path` is pruned. Swapped in atomically; copied where links fail.
        tmp = self.directory / f".{LAST}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.directory / (LAST + _FILE_SUFFIX))

    def _remove_orphans(self) -> None:
        # What writes that were killed half-way leave: ours end in ".tmp",
        # safetensors' own (inside `save`) are named ".tmpXXXXXX", a sharded
        # save's are directories ".<name>.sharded.tmp" / ".<name>.sharded.old".
        for pattern in (".*.tmp", ".tmp*", ".*.sharded.old"):
            for orphan in self.directory.glob(pattern):
                _remove(orphan)

    @staticmethod
    def _check_template(filename: str, monitor: str | None) -> None:
        fields: dict[str, Any] = {"step": 1, "epoch": 0, "batch_idx": 1}
        if monitor is not None:
            fields[monitor] = 0.5
        try:
            filename.format(**fields)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"`filename={filename!r}` cannot be formatted: {error}. Available fields: "
                f"{', '.join(fields)} (the monitored metric by its name)."
            ) from None
        if os.sep in filename or filename.startswith("."):
            raise ValueError(
                f"`filename={filename!r}` must be a plain file name (no '{os.sep}', not starting with '.')."
            )


def _check_kind(path: Path, strategy: Strategy) -> None:
    """Raise unless `path` is the kind of checkpoint `strategy` reads (a file or a directory)."""
    sharded = strategy.checkpoint_suffix == ""
    if path.is_dir() != sharded:
        found = (
            "a sharded checkpoint (a directory)" if path.is_dir() else "a single-file checkpoint"
        )
        raise ValueError(
            f"'{path}' is {found}, but the strategy is {strategy!r}, which reads "
            f"{'sharded directories' if sharded else 'single files'}. Pass the strategy the run "
            f"was saved with, `strategy=step.strategy` (or restore a LoopState that carries it)."
        )


def _remove(path: Path) -> None:
    """Delete a checkpoint file, or a sharded checkpoint's whole directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
