"""`TensorBoardLogger`: scalars and hyper-parameters in TensorBoard event files."""

from __future__ import annotations

import importlib.util
import json
from typing import TYPE_CHECKING, Any

from ._base import Logger

if TYPE_CHECKING:
    from .._contract import LoopState

# The tag of the hyper-parameters' text summary (TensorBoard's Text tab shows it exactly).
HPARAMS_TAG = "hparams"


def tensorboard_available() -> bool:
    """True if the `tensorboard` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLogger(Logger):
    """Write metrics as TensorBoard scalars, and hyper-parameters for its HParams tab.

    Tags are namespaced so that TensorBoard shows two groups, both open:
    train metrics under `train/` (`train/loss`, and the learning rate as
    `train/lr`) and evaluation metrics under `val/` (`val/loss`, from
    `val_loss`); a name that already holds a `/` is kept as it is
    (`tensorboard_tag`). TensorBoard opens only the first two groups (in
    alphabetical order) of its Time Series page, so nothing else gets a
    group: the epoch is not written here (CSV and JSONL records carry it).
    Test metrics logged with `log_metrics(..., prefix="test")` go under
    `test/` (`test/loss`): a third group, listed first, so TensorBoard then
    opens `test/` and `train/`, and `val/` is one click away.
    CSV and JSONL logs keep the plain names (`loss`, `val_loss`).

    Hyper-parameters go to the HParams tab (flattened to `a/b` keys; lists
    and None as text) with the run's final metrics beside them (the last
    value of each scalar; evaluation metrics listed first, as TensorBoard
    shows the first five columns), and, exactly, as indented JSON in the
    Text tab under the tag `hparams`, which `json.loads` reads back. Events
    are flushed at every logging step.

    A second run in the same directory (a resumed run) adds a new event file
    beside the old ones; TensorBoard reads them as one run. `lightfunc.fit`
    gives every run its own `version_N/logs` directory, so TensorBoard lists
    runs as `version_0/logs`, `version_1/logs`, ...

    Needs the `tensorboard` package (`pip install tensorboard`); it is
    imported at the first write, not with lightfunc.

    Args: those of `Logger`: `save_dir`, `name`, `log_every_n_steps`, `rank`, `hparams`,
        `metric_intervals`.

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
        self._purged = False  # whether a resumed run's purge mark is written
        self._tags: dict[str, None] = {}  # the scalar tags written, in order of first write

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: keep it lazy

            # A resumed run: TensorBoard hides the interrupted run's events past the checkpoint.
            purge = None if self._resumed_at is None else self._resumed_at + 1
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
            self._purged = purge is not None
        return self._writer

    def on_start(self, ls: LoopState) -> None:
        super().on_start(ls)
        if self._resumed_at is not None and self._writer is not None and not self._purged:
            # Opened before the run started (`fit` writes the hyper-parameters first): the
            # purge mark `SummaryWriter(purge_step=)` would have written, written now.
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            self._writer._get_file_writer().add_event(
                Event(step=self._resumed_at + 1, session_log=SessionLog(status=SessionLog.START))
            )
            self._purged = True

    def write_metrics(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        writer = self._open()
        for name, value in metrics.items():
            tag = tensorboard_tag(name)
            self._tags.setdefault(tag)
            writer.add_scalar(tag, value, step)
        writer.flush()

    def write_hparams(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        text = json.dumps(params, indent=2)
        # Indented four spaces: a code block in TensorBoard's markdown, still valid JSON.
        writer = self._open()
        writer.add_text(HPARAMS_TAG, "\n".join("    " + line for line in text.splitlines()), 0)
        # The HParams tab: a session start with the values now; the experiment (which
        # hyper-parameters and metrics are columns) at `close`, once the metrics are known.
        _, session_start, _ = hparams(flatten_hparams(params), {})
        writer._get_file_writer().add_summary(session_start)
        writer.flush()

    def close(self) -> None:
        if self._writer is None:
            return
        if self._hparams:
            from torch.utils.tensorboard.summary import hparams

            # Evaluation metrics first: the HParams table shows its first five columns.
            tags = sorted(self._tags, key=lambda t: (not t.startswith("val/"), t != "train/loss"))
            experiment, _, session_end = hparams(
                flatten_hparams(self._hparams), dict.fromkeys(tags, 0.0)
            )
            file_writer = self._writer._get_file_writer()
            file_writer.add_summary(experiment)
            file_writer.add_summary(session_end)  # status: success
        self._writer.close()
        self._writer = None


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of a logged metric: `val/<m>` for `val_<m>`, `test/<m>` for
    `test_<m>` (`log_metrics(..., prefix="test")`), else `train/<name>`.

    A name that already holds a `/` is the user's own namespacing, kept as it is.

    Example:
        >>> tensorboard_tag("val_acc"), tensorboard_tag("loss"), tensorboard_tag("lr")
        ('val/acc', 'train/loss', 'train/lr')
        >>> tensorboard_tag("test_loss")
        'test/loss'
    """
    if "/" in name:
        return name
    if name.startswith("val_"):
        return f"val/{name[4:]}"
    if name.startswith("test_"):
        return f"test/{name[5:]}"
    return f"train/{name}"


def flatten_hparams(
    params: dict[str, Any], prefix: str = ""
) -> dict[str, bool | int | float | str]:
    """`params` as one flat dict of the types TensorBoard's HParams tab takes.

    Nested mappings become `outer/inner` keys; lists, None and anything else become text.

    Example:
        >>> flatten_hparams({"optim": {"lr": 0.1}, "layers": [2, 3], "tag": None})
        {'optim/lr': 0.1, 'layers': '[2, 3]', 'tag': 'None'}
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_hparams(value, prefix=f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat
