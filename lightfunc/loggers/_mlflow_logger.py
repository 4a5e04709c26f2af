"""`MLflowLogger`: metrics, hyper-parameters and the run's status in an MLflow tracking store."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .._callback import InterruptReason
from .._validate import check_mapping, check_optional_str
from ._base import Logger, check_hparams, final_values
from ._tensorboard_logger import flatten_hparams

if TYPE_CHECKING:
    from .._contract import LoopState

# MLflow's limits on one `log_batch` call (mlflow.utils.validation).
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
# The start of a DeprecationWarning MLflow 3.17's SQL store raises with SQLAlchemy 2.1.
_SQLALCHEMY_NOLOAD = "The ``noload`` loader strategy is deprecated"
# The run's status for each way a run ends (mlflow.entities.RunStatus names).
_STATUS = {"exception": "FAILED", "sigterm": "KILLED"}


class MLflowLogger(Logger):
    """Write metrics, hyper-parameters and the run's end to an MLflow run.

    Metrics are logged at their step (MLflow's metric history), under their
    own names (`loss`, `val_loss`, as `CSVLogger` writes them), with `epoch`
    as one more metric. Hyper-parameters are the run's params, flattened to
    `a/b` keys with `str()` values (lists as JSON, None as "None"), as
    MLflow stores them; MLflow params cannot change once logged, so logging
    a different value for a logged key raises. When the loop ends, the last
    step's train metrics (and `epoch`) are logged at that step if it was
    not a logging step, so that each metric's latest value in MLflow
    (`run.data.metrics`, the runs table) is the run's final one; then the
    run is set FINISHED. A step that raises sets it FAILED; a stop by
    SIGTERM / SIGINT, KILLED.

    Where: `tracking_uri` (a server, `"http://127.0.0.1:5000"`, a database
    or any MLflow URI), or by default an SQLite store in the run's own
    directory, `save_dir/name/mlflow.db`, with the experiment's artifacts
    under `save_dir/name/artifacts/`: `mlflow ui --backend-store-uri
    sqlite:///<that file>` shows it. The logger talks to the store through
    its own `MlflowClient`; it sets no global MLflow state (no
    `mlflow.set_tracking_uri`, no active run). Nothing is created before
    the first write, and only on rank 0. A closed logger that logs again
    (e.g. `log_metrics(..., prefix="test")` after `fit`) sets the run
    RUNNING again, and the next `close` ends it.

    Needs `mlflow` (`pip install 'lightfunc[mlflow]'`; for a remote server
    only, `mlflow-skinny` suffices), imported at the first write, not with
    lightfunc.

    Args: those of `Logger` (`save_dir`, `name`, `log_every_n_steps`,
        `rank`, `hparams`, `metric_intervals`), and:
        experiment_name: the MLflow experiment, created if missing.
        run_name: the run's name; None: one MLflow makes up.
        run_id: the id of an existing run to log into; None: a new run.
        tracking_uri: where the tracking store is; None: the SQLite file above.
        tags: tags set on a new run (`{"team": "vision"}`).

    Raises:
        ModuleNotFoundError: `mlflow` is not installed.
        TypeError: `tracking_uri`, `run_name` or `run_id` not a string or
            None; `experiment_name` not a string; `tags` not a mapping of strings.
        ValueError: an empty `tracking_uri` or `experiment_name`; from
            `log_hyperparams`, a new value for a logged parameter.
        TypeError / ValueError: see `Logger`.

    Example:
        >>> import tempfile, lightfunc as lf
        >>> logger = lf.loggers.MLflowLogger(tempfile.mkdtemp(), experiment_name="mnist")
        >>> # for ls in lf.loop(step, state, data, callbacks=[logger]): ...
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        *,
        name: str = "run",
        log_every_n_steps: int = 50,
        rank: int | None = None,
        hparams: Mapping[str, Any] | None = None,
        metric_intervals: Mapping[str, int | Literal["epoch"]] | None = None,
        experiment_name: str = "lightfunc",
        run_name: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(tracking_uri, os.PathLike):
            raise TypeError(
                f"`tracking_uri` must be a URI string or None, got the path {tracking_uri!r}. "
                f"For an SQLite file pass f'sqlite:///{{path}}'; for a server "
                f"'http://host:port'; None keeps the runs in the logger's directory."
            )
        for arg, value in (
            ("tracking_uri", tracking_uri),
            ("run_name", run_name),
            ("run_id", run_id),
        ):
            check_optional_str(arg, value)
        if tracking_uri == "":
            raise ValueError(
                "`tracking_uri` is empty (MLflow would write ./mlruns in the working "
                "directory). Pass a URI, or None for an SQLite store in the logger's directory."
            )
        if not isinstance(experiment_name, str):
            raise TypeError(
                f"`experiment_name` must be a string, got {type(experiment_name).__name__} "
                f"{experiment_name!r}."
            )
        if not experiment_name:
            raise ValueError("`experiment_name` must be non-empty, e.g. experiment_name='mnist'.")
        self.tags = check_mapping("tags", tags)
        bad = {key: value for key, value in self.tags.items() if not isinstance(value, str)}
        if bad:
            raise TypeError(f"`tags` values must be strings, got {bad!r}. Convert them with str().")
        self.experiment_name, self.run_name = experiment_name, run_name
        self._tracking_uri = tracking_uri
        self._run_id = run_id  # the run's id once created (kept to reopen it after `close`)
        self._closed = False  # whether this logger has closed the run (a later write reopens it)
        super().__init__(
            save_dir,
            name=name,
            log_every_n_steps=log_every_n_steps,
            rank=rank,
            hparams=hparams,
            metric_intervals=metric_intervals,
        )

    def _init_backend(self) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise ModuleNotFoundError(
                "MLflowLogger needs the `mlflow` package: pip install 'lightfunc[mlflow]' "
                "(or `pip install mlflow`; `mlflow-skinny` is enough for a remote server)."
            )
        self._client: Any = None  # an MlflowClient, made at the first write
        self._running = False  # whether the run is open (RUNNING) in the store
        self._status = "FINISHED"  # what `close` sets
        self._params: dict[str, str] = {}  # the params logged to the run
        self._last_step: dict[str, int] = {}  # metric name -> the last step it was logged at

    @property
    def tracking_uri(self) -> str:
        """The tracking store's URI: the one given, else `sqlite:///<log_dir>/mlflow.db`."""
        if self._tracking_uri is not None:
            return self._tracking_uri
        return f"sqlite:///{os.path.abspath(self.log_dir / 'mlflow.db')}"

    @property
    def run_id(self) -> str | None:
        """The MLflow run id: the one given, or the new run's once created (None before)."""
        return self._run_id

    def _open(self) -> tuple[Any, str]:
        """The client and the run's id, creating the store, experiment and run as needed."""
        if self._client is None:
            from mlflow.tracking import MlflowClient  # heavy: imported at the first write only

            if self._tracking_uri is None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():  # the client opens (or creates) the store
                # MLflow's SQL store maps its tables with a loader SQLAlchemy 2.1 deprecates:
                # MLflow's to fix, not the user's (and an error under `-W error`).
                warnings.filterwarnings("ignore", message=_SQLALCHEMY_NOLOAD)
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        if self._run_id is None:
            self._run_id = client.create_run(
                self._experiment_id(client), run_name=self.run_name, tags=self.tags
            ).info.run_id
        elif not self._running:
            client.update_run(self._run_id, status="RUNNING")
        if not self._running:
            self._running, self._status = True, "FINISHED"
        return client, self._run_id

    def _experiment_id(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return str(experiment.experiment_id)
        # In the logger's own store, artifacts go beside it (MLflow's default is ./mlruns).
        location = None if self._tracking_uri is not None else self.log_dir.absolute() / "artifacts"
        return str(
            client.create_experiment(
                self.experiment_name,
                artifact_location=None if location is None else location.as_uri(),
            )
        )

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Log hyper-parameters as the run's params (see `Logger.log_hyperparams`).

        Raises:
            ValueError: a key already logged gets a different value (MLflow
                params are immutable).
        """
        params = check_hparams(params, "params")
        if self.rank == 0 and self._params:
            new = _param_values(params)
            changed = {
                k: (self._params[k], v) for k, v in new.items() if self._params.get(k, v) != v
            }
            if changed:
                detail = ", ".join(f"`{k}`: {old!r} -> {v!r}" for k, (old, v) in changed.items())
                raise ValueError(
                    f"MLflow params cannot change once logged, and `params` changes {detail}. "
                    f"Log a changing value as a metric (`log_metrics`), or start a new run "
                    f"(a new MLflowLogger)."
                )
        super().log_hyperparams(params)

    def write_metrics(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        values = dict(metrics) if epoch is None else {**metrics, "epoch": float(epoch)}
        self._log_metrics(step, values)

    def _log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        with self._reopened():
            client, run_id = self._open()
            now = int(time.time() * 1000)
            rows = [Metric(key, value, now, step) for key, value in values.items()]
            for batch in _batches(rows, _MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=batch, synchronous=True)
        self._last_step.update(dict.fromkeys(values, step))

    @contextlib.contextmanager
    def _reopened(self) -> Iterator[None]:
        """A write to a run this logger already closed reopens it and closes it again after.

        E.g. the README's test metrics logged after `fit` ended: the run was left
        RUNNING in the store for good (found by an independent check).
        """
        closed = self._closed and not self._running
        status = self._status
        try:
            yield
        finally:
            if closed and self._running:
                self._status = status
                self.close()

    def write_hparams(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        with self._reopened():
            client, run_id = self._open()
            values = _param_values(params)
            new = [Param(key, value) for key, value in values.items() if key not in self._params]
            for batch in _batches(new, _MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=batch, synchronous=True)
        self._params.update(values)

    def on_end(self, ls: LoopState) -> None:
        if self.rank == 0 and self._running:
            final = final_values(ls)
            train = {name: final[name] for name in (*ls.metrics, "epoch")}
            due = {k: v for k, v in train.items() if self._last_step.get(k) != ls.step}
            if due:
                self._log_metrics(ls.step, due)
        super().on_end(ls)

    def on_interrupt(self, ls: LoopState, reason: InterruptReason) -> None:
        if self.rank != 0 or not self._running:
            return
        self._status = _STATUS[reason]
        if reason == "exception":  # `on_end` does not follow
            self.close()

    @property
    def handles_interrupts(self) -> bool:
        return False  # recording the status must not make the loop catch signals

    def close(self) -> None:
        if self._running and self._run_id is not None:
            self._client.set_terminated(self._run_id, status=self._status)
            self._running = False
            self._closed = True


def _param_values(params: dict[str, Any]) -> dict[str, str]:
    """Hyper-parameters as MLflow params: flat `a/b` keys, `str()` values."""
    return {key: str(value) for key, value in flatten_hparams(params).items()}


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
