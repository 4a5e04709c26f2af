"""`CheckpointManager`: which checkpoints to write, which to keep, and which one to resume from.

    manager = lf.CheckpointManager("runs/digits", every_n_steps=100, monitor="val_acc", mode="max")
    start = manager.restore(state) or state          # a TrainerState to continue from, or None
    for ts in lf.loop(step, start, loader, max_epochs=10, checkpoint=manager):
        ...

Like Lightning's ModelCheckpoint: save every n steps and/or at the end of
every n epochs (and after each evaluation when the monitored metric is an
evaluation metric); keep the `save_top_k` best by `monitor` (or the
`keep_last_n` newest without one); `save_last` keeps `last.safetensors`
pointing at the newest state. Every file is written atomically by `save`;
`index.json` (also atomic) lists what is where; `latest()` returns the newest
checkpoint that verifies and falls back, with a warning, past a corrupt one.

A checkpoint holds the resumable part of a `TrainerState`: the user state,
the step / epoch / batch counters and the RNG key. The last metrics are not
saved (the next step recomputes them), so `TrainerState(state=template)` is a
valid template to load into.
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
from typing import TYPE_CHECKING, Any, Literal

import torch

from ._atomic import atomic_write
from ._checkpoint import CheckpointError, load, save, verify
from ._device import global_rank
from ._loop import TrainerState, check_positive_ints

if TYPE_CHECKING:
    from .callbacks import Callback

SUFFIX = ".safetensors"
LAST = "last"


class CheckpointManager:
    """Writes, prunes and finds checkpoints of a run in one directory.

    Args:
        directory: where checkpoints and `index.json` live (created if missing).
        every_n_steps: save every this many steps.
        every_n_epochs: save at the end of every this many epochs. If neither
            this nor `every_n_steps` is given, every epoch.
        monitor: a metric to rank checkpoints by: `"val_<name>"` for an
            evaluation metric (`ts.eval_metrics[name]`), else a train metric
            (`ts.metrics[name]`). Read from the device only at save points.
        mode: "min" or "max": which end of `monitor` is best.
        save_top_k: with `monitor`, how many best checkpoints to keep (-1: all).
        save_last: keep `last.safetensors`, the newest saved state, always.
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
        if save_top_k < -1:
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
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_orphans()
        self.entries: list[dict[str, Any]] = self._read_index()

    # -- deciding -------------------------------------------------------------

    def update(self, ts: TrainerState) -> Path | None:
        """Observe one trainer state; save it if this is a save point. Returns the path written, if any."""
        if not self._is_save_point(ts):
            return None
        return self.save(ts)

    def _is_save_point(self, ts: TrainerState) -> bool:
        if self.every_n_steps and ts.step % self.every_n_steps == 0:
            return True
        if self.every_n_epochs and ts.epoch_end and (ts.epoch + 1) % self.every_n_epochs == 0:
            return True
        return bool(self.monitor and self.monitor.startswith("val_") and ts.evaluated)

    # -- writing --------------------------------------------------------------

    def save(self, ts: TrainerState, *, reason: str = "scheduled") -> Path:
        """Save `ts` now (whatever the schedule), prune, update the index; returns the path.

        Under `torch.distributed` only global rank 0 writes; the other ranks
        return the path rank 0 writes (a data-parallel state is the same on
        every rank). Sharded states use `lightfunc.distributed.save_sharded`.
        """
        score = self._score(ts)
        fields: dict[str, Any] = {"step": ts.step, "epoch": ts.epoch, "batch_idx": ts.batch_idx}
        if self.monitor is not None:
            fields[self.monitor] = float("nan") if score is None else score
        path = self.directory / (self.filename.format(**fields) + SUFFIX)
        if global_rank() != 0:
            return path  # rank 0 writes it; its decisions match, as the metrics are reduced
        resumable = ts.replace(metrics={}, eval_metrics=None, eval_at_step=-1)
        meta = {
            "step": ts.step,
            "epoch": ts.epoch,
            "reason": reason,
            "monitor": self.monitor,
            "score": score,
        }
        save(resumable, path, metadata=meta)
        self.entries = [e for e in self.entries if e["path"] != path.name]
        self.entries.append(
            {
                "path": path.name,
                "step": ts.step,
                "epoch": ts.epoch,
                "score": score,
                "time": time.time(),
                "reason": reason,
            }
        )
        if self.save_last:
            self._point_last_at(path)
        self._prune()
        self._write_index()
        return path

    def _score(self, ts: TrainerState) -> float | None:
        if self.monitor is None:
            return None
        if self.monitor.startswith("val_"):
            source, name = ts.eval_metrics or {}, self.monitor[4:]
        else:
            source, name = ts.metrics, self.monitor
        if name not in source:
            return None  # not available at this save point: ranked last
        value = source[name]
        return (
            float(value.detach().float().cpu()) if isinstance(value, torch.Tensor) else float(value)
        )

    def _prune(self) -> None:
        if self.monitor is not None and self.save_top_k >= 0:
            ranked = sorted(self.entries, key=self._rank_key)
            keep, drop = ranked[: self.save_top_k], ranked[self.save_top_k :]
        elif self.monitor is None and self.keep_last_n is not None:
            newest = sorted(self.entries, key=lambda e: e["step"], reverse=True)
            keep, drop = newest[: self.keep_last_n], newest[self.keep_last_n :]
        else:
            return
        for entry in drop:
            (self.directory / entry["path"]).unlink(missing_ok=True)
        self.entries = sorted(keep, key=lambda e: e["step"])

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

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies, falling back past corrupt ones with a warning."""
        candidates = sorted(self.entries, key=lambda e: e["step"], reverse=True)
        paths = [self.directory / e["path"] for e in candidates]
        last = self.directory / (LAST + SUFFIX)
        if last.exists():
            paths.insert(0, last)
        for path in paths:
            if not path.exists():
                continue
            try:
                verify(path)
            except CheckpointError as error:
                warnings.warn(
                    f"skipping corrupt checkpoint {path}: {error}", RuntimeWarning, stacklevel=2
                )
                continue
            return path
        return None

    def restore(self, like: Any, *, callbacks: Sequence[Callback] = ()) -> TrainerState | None:
        """Load the newest good checkpoint into `like`'s structure, or None when there is none.

        Args:
            like: the run's initial state (a `TrainState`, or any state) or a `TrainerState`.
            callbacks: the run's callbacks, when the checkpoint holds their
                state (their fresh `state_dict()`s give its structure).
        """
        path = self.latest()
        if path is None:
            return None
        template = like if isinstance(like, TrainerState) else TrainerState(state=like)
        states = {cb.state_key: s for cb in callbacks if (s := cb.state_dict()) is not None}
        template = template.replace(
            metrics={}, eval_metrics=None, eval_at_step=-1, callbacks=states
        )
        restored: TrainerState = load(path, like=template)
        return restored

    # -- bookkeeping ----------------------------------------------------------

    def _index_path(self) -> Path:
        return self.directory / "index.json"

    def _read_index(self) -> list[dict[str, Any]]:
        path = self._index_path()
        if not path.exists():
            return []
        try:
            entries = json.loads(path.read_text())["checkpoints"]
        except (ValueError, KeyError, TypeError) as error:
            warnings.warn(
                f"ignoring unreadable checkpoint index {path}: {error}",
                RuntimeWarning,
                stacklevel=3,
            )
            return []
        return [e for e in entries if (self.directory / e["path"]).exists()]

    def _write_index(self) -> None:
        document = {"monitor": self.monitor, "mode": self.mode, "checkpoints": self.entries}
        text = json.dumps(document, indent=1)

        def write(tmp: Path) -> None:
            tmp.write_text(text)

        atomic_write(self._index_path(), write)

    def _point_last_at(self, path: Path) -> None:
        # A hard link, not a second write: `last` keeps the data even after
        # `path` is pruned. Swapped in atomically; copied where links fail.
        tmp = self.directory / f".{LAST}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.directory / (LAST + SUFFIX))

    def _remove_orphans(self) -> None:
        # Temporary files of writes that were killed half-way: ours end in
        # ".tmp", safetensors' own (inside `save`) are named ".tmpXXXXXX".
        for pattern in (".*.tmp", ".tmp*"):
            for tmp in self.directory.glob(pattern):
                tmp.unlink(missing_ok=True)

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
