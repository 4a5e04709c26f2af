"""`ModelCheckpoint`: the checkpoint manager under Lightning's name, as a callback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._manager import CheckpointManager


class ModelCheckpoint(CheckpointManager):
    """Save checkpoints on a schedule; see `lightfunc.CheckpointManager` for the arguments.

    It is a `CheckpointManager` (which is a callback) under Lightning's name
    and with Lightning's `dirpath`: passed in `callbacks`, it saves after
    all callbacks have run, so checkpoints hold their state (an
    `EarlyStopping`'s patience counter, ...). It also handles interrupts: on
    SIGTERM the last completed step is saved and the run stops.

    Example:
        >>> import tempfile, lightfunc as lf
        >>> cb = lf.callbacks.ModelCheckpoint(tempfile.mkdtemp(), monitor="val_loss", save_top_k=2)
    """

    def __init__(self, dirpath: str | os.PathLike[str], **manager_kwargs: Any) -> None:
        super().__init__(dirpath, **manager_kwargs)

    @property
    def manager(self) -> CheckpointManager:
        """The manager: this object itself (kept for code written when it wrapped one)."""
        return self

    @property
    def best_model_path(self) -> Path | None:
        """The best kept checkpoint by `monitor` (Lightning's name)."""
        return self.best()

    @property
    def last_model_path(self) -> Path | None:
        """The newest checkpoint that verifies."""
        return self.latest()
