"""`CSVLogger`: metrics in one CSV file, hyper-parameters in a JSON file."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from .._atomic import atomic_write
from ._base import Logger, write_json


class CSVLogger(Logger):
    """Write metrics to `save_dir/name/metrics.csv`, hyper-parameters to `hparams.json`.

    The columns are `step`, `epoch`, then the metric names in the order they
    first appeared; a record leaves the metrics it lacks empty (a train-only
    row has no `val_*` values). Since evaluation metrics usually appear after
    the first rows, the logger keeps all rows in memory and, at every logging
    step, rewrites the whole file atomically (a temporary file renamed over
    it): a reader always sees a complete CSV with one header holding every
    column so far. Values are written with Python's shortest round-trip
    repr, so `float(cell)` gives back exactly the logged float.

    An existing `metrics.csv` (from a run this one resumes) is read at the
    first write and its rows are kept ahead of the new ones.

    Args: those of `Logger`: `save_dir`, `name`, `log_every_n_steps`, `rank`, `hparams`,
        `metric_intervals`.

    Example:
        >>> import tempfile, lightfunc as lf
        >>> logger = lf.loggers.CSVLogger(tempfile.mkdtemp(), log_every_n_steps=10)
        >>> logger.log_metrics({"loss": 0.5}, step=10, epoch=0)
        >>> (logger.log_dir / "metrics.csv").read_text().splitlines()
        ['step,epoch,loss', '10,0,0.5']
    """

    def _init_backend(self) -> None:
        self._columns: list[str] = []  # metric names, in order of first appearance
        self._rows: list[dict[str, Any]] = []  # every record written, oldest first
        self._loaded = False  # whether an existing metrics.csv was read in

    @property
    def metrics_file(self) -> Path:
        """`log_dir / "metrics.csv"`."""
        return self.log_dir / "metrics.csv"

    def write_metrics(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        if not self._loaded:
            self._load_existing()
        self._rows.append({"step": step, "epoch": "" if epoch is None else epoch, **metrics})
        self._columns += [name for name in metrics if name not in self._columns]
        fields = ["step", "epoch", *self._columns]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="", lineterminator="\n")
                writer.writeheader()
                writer.writerows(self._rows)

        # No fsync: still atomic for readers and against a crash of this process, and cheap.
        atomic_write(self.metrics_file, write, fsync=False)

    def write_hparams(self, params: dict[str, Any]) -> None:
        write_json(self.log_dir / "hparams.json", params)

    def _load_existing(self) -> None:
        self._loaded = True
        if not self.metrics_file.is_file():
            return
        with open(self.metrics_file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            old = [dict(row) for row in reader]
            header = list(reader.fieldnames or [])
        self._columns = [c for c in header if c not in ("step", "epoch")] + [
            c for c in self._columns if c not in header
        ]
        if self._resumed_at is not None:  # the interrupted run's records past the checkpoint
            old = [row for row in old if not _step_after(row.get("step"), self._resumed_at)]
        self._rows = old + self._rows


def _step_after(step: Any, k: int) -> bool:
    try:
        return int(step) > k
    except (TypeError, ValueError):
        return False  # not a step: kept as it is
