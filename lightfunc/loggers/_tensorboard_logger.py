"""`TensorBoardLogger`: scalars and hyper-parameters in TensorBoard event files."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from ._base import Logger

# The tag of the hyper-parameters' text summary (TensorBoard's Text tab shows it).
HPARAMS_TAG = "hparams"


def tensorboard_available() -> bool:
    """True if the `tensorboard` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLogger(Logger):
    """Write metrics as TensorBoard scalars under `save_dir/name/`.

    Each metric is a scalar tagged by its name (`loss`, `val_loss`, ...) at
    the train step; `epoch` is a scalar too. Hyper-parameters go to the Text
    tab under the tag `hparams`, as indented JSON (a code block there), so
    they read back exactly with `json.loads`; each `log_hyperparams` call
    adds one text event holding all of them. (TensorBoard's HParams plugin is
    not used: it takes only flat scalar values and wants a metric to plot
    against.) Events are flushed at every logging step.

    A second run in the same directory (a resumed run) adds a new event file
    beside the old ones; TensorBoard reads them as one run.

    Needs the `tensorboard` package (`pip install tensorboard`); it is
    imported at the first write, not with lightfunc.

    Args: those of `Logger`: `save_dir`, `name`, `log_every_n_steps`, `rank`, `hparams`.

    Raises:
        ModuleNotFoundError: `tensorboard` is not installed.
        TypeError / ValueError: see `Logger`.

    Example:
        >>> import tempfile, lightfunc as lf
        >>> logger = lf.loggers.TensorBoardLogger(tempfile.mkdtemp(), log_every_n_steps=10)
        >>> # for ls in lf.loop(step, state, data, callbacks=[logger]): ...
    """

    def _init_backend(self) -> None:
        if not tensorboard_available():
            raise ModuleNotFoundError(
                "TensorBoardLogger needs the `tensorboard` package: `pip install tensorboard` "
                "(or `lightfunc[logging]`), or use lightfunc.loggers.CSVLogger / JSONLLogger."
            )
        self._writer: Any = None  # a SummaryWriter, opened at the first write

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: keep it lazy

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def write_metrics(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        writer = self._open()
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
        if epoch is not None:
            writer.add_scalar("epoch", float(epoch), step)
        writer.flush()

    def write_hparams(self, params: dict[str, Any]) -> None:
        text = json.dumps(params, indent=2)
        # Indented four spaces: a code block in TensorBoard's markdown, still valid JSON.
        writer = self._open()
        writer.add_text(HPARAMS_TAG, "\n".join("    " + line for line in text.splitlines()), 0)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
