"""`WandbLogger`: metrics, hyper-parameters and the run's summary in a Weights & Biases run."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from .._callback import InterruptReason
from .._validate import check_mapping, check_optional_str
from ._base import Logger, final_values

if TYPE_CHECKING:
    from .._contract import LoopState

# `wandb.init` arguments the logger sets itself: given in `init_kwargs` they would be ignored.
_OWN_INIT_ARGS = ("dir", "config", "mode", "project", "entity", "name", "id", "resume", "settings")
_MODES = ("online", "offline", "disabled")


class WandbLogger(Logger):
    """Write metrics, hyper-parameters and the final summary to a W&B run.

    Each logging event is one row of the run's history: the metrics under
    their own names (`loss`, `val_loss`, as `CSVLogger` writes them), the
    step as `step` (the x-axis of every chart, through
    `run.define_metric("*", step_metric="step")`) and the epoch as `epoch`.
    Hyper-parameters are the run's config (nested mappings stay nested).
    When the loop ends, the run's summary gets the final values: the train
    metrics of the last step (read then, whether or not it was a logging
    step), the last evaluation's `val_*` metrics, `step` and `epoch`; then
    the run is finished. A step that raises finishes it as failed
    (exit code 1).

    Files go to `save_dir/name/wandb/` (W&B's `dir=`): with
    `mode="offline"` the run is only written there, as
    `offline-run-<time>-<id>/run-<id>.wandb`, with no network and no login;
    `wandb sync` uploads it later, `wandb leet inspect` reads it. The
    `wandb-core` service W&B starts keeps its own debug log under
    `WANDB_CACHE_DIR` (default `~/.cache/wandb/logs`). Nothing is created
    before the first write, and only on rank 0.

    A closed logger that logs again (e.g. `log_metrics(..., prefix="test")`
    after `fit`) reopens the same run id with `resume="allow"`; offline,
    that is a second `offline-run-*` directory that `wandb sync` adds to
    the same run.

    Needs `wandb` (`pip install 'lightfunc[wandb]'`), imported at the first
    write, not with lightfunc.

    Args: those of `Logger` (`save_dir`, `name`, `log_every_n_steps`,
        `rank`, `hparams`, `metric_intervals`), and:
        project: the W&B project; None: W&B's default (`WANDB_PROJECT`, else "uncategorized").
        entity: the W&B team or user; None: W&B's default.
        run_name: the run's display name; None: one W&B makes up.
        run_id: the id of a run to resume (W&B's `id`); None: a new run.
        mode: "online", "offline" (written locally only) or "disabled";
            None: W&B's own setting (`WANDB_MODE`, else online).
        settings: more `wandb.Settings` fields, e.g. `{"console": "off"}`.
        init_kwargs: more `wandb.init` arguments, e.g. `{"group": "sweep-3", "tags": ["cnn"]}`.

    Raises:
        ModuleNotFoundError: `wandb` is not installed.
        TypeError: `project`, `entity`, `run_name` or `run_id` not a string
            or None; `settings` or `init_kwargs` not a mapping.
        ValueError: an unknown `mode`; `init_kwargs` naming an argument the
            logger sets (`dir`, `config`, `mode`, ...).
        TypeError / ValueError: see `Logger`.

    Example:
        >>> import tempfile, lightfunc as lf
        >>> logger = lf.loggers.WandbLogger(tempfile.mkdtemp(), project="mnist", mode="offline")
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
        project: str | None = None,
        entity: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        mode: Literal["online", "offline", "disabled"] | None = None,
        settings: Mapping[str, Any] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        for arg, value in (
            ("project", project),
            ("entity", entity),
            ("run_name", run_name),
            ("run_id", run_id),
        ):
            check_optional_str(arg, value)
        if mode is not None and mode not in _MODES:
            raise ValueError(
                f"`mode` must be one of {', '.join(map(repr, _MODES))} or None (W&B's own "
                f"setting), got {mode!r}. Use mode='offline' to write the run locally only."
            )
        self.settings = check_mapping("settings", settings)
        self.init_kwargs = check_mapping("init_kwargs", init_kwargs)
        own = [key for key in self.init_kwargs if key in _OWN_INIT_ARGS]
        if own:
            raise ValueError(
                f"`init_kwargs` may not set {', '.join(map(repr, own))}: the logger sets "
                f"{', '.join(_OWN_INIT_ARGS)} itself. Pass them as the logger's own arguments "
                f"(`save_dir`, `hparams`, `mode`, `project`, `entity`, `run_name`, `run_id`, "
                f"`settings`)."
            )
        self.project, self.entity, self.run_name, self.mode = project, entity, run_name, mode
        self._run_id = run_id  # the run's id once created (kept to reopen it after `close`)
        super().__init__(
            save_dir,
            name=name,
            log_every_n_steps=log_every_n_steps,
            rank=rank,
            hparams=hparams,
            metric_intervals=metric_intervals,
        )

    def _init_backend(self) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ModuleNotFoundError(
                "WandbLogger needs the `wandb` package: pip install 'lightfunc[wandb]' "
                "(or `pip install wandb`)."
            )
        self._run: Any = None  # the open wandb Run, created at the first write

    @property
    def run(self) -> Any:
        """The open `wandb.Run` (to log media yourself), or None: before the first write,
        after `close`, and on ranks other than 0."""
        return self._run

    @property
    def run_id(self) -> str | None:
        """The W&B run id: the one given, or the new run's once created (None before)."""
        return self._run_id

    def _open(self) -> Any:
        if self._run is not None:
            return self._run
        import wandb  # heavy: imported at the first write only

        self.log_dir.mkdir(parents=True, exist_ok=True)
        # "create_new": a second run in the process must not finish this one (W&B's default).
        settings = wandb.Settings(**{"reinit": "create_new", **self.settings})
        run = wandb.init(
            dir=str(self.log_dir),
            project=self.project,
            entity=self.entity,
            name=self.run_name,
            id=self._run_id,
            resume=None if self._run_id is None else "allow",
            mode=self.mode,
            config=self._hparams or None,
            settings=settings,
            **self.init_kwargs,
        )
        run.define_metric("*", step_metric="step")  # charts plot against lightfunc's step
        self._run, self._run_id = run, run.id
        return run

    def write_metrics(self, step: int, epoch: int | None, metrics: dict[str, float]) -> None:
        row: dict[str, Any] = {**metrics, "step": step}
        if epoch is not None:
            row["epoch"] = epoch
        # No `step=`: W&B's own `_step` counts rows (it cannot go back to an earlier
        # one, as a reopened run's test metrics at the last step would need).
        self._open().log(row)

    def write_hparams(self, params: dict[str, Any]) -> None:
        self._open().config.update(params, allow_val_change=True)

    def on_end(self, ls: LoopState) -> None:
        if self.rank == 0 and self._run is not None:
            self._run.summary.update(final_values(ls))
        super().on_end(ls)

    def on_interrupt(self, ls: LoopState, reason: InterruptReason) -> None:
        if reason == "exception" and self.rank == 0 and self._run is not None:
            self._run.finish(exit_code=1)  # shown as failed; `on_end` does not follow
            self._run = None

    @property
    def handles_interrupts(self) -> bool:
        return False  # marking a failed run must not make the loop catch signals

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
