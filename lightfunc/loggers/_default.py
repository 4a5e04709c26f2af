"""`default_logger`: TensorBoard when it is installed, CSV otherwise."""

from __future__ import annotations

import os
from typing import Any

from . import _tensorboard_logger
from ._base import Logger
from ._csv_logger import CSVLogger


def default_logger(save_dir: str | os.PathLike[str], **kwargs: Any) -> Logger:
    """A `TensorBoardLogger` if `tensorboard` is importable, else a `CSVLogger`.

    Args:
        save_dir: the root directory of the logs.
        **kwargs: the other `Logger` options (`name`, `log_every_n_steps`, `rank`, `hparams`,
            `metric_intervals`).

    Returns:
        The logger (nothing is written until it logs something).

    Example:
        >>> import tempfile, lightfunc as lf
        >>> logger = lf.loggers.default_logger(tempfile.mkdtemp(), log_every_n_steps=10)
    """
    if _tensorboard_logger.tensorboard_available():
        return _tensorboard_logger.TensorBoardLogger(save_dir, **kwargs)
    return CSVLogger(save_dir, **kwargs)
