"""`ModelCheckpoint`: the checkpoint manager as a callback, for Lightning users."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._manager import CheckpointManager
from ._base import Callback

if TYPE_CHECKING:
    from .._loop import TrainerState


class ModelCheckpoint(Callback):
    """Save checkpoints on a schedule; see `lightfunc.CheckpointManager` for the arguments.

    As a callback it saves after all callbacks have run, so checkpoints hold
    their state (an `EarlyStopping`'s patience counter, ...). In `lf.loop` it
    also handles SIGTERM: the last completed step is saved and the run stops.

    Example:
        >>> import tempfile, lightfunc as lf
        >>> cb = lf.callbacks.ModelCheckpoint(tempfile.mkdtemp(), monitor="val_loss", save_top_k=2)
    """

    def __init__(self, dirpath: str | os.PathLike[str], **manager_kwargs: Any) -> None:
        self.manager = CheckpointManager(dirpath, **manager_kwargs)

    def describe(self) -> str:
        return str(self.manager.directory)

    def on_step_end(self, ts: TrainerState) -> None:
        self.manager.update(ts)

    @property
    def best_model_path(self) -> Path | None:
        """The best kept checkpoint by `monitor` (Lightning's name)."""
        return self.manager.best()

    @property
    def last_model_path(self) -> Path | None:
        """The newest checkpoint that verifies."""
        return self.manager.latest()
