"""`CheckpointManager`: which checkpoints to write, which to keep, and which one to resume from.

    manager = lf.CheckpointManager("runs/digits", every_n_steps=100, monitor="val_acc", mode="max")
    start = manager.restore(state) or state          # a LoopState to continue from, or None
    for ls in lf.loop(step, start, loader, max_epochs=10, checkpoint=manager):
        ...

Like Lightning's ModelCheckpoint: save every n steps and/or at the end of
every n epochs (and after each evaluation when the monitored metric is an
evaluation metric); keep the `save_top_k` best by `monitor` (or the
`keep_last_n` newest without one); `save_last` keeps a `last` pointer at the
newest state. The end of a run is a save point too (`on_end`), as are a
preemption (`on_interrupt(ls, "sigterm")`, which SIGTERM and Ctrl-C raise)
and, with `save_on_exception=True`, a failing step (`"exception"`).

`index.json` (written atomically) lists what is where, but it is a cache:
the checkpoints' own headers (checksummed) say which step each holds. When
the index is missing, truncated or garbage, or lists files that are gone,
the manager finds the checkpoints in the directory by their headers, with a
warning. `latest()` and `restore()` try them newest step first and fall back,
with a warning naming the file and the problem, past any that fails a check.

The directory is the boundary. The manager reads and deletes only plain
names inside it (an index entry "../x" or "/etc/x" is ignored), never
follows a link out of it, and deletes only checkpoints it listed itself
(pruning) and the temporary files of writers of this host that are dead.
A manager that only reads (`latest`, `restore`, a monitoring script) writes
nothing: it creates no directory and removes no file, so it can run beside
a training process, or on a read-only copy.

Saving goes through the run's strategy (`ls.strategy`; `SingleProcess()`
when None), so one manager serves one process, DDP and FSDP alike:
- a checkpoint's name ends in `strategy.checkpoint_suffix`: ".safetensors"
  for a single file, "" for a sharded checkpoint, which is a directory;
- `strategy.save` is called on every rank (a sharded save is collective;
  DDP's writes on rank 0 and waits for it);
- only the writer (`strategy.is_writer`, global rank 0) writes `index.json`
  and the `last` pointer, and prunes (removing a pruned directory whole);
- `latest()` checks a checkpoint with `strategy.verify`; `restore()` loads
  it with `strategy.load`, which checks it against the template before
  reading a tensor, then every tensor's checksum.

The `last` pointer is recorded in `index.json` (`"last"`). How it points
depends on what a checkpoint is:
- a single file: `last.safetensors`, a hard link to the newest file (a copy
  where the filesystem has no links). It keeps the data after the file it
  links to is pruned, and tools that open `last.safetensors` find it;
- a directory: directories cannot be hard-linked, and copying a sharded
  checkpoint costs its size, so `last` names the newest directory itself,
  and pruning keeps that directory until a newer save takes its place.

A checkpoint holds the resumable part of a `LoopState`: the user state, the
step / epoch / batch counters, the RNG key and the callbacks' states. The
last metrics are not saved (the next step recomputes them), so
`LoopState(state=template)` is a valid template to load into. Restored
without the run's callbacks, a single-file checkpoint's callback states are
kept for `loop` to hand back; given them, a state for a callback not given
is dropped, and a callback the checkpoint lacks starts fresh, each with a
warning naming it.

Beside the checkpoints, the writer keeps `compile_cache.bin`, what
`torch.compile` built in this process (`lightfunc.save_compile_cache`), when
something was compiled since the manager was made; `load_compile_cache()`
(which `fit(ckpt_path="last")` calls) loads it before the first step, so a
resumed run or another rank starts warm. `compile_cache=False` turns it off.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from . import _checkpoint
from ._atomic import atomic_write, remove_orphans, temp_name
from ._callback import Callback, InterruptReason, callback_states
from ._codec import Header
from ._compile import compile_counts
from ._compile_cache import CompileCacheInfo, load_compile_cache, save_compile_cache
from ._contract import LoopState, Strategy
from ._strategy import SingleProcess
from ._tensorfile import CheckpointError, write_error
from ._validate import check_positive_ints, is_int

LAST = "last"
INDEX = "index.json"
_FILE_SUFFIX = ".safetensors"
_CALLBACKS = "callbacks"  # the `LoopState` field holding callback states


class CheckpointManager(Callback):
    """Writes, prunes and finds checkpoints of a run in one directory.

    Args:
        directory: where checkpoints and `index.json` live (created at the
            first save; reading never creates or changes anything).
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
        save_on_end: save the last state when the run ends between save
            points (`max_steps` mid-epoch, an early stop), so a resume never
            repeats steps. On by default when the newest state is kept
            (`save_last`, or no `monitor`).
        compile_cache: at save points, keep `compile_cache.bin` (what
            `torch.compile` built, see `lightfunc.save_compile_cache`) beside
            the checkpoints, when something compiled since this manager was made.

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
        save_on_end: bool | None = None,
        compile_cache: bool = True,
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
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(
                f"`directory` '{self.directory}' is a file, not a directory: a checkpoint "
                f"manager keeps its checkpoints and index in a directory of its own. Pass a "
                f"directory's path (it is created on the first save)."
            )
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs if every_n_epochs or every_n_steps else 1
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.save_last, self.keep_last_n = save_last, keep_last_n
        self.filename, self.save_on_exception = filename, save_on_exception
        self.save_on_end = (save_last or monitor is None) if save_on_end is None else save_on_end
        self.compile_cache = compile_cache
        self._graphs_cached = _graphs_compiled()  # graphs compiled when the cache was last written
        # The strategy of the states saved or restored last (how to verify a checkpoint).
        self._strategy: Strategy = SingleProcess()
        self._saved_step: int | None = None  # the step saved or restored last
        self._prepared = False  # directory created and dead writers' debris removed
        self._warned: set[str] = set()  # problems already warned about (a poller warns once)
        self.entries: list[dict[str, Any]] = []  # kept checkpoints, oldest step first
        self.last: dict[str, Any] | None = None  # the `last` pointer's entry, or None
        self.entries, self.last = self._read_index()

    def describe(self) -> str:
        return str(self.directory)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r})"

    # -- the callback hooks ---------------------------------------------------

    def on_step_end(self, ls: LoopState) -> None:
        self.update(ls)

    def on_interrupt(self, ls: LoopState, reason: InterruptReason) -> None:
        """Save `ls`, the last completed step: always on SIGTERM / Ctrl-C, on an exception with `save_on_exception`."""
        if (reason == "sigterm" or self.save_on_exception) and ls.step != self._saved_step:
            self.save(ls, reason=reason)

    def on_end(self, ls: LoopState) -> None:
        """The end of a run is a save point: save `ls` unless it is saved already."""
        if self.save_on_end and ls.step > 0 and ls.step != self._saved_step:
            self.save(ls, reason="end")

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

        Raises:
            CheckpointError: the checkpoint or the index could not be written,
                saying why (the disk is full, the directory is read-only).
        """
        strategy = ls.strategy if ls.strategy is not None else SingleProcess()
        self._strategy = strategy
        self._prepare(writer=strategy.is_writer)
        score = self._score(ls, strict=reason == "scheduled")
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
            "world_size": strategy.world_size,
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
        self._saved_step = ls.step
        if self.compile_cache and strategy.is_writer:
            self._save_compile_cache()
        return path

    def _save_compile_cache(self) -> None:
        """Rewrite `compile_cache.bin` if a graph compiled since it was last written (or ever)."""
        graphs = _graphs_compiled()
        if graphs == self._graphs_cached:
            return
        try:
            save_compile_cache(self.directory)
        except OSError as error:  # the checkpoint is written; a cache is worth no failure
            self._warn_once(f"could not write the compile cache in {self.directory}: {error}")
            return
        self._graphs_cached = graphs

    def load_compile_cache(self) -> CompileCacheInfo | None:
        """Load the directory's `compile_cache.bin` into torch's compile caches (see
        `lightfunc.load_compile_cache`, and what it trusts); None when there is none."""
        return load_compile_cache(self.directory)

    def _prepare(self, *, writer: bool) -> None:
        """Before the first save: create the directory, remove what dead writers left."""
        if self._prepared:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(self.directory, error) from error
        if writer:
            remove_orphans(self.directory)
        self._prepared = True

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
        try:
            if self.save_last and is_file:
                self._link_last(self.directory / entry["path"])
            protected = {e["path"] for e in self.entries}
            if self.last is not None:
                protected.add(self.last["path"])
            for old in [*dropped, *([previous_last] if previous_last else [])]:
                if old["path"] not in protected:
                    _remove(self._inside(old["path"]))
            self._write_index()
        except OSError as error:
            raise write_error(self.directory / INDEX, error) from error

    def _score(self, ls: LoopState, *, strict: bool = False) -> float | None:
        """`monitor`'s value in `ls`, or None when it is not there (yet).

        With `strict` (a scheduled save), a monitor missing from metrics of
        its kind that are there (the train step's, or the last evaluation's
        for "val_...") is a `KeyError`, as Lightning's ModelCheckpoint raises:
        a misspelt name would otherwise rank every checkpoint last, keep the
        newest instead of the best, and make `ckpt_path="best"` the last one.
        Saves at the end, on an interrupt or an exception never raise here.
        """
        if self.monitor is None:
            return None
        value = ls.metric(self.monitor)
        if value is None:
            evaluation = self.monitor.startswith("val_")
            source = (ls.eval_metrics or {}) if evaluation else ls.metrics
            if strict and source:
                names = sorted(
                    k if not evaluation or k.startswith("val_") else f"val_{k}" for k in source
                )
                raise KeyError(
                    f"{type(self).__name__}: `monitor={self.monitor!r}` is not among the "
                    f"{'evaluation' if evaluation else 'train'} metrics at step {ls.step} "
                    f"({', '.join(names)}). Monitor one of those ('val_<name>' for what the "
                    f"eval step returns), or return {self.monitor!r} from the step."
                )
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

    def candidates(self) -> list[Path]:
        """Every checkpoint in the directory, newest step first, as their headers say.

        The index's entries and `last` pointer, and every file or directory
        whose header reads as a lightfunc `LoopState` checkpoint (so a lost or
        damaged index loses nothing), each once. A checkpoint whose header
        cannot be read is left out with a warning. Reads headers only.
        """
        return self._scan()[0]

    def _scan(self) -> tuple[list[Path], dict[str, BaseException]]:
        """`candidates()`, and the checkpoints among the rest whose header cannot be read.

        Those are the index's entries and the files named like a checkpoint
        (``*.safetensors``): a run whose every checkpoint is damaged has
        checkpoints, and resuming it must not look like a fresh start.
        """
        unreadable: dict[str, BaseException] = {}
        entries, last = self._read_index()
        named = [e["path"] for e in entries] + ([last["path"]] if last else [])
        claimed = {e["path"]: e["step"] for e in [*entries, *([last] if last else [])]}
        try:
            present = sorted(p.name for p in self.directory.iterdir())
        except OSError:
            present = []
        found: dict[str, int] = {}
        for name in dict.fromkeys([*named, *present]):
            if not _safe_name(name) or name == INDEX:
                continue
            path = self.directory / name
            if not self._contained(path):
                continue
            step = self._header_step(
                path, claimed.get(name), listed=name in named, problems=unreadable
            )
            if step is not None:
                found[name] = step
        unlisted = sorted(set(found) - set(named))
        if unlisted and (entries or not self._index_path().exists()):
            self._warn_once(
                f"checkpoints in {self.directory} not listed in its index were found by their "
                f"headers: {', '.join(unlisted)}"
            )
        # Newest step first; at one step, the `last` pointer, then the index's order.
        order = {name: i for i, name in enumerate(reversed(named))}
        ranked = sorted(found, key=lambda n: (-found[n], order.get(n, len(order)), n))
        return [self.directory / name for name in ranked], unreadable

    def has_checkpoints(self) -> bool:
        """Whether the directory holds any checkpoint, readable or damaged (reads headers only)."""
        found, unreadable = self._scan()
        return bool(found or unreadable)

    def latest(self, *, strategy: Strategy | None = None) -> Path | None:
        """The newest checkpoint that verifies, falling back past damaged ones with a warning.

        Verifying reads every tensor (in bounded chunks for a single file)
        and checks its checksum. Nothing is written.

        Args:
            strategy: the strategy to verify with (default: that of the last
                state this manager saved or restored, else `SingleProcess()`).

        Raises:
            ValueError: a checkpoint is a sharded directory but the strategy
                writes single files, or the other way round.
        """
        strategy = strategy if strategy is not None else self._strategy
        for path in self._of_kind(strategy):
            try:
                strategy.verify(path)
            except (CheckpointError, FileNotFoundError) as error:
                self._skip(path, error)
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

        Each checkpoint, newest step first, is checked against the template
        before any tensor is read (a header declaring other shapes costs
        nothing), then loaded with every checksum checked; one that fails
        is skipped with a warning.

        Args:
            like: the run's initial state as its step prepares it
                (`step.prepare(state)`: a `TrainState` or any state), or a
                `LoopState` (whose `strategy` is then used).
            callbacks: the run's callbacks, when the checkpoint holds their
                state (their fresh `state_dict()`s give its structure). State
                for a callback not given is dropped, and a callback the
                checkpoint lacks starts fresh, each with a warning. None
                given (the default): every state a single-file checkpoint
                holds is kept in the returned `LoopState.callbacks`, and
                `loop` hands each to the callback with its `state_key`.
            strategy: the step's strategy (`step.strategy`), to read a
                checkpoint it wrote; default `like.strategy` for a
                `LoopState`, else `SingleProcess()`.

        Returns:
            A `LoopState` carrying `strategy`, or None when the directory holds
            no checkpoint.

        Raises:
            CheckpointError: there are checkpoints, but none can be restored
                (each one's problem is listed): never a silent fresh start.
            ValueError: a checkpoint is of the other kind (file / directory)
                than `strategy` reads.
        """
        template = like if isinstance(like, LoopState) else LoopState(state=like)
        if strategy is None:
            strategy = template.strategy if template.strategy is not None else SingleProcess()
        self._strategy = strategy
        template = template.replace(
            metrics={}, eval_metrics=None, eval_at_step=-1, strategy=strategy
        )
        paths, unreadable = self._scan()
        failures = [
            f"{name}: its header cannot be read: {error}" for name, error in unreadable.items()
        ]
        for path in self._of_kind(strategy, paths):
            try:
                restored = _load(path, template, callbacks, strategy)
            except (CheckpointError, FileNotFoundError) as error:
                self._skip(path, error)
                failures.append(f"{path.name}: {error}")
                continue
            self._saved_step = restored.step
            _warn_other_world_size(path, restored, strategy)
            return restored
        if failures:
            raise CheckpointError(
                f"None of the {len(failures)} checkpoints in '{self.directory}' can be restored "
                f"into this run's state, so resuming would start over:\n  "
                + "\n  ".join(failures)
                + "\nIf the state does not match, build it as the saved run did (same model, "
                "optimizer, precision); a damaged file (`lightfunc ckpt verify DIR` lists them) "
                "can only be moved away. To start fresh, move the directory away."
            )
        return None

    def _of_kind(self, strategy: Strategy, paths: list[Path] | None = None) -> Iterator[Path]:
        for path in self.candidates() if paths is None else paths:
            if path.exists():
                _check_kind(path, strategy)
                yield path

    def _skip(self, path: Path, error: BaseException) -> None:
        warnings.warn(
            f"skipping corrupt checkpoint {path}, falling back to an older one: {error}",
            RuntimeWarning,
            stacklevel=3,
        )

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _header_step(
        self,
        path: Path,
        claimed: int | None,
        *,
        listed: bool,
        problems: dict[str, BaseException] | None = None,
    ) -> int | None:
        """The step `path`'s header says it holds; None if it is no LoopState checkpoint.

        A listed or ``*.safetensors`` one whose header cannot be read goes into `problems`.
        """
        try:
            if path.is_dir():
                header = _sharded_header(path)
            elif path.name.endswith(_FILE_SUFFIX) and not path.name.startswith("."):
                header, _ = _checkpoint.read_header(path)
            else:
                return None
        except FileNotFoundError:
            return None  # pruned meanwhile by the process that writes here
        except (CheckpointError, OSError) as error:
            if listed or path.name.endswith(_FILE_SUFFIX):
                self._warn_once(f"skipping corrupt checkpoint {path}: {error}")
                if problems is not None:
                    problems[path.name] = error
            return None
        if header is None:  # a sharded checkpoint whose index this version cannot parse
            return claimed
        step = header.leaves.get("step")
        if step is None or step.kind != "int" or "epoch" not in header.leaves:
            return None  # a lightfunc file, but not of a LoopState (a TrainState, params)
        value: int = step.value
        return value

    # -- bookkeeping ----------------------------------------------------------

    def _index_path(self) -> Path:
        return self.directory / INDEX

    def _read_index(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The index's valid entries (present, plain names inside the directory) and `last`.

        Any problem with the file (missing keys, not JSON, a directory, too
        deep, unreadable) warns and gives no entries: the checkpoints are
        then found by their headers (`candidates`).
        """
        path = self._index_path()
        if not path.exists() and not path.is_symlink():
            return [], None
        try:
            document = json.loads(path.read_text())
            raw = document["checkpoints"]
            last = document.get("last")  # absent in indexes written before the pointer existed
            if not isinstance(raw, list):
                raise TypeError(f"`checkpoints` is a {type(raw).__name__}, expected a list")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            self._warn_once(
                f"ignoring unreadable checkpoint index {path} ({type(error).__name__}: "
                f"{error!s:.200}); looking for checkpoints by their headers instead"
            )
            return [], None
        entries = [e for e in raw if self._valid_entry(e)]
        if len(entries) != len(raw):
            bad = [repr(e)[:80] for e in raw if not self._valid_entry(e)]
            self._warn_once(f"ignoring invalid entries of the checkpoint index {path}: {bad}")
        entries = [e for e in entries if (self.directory / e["path"]).exists()]
        if last is not None and not (
            self._valid_entry(last) and (self.directory / last["path"]).exists()
        ):
            last = None
        return entries, last

    def _valid_entry(self, entry: Any) -> bool:
        """An index entry with a plain file name inside the directory and a numeric step."""
        return (
            isinstance(entry, dict)
            and _safe_name(entry.get("path"))
            and entry.get("path") != INDEX
            and is_int(entry.get("step"))
            and isinstance(entry.get("epoch", 0), int)
            and (entry.get("score") is None or isinstance(entry.get("score"), int | float))
            and self._contained(self.directory / entry["path"])
        )

    def _contained(self, path: Path) -> bool:
        """Whether `path` (a name in the directory) stays inside it once links are resolved."""
        try:
            return path.resolve().parent == self.directory.resolve()
        except (OSError, RuntimeError):
            return False

    def _inside(self, name: str) -> Path:
        """`name` in the directory; raises if it could name anything outside it."""
        path = self.directory / name
        if not (_safe_name(name) and self._contained(path)):
            raise ValueError(
                f"refusing to touch {name!r}: not a plain name inside {self.directory}"
            )
        return path

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
        tmp = self.directory / temp_name(LAST + _FILE_SUFFIX)
        try:
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, self.directory / (LAST + _FILE_SUFFIX))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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


def _graphs_compiled() -> int:
    """Graphs torch.compile compiled in this process so far (0 if it was never imported)."""
    return compile_counts()["graphs"] if "torch._dynamo" in sys.modules else 0


def _safe_name(name: Any) -> bool:
    """A plain, visible name of an entry of the directory: no separator, not '..', not absolute."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
        and Path(name).name == name
    )


def _sharded_header(directory: Path) -> Header | None:
    """The codec header of a sharded checkpoint's index, checked; None if not one we can parse.

    Raises:
        CheckpointError, OSError: the index is damaged.
    """
    index = directory / INDEX
    if not index.is_file():
        return None
    try:
        doc = json.loads(index.read_text())
        meta, tensors = doc["header"], list(doc["tensors"])
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise CheckpointError(
            f"the sharded index {index} is unreadable ({error!r:.200})"
        ) from error
    return Header.decode(meta, index, tensors=tensors, checksummed=False)


def _load(
    path: Path, template: LoopState, callbacks: Sequence[Callback], strategy: Strategy
) -> LoopState:
    """`path` loaded into `template`, the run's callbacks' states matched to the file's."""
    fresh = callback_states(callbacks)
    saved = _saved_callback_states(path)
    if saved is None:  # the file's callbacks are not known: load them as the run has them
        if not callbacks and _holds_callback_state(path):
            warnings.warn(
                f"the checkpoint {path} holds callback state that `restore` can only read with "
                f"the run's callbacks (a sharded or nested state): pass them, "
                f"`manager.restore(state, callbacks=[...])`; without, they start fresh",
                RuntimeWarning,
                stacklevel=4,
            )
        loaded: LoopState = strategy.load(path, like=template.replace(callbacks=fresh))
        return loaded
    if not callbacks:
        # `restore(state)` without the run's callbacks (the usual `restore(state) or state`):
        # every saved state is kept, and `loop` hands each to the callback of its `state_key`.
        kept: LoopState = strategy.load(path, like=template.replace(callbacks=saved))
        return kept
    states = {k: v for k, v in fresh.items() if k in saved}
    dropped = {k: v for k, v in saved.items() if k not in fresh}
    for key in dropped:
        warnings.warn(
            f"the checkpoint {path} holds state for the callback {key!r}, which is not among "
            f"the callbacks given to `restore`; that state is dropped",
            RuntimeWarning,
            stacklevel=4,
        )
    for key in sorted(set(fresh) - set(saved)):
        warnings.warn(
            f"the checkpoint {path} holds no state for the callback {key!r}; it starts fresh",
            RuntimeWarning,
            stacklevel=4,
        )
    loaded = strategy.load(path, like=template.replace(callbacks={**states, **dropped}))
    return loaded.replace(callbacks={k: v for k, v in loaded.callbacks.items() if k in fresh})


def _saved_callback_states(path: Path) -> dict[str, dict[str, Any]] | None:
    """The callback states a single-file checkpoint holds, as a template (None for a directory).

    Non-tensor values are the file's; a tensor is an empty meta tensor of
    the file's shape and dtype (the load reads it, and it is then dropped or
    replaced by the run's callback).

    Raises:
        CheckpointError, FileNotFoundError: the header is unreadable.
    """
    if path.is_dir():
        return None
    header, infos = _checkpoint.read_header(path)
    states: dict[str, dict[str, Any]] = {}
    for leaf in header.leaves.values():
        if len(leaf.keys) < 2 or leaf.keys[0] != _CALLBACKS:
            continue
        if len(leaf.keys) != 3:
            return None  # nested callback state: the run's own structure is the template
        if leaf.kind == "tensor":
            info = infos[header.aliases.get(leaf.path, leaf.path)]
            dtype = info.dtype if isinstance(info.dtype, torch.dtype) else torch.uint8
            value: Any = torch.empty(info.shape, dtype=dtype, device="meta")
        else:
            value = leaf.value
        states.setdefault(str(leaf.keys[1]), {})[str(leaf.keys[2])] = value
    return states


def _warn_other_world_size(path: Path, restored: LoopState, strategy: Strategy) -> None:
    """Warn when a mid-epoch checkpoint is resumed by another number of data-parallel ranks.

    The state reshards exactly, but the data position does not: `batch_idx`
    counts the batches each rank took, so with another world size the rest
    of that epoch re-reads (or skips) examples; an epoch end too, since its
    `batch_idx` is the saved run's number of batches per rank.
    """
    if restored.batch_idx == 0:
        return
    header = _readable_header(path)
    user = header.user if header is not None else None
    saved = user.get("world_size") if isinstance(user, dict) else None
    if isinstance(saved, int) and saved != strategy.world_size:
        warnings.warn(
            f"resuming {path} (saved by {saved} rank(s) at batch {restored.batch_idx} of epoch "
            f"{restored.epoch}) with {strategy.world_size} rank(s): the state is the same, but "
            f"the data position counts each rank's batches, so the rest of this epoch reads "
            f"other examples than the saved run would (some again, some not). Resume with "
            f"{saved} rank(s) to keep the data order exact.",
            RuntimeWarning,
            stacklevel=3,
        )


def _readable_header(path: Path) -> Header | None:
    """The header of a single-file or sharded checkpoint, or None if it cannot be read."""
    try:
        return _sharded_header(path) if path.is_dir() else _checkpoint.read_header(path)[0]
    except (CheckpointError, OSError):
        return None


def _holds_callback_state(path: Path) -> bool:
    """Whether `path`'s header lists any callback state (False if it cannot be read)."""
    header = _readable_header(path)
    return header is not None and any(
        len(leaf.keys) >= 2 and leaf.keys[0] == _CALLBACKS for leaf in header.leaves.values()
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
