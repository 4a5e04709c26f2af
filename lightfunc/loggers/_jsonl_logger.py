"""`JSONLLogger`: one JSON object per logging event, appended to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from .._atomic import atomic_write
from ._base import Logger, write_json


class JSONLLogger(Logger):
    """Append metrics to `save_dir/name/metrics.jsonl`, hyper-parameters to `hparams.json`.

    One line per logging event: `{"step": 10, "epoch": 0, "metrics": {"loss": 0.5}}`
    (`epoch` is null when `log_metrics` was given none). Lines are flushed as
    they are written, so the file can be followed while the run goes on; a
    resumed run appends to it. NaN and infinities are written as Python's
    `json` writes them (`NaN`, `Infinity`), which `json.loads` and pandas read.

    Args: those of `Logger`: `save_dir`, `name`, `log_every_n_steps`, `rank`, `hparams`,
        `metric_intervals`.

    Example:
        >>> import json, tempfile, lightfunc as lf
        >>> logger = lf.loggers.JSONLLogger(tempfile.mkdtemp())
        >>> logger.log_metrics({"loss": 0.5}, step=10, epoch=0)
        >>> logger.close()
        >>> json.loads((logger.log_dir / "metrics.jsonl").read_text())
        {'step': 10, 'epoch': 0, 'metrics': {'loss': 0.5}}
    """

    def _init_backend(self) -> None:
        self._file: IO[str] | None = None  # metrics.jsonl, opened for appending at the first write

    @property
    def metrics_file(self) -> Path:
        """`log_dir / "metrics.jsonl"`."""
        return self.log_dir / "metrics.jsonl"

    def write_metrics(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        if self._file is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if self._resumed_at is not None and self.metrics_file.is_file():
                self._drop_records_after(self._resumed_at)
            self._file = open(self.metrics_file, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps({"step": step, "epoch": epoch, "metrics": metrics}) + "\n")
        self._file.flush()

    def _drop_records_after(self, k: int) -> None:
        """Rewrite the file without the interrupted run's records past step `k` (atomically)."""
        lines = self.metrics_file.read_text(encoding="utf-8").splitlines(keepends=True)

        def after(line: str) -> bool:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                return False  # not a record of ours: kept
            return isinstance(step, int) and step > k

        kept = [line for line in lines if not after(line)]
        if len(kept) != len(lines):

            def write(tmp: Path) -> None:
                tmp.write_text("".join(kept), encoding="utf-8")

            atomic_write(self.metrics_file, write, fsync=False)

    def write_hparams(self, params: dict[str, Any]) -> None:
        write_json(self.log_dir / "hparams.json", params)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
